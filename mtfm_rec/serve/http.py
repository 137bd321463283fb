"""The HTTP scoring service: FastAPI over a :class:`~mtfm_rec.serve.predictor.Predictor`.

::

    serve(Predictor.from_run("runs/mtfm_small"), host="0.0.0.0", port=8000)

    POST /score    one request (mtfm_rec.serve.json_request: the form and its rules) per POST
                   -> 200 {"scenario": "sc0", "tasks": ["click"], "scores": [[p_click], ...]}
                      (one row per candidate, in the request's order; tasks in schema order)
    GET  /healthz  -> 200 {"status": "ok", "scenarios": {"sc0": ["click"], ...}}  (served ones)

Concurrent requests are micro-batched (:class:`MicroBatcher`): one worker thread takes the
first waiting request, collects those that arrive within ``max_batch_wait_ms`` (at most
``max_batch_requests``) and scores them with one ``predictor.score`` call (the predictor
groups them by scenario), then answers each caller with its own rows.

Errors answer ``{"error": message, "field": JSON path or null, "rule": rule}``:

* 400: the body is not JSON (``NaN``/``Infinity`` are not JSON; a key repeated in one object is
  refused too, rather than keeping one of its values), or it breaks a rule of
  :func:`~mtfm_rec.serve.json_request.request_from_json` (wrong type, undeclared field, ...),
  or its scenario is declared but not served;
* 413: a body over ``max_body_bytes``, or a request over the other
  :class:`~mtfm_rec.serve.json_request.RequestLimits` (candidates, context length, bag ids);
* 500: scoring raised. A batch whose ``score`` call raises is scored again request by request,
  so that only the requests that fail alone get a 500; the service keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

import numpy as np
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse

from mtfm_rec.serve.json_request import RequestError, RequestLimits, RequestTooLarge, request_from_json
from mtfm_rec.serve.predictor import Predictor
from mtfm_rec.serve.request import Request

log = logging.getLogger(__name__)

RULE_BODY_TOO_LARGE = "body larger than RequestLimits.max_body_bytes"
RULE_NOT_JSON = "body is not valid JSON"
RULE_DUPLICATE_KEY = "a key appears twice in one JSON object"
RULE_NOT_SERVED = "scenario not served by this service"
RULE_SCORING = "scoring failed"


@dataclass
class _Job:
    request: Request
    future: "Future[np.ndarray]"


class MicroBatcher:
    """One worker thread that scores waiting requests together (module docstring).

    Args:
        predictor: what scores a list of requests.
        max_batch_wait_ms: how long the worker waits, after the first request of a batch, for
            more to arrive.
        max_batch_requests: requests of one ``predictor.score`` call at most.
    """

    def __init__(self, predictor: Predictor, max_batch_wait_ms: float, max_batch_requests: int) -> None:
        if max_batch_requests < 1 or max_batch_wait_ms < 0:
            raise ValueError(f"{max_batch_requests=} must be >= 1 and {max_batch_wait_ms=} >= 0")
        self.predictor = predictor
        self.max_batch_wait_s = max_batch_wait_ms / 1000.0
        self.max_batch_requests = max_batch_requests
        self._queue: "queue.Queue[Optional[_Job]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False

    @property
    def pending(self) -> int:
        """Requests waiting for the worker (not yet in a batch)."""
        return self._queue.qsize()

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mtfm-micro-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops the worker after its current batch; requests still waiting get an error."""
        self._stopping = True
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(RuntimeError("the service is shutting down"))

    def submit(self, request: Request) -> "Future[np.ndarray]":
        """Queues ``request``; the future resolves to its ``[M, num_tasks]`` scores."""
        if self._stopping or self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the micro-batcher is not running")
        job = _Job(request, Future())
        self._queue.put(job)
        return job.future

    def _collect(self, first: _Job) -> List[_Job]:
        """``first`` and what arrives within the wait (at most ``max_batch_requests``), less
        the requests whose caller has gone (a cancelled future)."""
        batch = [first]
        deadline = time.monotonic() + self.max_batch_wait_s
        while len(batch) < self.max_batch_requests:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:  # stop(): finish this batch, then exit
                self._stopping = True
                break
            batch.append(job)
        # running futures cannot be cancelled any more, so set_result below never fails
        return [job for job in batch if job.future.set_running_or_notify_cancel()]

    def _run(self) -> None:
        while not self._stopping:
            first = self._queue.get()
            if first is None:
                break
            batch = self._collect(first)
            if batch:
                self._score(batch)

    def _score(self, batch: List[_Job]) -> None:
        try:
            scores = self.predictor.score([job.request for job in batch])
            if len(scores) != len(batch):
                raise RuntimeError(f"the predictor answered {len(scores)} of {len(batch)} requests")
        except Exception as exc:  # noqa: BLE001 - isolate the failing request(s), keep serving
            if len(batch) == 1:
                log.exception("scoring a request failed")
                batch[0].future.set_exception(exc)
                return
            for job in batch:  # which request fails alone: only its caller gets the error
                self._score([job])
            return
        for job, s in zip(batch, scores):
            job.future.set_result(s)


def _error(status: int, message: str, field: Optional[str], rule: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, "field": field, "rule": rule})


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    """An object's dict, refusing a repeated key (json.loads would keep the last one silently)."""
    out: Dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"key {key!r} appears twice")
        out[key] = value
    return out


async def _read_body(http: HttpRequest, limit: int) -> bytes:
    """The body, refusing (before reading it all) one over ``limit`` bytes."""
    declared = http.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge("$", RULE_BODY_TOO_LARGE, f"content-length {declared} > {limit}")
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge("$", RULE_BODY_TOO_LARGE, f"more than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(body: bytes, predictor: Predictor, limits: RequestLimits) -> Request:
    """The checked request of a body (CPU work: run off the event loop)."""
    try:
        obj = json.loads(
            body.decode("utf-8"), parse_constant=_refuse_constant, object_pairs_hook=_unique_keys
        )
    except _DuplicateKey as exc:
        raise RequestError("$", RULE_DUPLICATE_KEY, str(exc)) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError("$", RULE_NOT_JSON, str(exc)) from None
    except RecursionError:  # nesting deeper than the decoder's stack: bad input, never a 500
        raise RequestError("$", RULE_NOT_JSON, "nested too deeply") from None
    request = request_from_json(obj, predictor.schema, limits)
    if request.scenario not in predictor.scorers:
        raise RequestError("scenario", RULE_NOT_SERVED, f"served: {sorted(predictor.scorers)}")
    return request


def create_app(
    predictor: Predictor,
    limits: Optional[RequestLimits] = None,
    max_batch_wait_ms: float = 2,
    max_batch_requests: int = 32,
) -> FastAPI:
    """The FastAPI app of the service (module docstring); its micro-batcher runs while the app
    is served (``app.state.batcher``, started and stopped by the app's lifespan)."""
    limits = limits or RequestLimits()
    batcher = MicroBatcher(predictor, max_batch_wait_ms, max_batch_requests)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.stop)

    app = FastAPI(title="mtfm_rec scoring", lifespan=lifespan)
    app.state.batcher, app.state.limits = batcher, limits

    @app.get("/healthz")
    async def healthz() -> Dict[str, Any]:
        return {"status": "ok", "scenarios": {s: predictor.tasks(s) for s in sorted(predictor.scorers)}}

    @app.post("/score")
    async def score(http: HttpRequest) -> JSONResponse:
        try:
            body = await _read_body(http, limits.max_body_bytes)
            request = await asyncio.to_thread(_parse, body, predictor, limits)
        except RequestTooLarge as exc:
            return _error(413, str(exc), exc.field, exc.rule)
        except RequestError as exc:
            return _error(400, str(exc), exc.field, exc.rule)
        try:
            scores = await asyncio.wrap_future(batcher.submit(request))
        except Exception as exc:  # noqa: BLE001 - a scoring failure answers 500, never crashes
            return _error(500, f"{RULE_SCORING}: {type(exc).__name__}: {exc}", None, RULE_SCORING)
        if not np.isfinite(scores).all():  # JSON has no NaN: say so rather than fail to encode
            return _error(500, f"{RULE_SCORING}: non-finite scores", None, RULE_SCORING)
        tasks = predictor.tasks(request.scenario)
        return JSONResponse({"scenario": request.scenario, "tasks": tasks, "scores": scores.tolist()})

    return app


def serve(
    predictor: Predictor,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: Optional[RequestLimits] = None,
    max_batch_wait_ms: float = 2,
    max_batch_requests: int = 32,
    log_level: str = "info",
) -> None:
    """Serves ``predictor`` with uvicorn until interrupted (one process, one event loop)."""
    import uvicorn

    app = create_app(predictor, limits, max_batch_wait_ms, max_batch_requests)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
