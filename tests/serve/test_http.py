"""The HTTP service (mtfm_rec.serve.http) against a real uvicorn server on 127.0.0.1: parity
with ``Predictor.score``, 400/413/500 answers, micro-batching of concurrent requests, and the
load generator (mtfm_rec.serve.loadtest) run in a second process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import uvicorn
from serve_helpers import MULTI_HOT, small_model

from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.model.examples import demo_schema
from mtfm_rec.serve import http
from mtfm_rec.serve import json_request as jr
from mtfm_rec.serve.json_request import RequestLimits, request_from_json
from mtfm_rec.serve.predictor import Predictor, eager_scorer
from mtfm_rec.serve.request import Request
from mtfm_rec.serve.subgraph import extract_subgraph

SCHEMA = demo_schema(num_scenarios=3)
SERVED = ("sc0", "sc1")  # sc2 is declared but not served
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_predictor(schema: DatasetSchema, scenarios: Sequence[str]) -> Predictor:
    model = small_model(schema)
    return Predictor(schema, {s: eager_scorer(extract_subgraph(model, s)) for s in scenarios})


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return make_predictor(SCHEMA, SERVED)


class Recorder(Predictor):
    """The predictor, recording each ``score`` call's user ids and each request's scores; it can
    hold its calls at a gate, and fail every call holding user ``fail_user``."""

    def __init__(self, base: Predictor) -> None:
        super().__init__(base.schema, base.scorers, base.max_batch_requests)
        self.calls: List[List[int]] = []
        self.outputs: Dict[int, np.ndarray] = {}
        self.gate: Optional[threading.Event] = None
        self.entered = threading.Event()
        self.fail_user: Optional[int] = None

    def score(self, requests: Sequence[Request]) -> List[np.ndarray]:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(30), "the test never opened the gate"
        self.calls.append([r.user_id for r in requests])
        if any(r.user_id == self.fail_user for r in requests):
            raise RuntimeError(f"boom: user {self.fail_user}")
        out = super().score(requests)
        self.outputs.update({r.user_id: o for r, o in zip(requests, out)})
        return out


@contextmanager
def running(app: Any) -> Iterator[str]:
    """Serves ``app`` with uvicorn in a thread on a free 127.0.0.1 port; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, "the server to start")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def wait_for(condition: Any, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@contextmanager
def service(predictor: Predictor, **kwargs: Any) -> Iterator[Tuple[str, Recorder, Any]]:
    recorder = Recorder(predictor)
    app = http.create_app(recorder, **kwargs)
    with running(app) as url:
        yield url, recorder, app


def post(url: str, body: Any, raw: bool = False) -> Tuple[int, Any]:
    """(status, decoded JSON answer) of a POST (``raw``: ``body`` is sent as it is)."""
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def make_json(
    scenario: str, user_id: int, seed: int, m: int = 4, length: int = 5, schema: DatasetSchema = SCHEMA
) -> Dict[str, Any]:
    """A valid request with random ids (some out of range or null), bags and contexts."""
    rng = np.random.default_rng(seed)
    spec, ts = schema.scenario(scenario), 10_000

    def one_id(size: int) -> Any:
        return None if rng.random() < 0.1 else int(rng.integers(-size, 2 * size))

    context = {}
    for q in schema.sequences:
        n = int(rng.integers(0, length + 1))
        times = sorted(int(t) for t in rng.integers(0, ts, n))
        context[q.name] = {"ts": times, **{f: [one_id(s) for _ in times] for f, s in q.features.items()}}
    cands = []
    for j in range(m):
        c: Dict[str, Any] = {col: one_id(n) for g, col, n in spec.categorical() if g != "user"}
        c.update({col: [one_id(n) for _ in range(j % 3)] for g, col, n, _ in spec.multi_hot() if g != "user"})
        c.update({col: float(rng.normal() * 5) for col in spec.dense_features})
        cands.append(c)
    user: Dict[str, Any] = {c: one_id(n) for g, c, n in spec.categorical() if g == "user"}
    user.update({c: [one_id(n), one_id(n)] for g, c, n, _ in spec.multi_hot() if g == "user"})
    return {
        "scenario": scenario,
        "user_id": user_id,
        "ts": ts,
        "user": user,
        "context": context,
        "candidates": cands,
    }


def direct(predictor: Predictor, obj: Dict[str, Any]) -> np.ndarray:
    return predictor.score([request_from_json(obj, predictor.schema)])[0]


# ---------------------------------------------------------------------------- answers
def test_healthz(predictor: Predictor) -> None:
    with service(predictor) as (url, _, _):
        with urllib.request.urlopen(url + "/healthz", timeout=30) as resp:
            assert resp.status == 200
            assert json.loads(resp.read()) == {
                "status": "ok",
                "scenarios": {"sc0": ["click"], "sc1": ["click", "order"]},
            }


def test_scores_equal_predictor_score(predictor: Predictor) -> None:
    with service(predictor) as (url, recorder, _):
        for i, scenario in enumerate(["sc0", "sc1", "sc1", "sc0"]):
            obj = make_json(scenario, user_id=i, seed=i, m=1 + i)
            status, answer = post(url + "/score", obj)
            assert status == 200, answer
            assert answer["scenario"] == scenario and answer["tasks"] == SCHEMA.scenario(scenario).tasks
            scores = np.array(answer["scores"], dtype=np.float32)
            assert scores.shape == (1 + i, len(answer["tasks"]))
            np.testing.assert_array_equal(scores, direct(predictor, obj))  # exact: float32 survives JSON
        assert recorder.calls == [[0], [1], [2], [3]]


@pytest.mark.parametrize("scenario", ["a", "b"])
def test_multi_hot_scores_equal_predictor_score(scenario: str) -> None:
    predictor = make_predictor(MULTI_HOT, ["a", "b"])
    with service(predictor) as (url, _, _):
        for i in range(2):
            obj = make_json(scenario, user_id=i, seed=i, schema=MULTI_HOT)
            status, answer = post(url + "/score", obj)
            assert status == 200, answer
            np.testing.assert_array_equal(np.array(answer["scores"], np.float32), direct(predictor, obj))


# ---------------------------------------------------------------------------- errors
BAD_BODIES = [
    (b"{not json", "$", http.RULE_NOT_JSON),
    (b'{"scenario": "sc0", "user_id": 1, "ts": NaN, "candidates": [{}]}', "$", http.RULE_NOT_JSON),
    (b"\xff\xfe{}", "$", http.RULE_NOT_JSON),
    (b"", "$", http.RULE_NOT_JSON),
    (b"[1, 2]", "$", jr.RULE_OBJECT),
    (b"[" * 100_000, "$", http.RULE_NOT_JSON),
    (
        b'{"scenario": "sc0", "user_id": 1, "ts": 1, "ts": 2, "candidates": [{}]}',
        "$",
        http.RULE_DUPLICATE_KEY,
    ),
    (
        b'{"scenario": "sc0", "user_id": 1, "ts": 1, "candidates": [{"item": 1, "item": 1}]}',
        "$",
        http.RULE_DUPLICATE_KEY,
    ),
    (b'{"requests": []}', "requests", jr.RULE_UNKNOWN),
    (b'{"scenario": "sc0", "user_id": 1, "ts": "x", "candidates": [{}]}', "ts", jr.RULE_INT),
    (
        b'{"scenario": "sc0", "user_id": 1, "ts": 1, "candidates": [{"zzz": 1}]}',
        "candidates[0].zzz",
        jr.RULE_UNKNOWN,
    ),
    (
        b'{"scenario": "sc2", "user_id": 1, "ts": 1, "candidates": [{"price0": 1, "price1": 2}]}',
        "scenario",
        http.RULE_NOT_SERVED,
    ),
    (b'{"scenario": "sc9", "user_id": 1, "ts": 1, "candidates": [{}]}', "scenario", "unknown scenario"),
]


def test_bad_requests_answer_400(predictor: Predictor) -> None:
    with service(predictor) as (url, recorder, _):
        for body, field, rule in BAD_BODIES:
            status, answer = post(url + "/score", body, raw=True)
            assert status == 400, (body, answer)
            assert (answer["field"], answer["rule"]) == (field, rule), body
            assert answer["error"].startswith(f"{field}: {rule}")
        assert recorder.calls == []  # nothing bad reaches the model
        assert post(url + "/score", make_json("sc0", 1, 0))[0] == 200


def test_oversize_requests_answer_413(predictor: Predictor) -> None:
    limits = RequestLimits(max_candidates=3, max_context=4, max_body_bytes=4096)
    with service(predictor, limits=limits) as (url, recorder, _):
        too_many = make_json("sc0", 1, 0, m=4, length=4)
        status, answer = post(url + "/score", too_many)
        assert (status, answer["field"], answer["rule"]) == (413, "candidates", jr.RULE_TOO_MANY_CANDIDATES)
        too_long = make_json("sc0", 1, 0, m=1, length=4)
        too_long["context"]["orders"] = {"ts": [1] * 5, "item": [1] * 5, "cat": [1] * 5}
        status, answer = post(url + "/score", too_long)
        assert (status, answer["field"], answer["rule"]) == (
            413,
            "context.orders.ts",
            jr.RULE_CONTEXT_TOO_LONG,
        )
        body = json.dumps({**make_json("sc0", 1, 0, m=1, length=4), "pad": "x" * 5000}).encode()
        status, answer = post(url + "/score", body, raw=True)  # with a content-length
        assert (status, answer["field"], answer["rule"]) == (413, "$", http.RULE_BODY_TOO_LARGE)
        chunks = iter([body[:3000], body[3000:]])  # no content-length: chunked, counted as read
        status, answer = post(url + "/score", chunks, raw=True)
        assert (status, answer["field"], answer["rule"]) == (413, "$", http.RULE_BODY_TOO_LARGE)
        assert recorder.calls == []
        assert post(url + "/score", make_json("sc0", 1, 0, m=3, length=4))[0] == 200


def test_scoring_failure_answers_500_and_service_keeps_serving(predictor: Predictor) -> None:
    with service(predictor) as (url, recorder, _):
        recorder.fail_user = 666
        status, answer = post(url + "/score", make_json("sc0", 666, 0))
        assert status == 500 and answer["rule"] == http.RULE_SCORING
        assert "RuntimeError: boom: user 666" in answer["error"]
        obj = make_json("sc1", 1, 1)
        status, answer = post(url + "/score", obj)
        assert status == 200
        np.testing.assert_array_equal(np.array(answer["scores"], np.float32), direct(predictor, obj))


def concurrently(url: str, objs: Sequence[Dict[str, Any]]) -> Tuple[List[threading.Thread], Dict[int, Any]]:
    """Starts one thread per request; answers land in the returned dict by user id."""
    answers: Dict[int, Any] = {}

    def send(obj: Dict[str, Any]) -> None:
        answers[obj["user_id"]] = post(url + "/score", obj)

    threads = [threading.Thread(target=send, args=(obj,)) for obj in objs]
    for t in threads:
        t.start()
    return threads, answers


def held_batches(
    url: str, recorder: Recorder, app: Any, first: Dict[str, Any], rest: List[Dict[str, Any]]
) -> Dict[int, Any]:
    """Sends ``first``, holds its scoring until ``rest`` are all queued, then lets them through:
    the batches are then known (``first`` alone, then ``rest`` in calls of max_batch_requests)."""
    recorder.gate = threading.Event()
    threads, answers = concurrently(url, [first])
    wait_for(recorder.entered.is_set, "the first request to be scored")
    more, more_answers = concurrently(url, rest)
    wait_for(lambda: app.state.batcher.pending == len(rest), "every request to be queued")
    recorder.gate.set()
    for t in threads + more:
        t.join(60)
    return {**answers, **more_answers}


def test_concurrent_requests_are_micro_batched(predictor: Predictor) -> None:
    objs = [make_json(["sc0", "sc1"][i % 2], user_id=100 + i, seed=i, m=1 + i % 3) for i in range(8)]
    with service(predictor, max_batch_requests=4) as (url, recorder, app):
        answers = held_batches(url, recorder, app, objs[0], objs[1:])
        assert [len(c) for c in recorder.calls] == [1, 4, 3]  # one score call per batch, capped at 4
        assert sorted(u for c in recorder.calls for u in c) == [o["user_id"] for o in objs]
    for obj in objs:
        status, answer = answers[obj["user_id"]]
        assert status == 200 and answer["scenario"] == obj["scenario"]
        scores = np.array(answer["scores"], np.float32)
        np.testing.assert_array_equal(scores, recorder.outputs[obj["user_id"]])  # its own rows
        # scored beside others (padded): the same scores as alone, up to float rounding
        np.testing.assert_allclose(scores, direct(predictor, obj), rtol=1e-5, atol=1e-6)


def test_a_failing_request_fails_alone_in_its_batch(predictor: Predictor) -> None:
    objs = [make_json("sc0", user_id=u, seed=u) for u in (1, 666, 2, 3)]
    with service(predictor) as (url, recorder, app):
        recorder.fail_user = 666
        answers = held_batches(url, recorder, app, objs[0], objs[1:])
        assert sorted(recorder.calls[1]) == [2, 3, 666]  # the batch failed: each request alone
        assert sorted(recorder.calls[2:]) == [[2], [3], [666]]
    assert {u: a[0] for u, a in answers.items()} == {1: 200, 2: 200, 3: 200, 666: 500}
    for obj in objs:
        if obj["user_id"] != 666:
            scores = np.array(answers[obj["user_id"]][1]["scores"], np.float32)
            np.testing.assert_allclose(scores, direct(predictor, obj), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- load
def test_load_generator_in_a_second_process_loses_nothing(predictor: Predictor, tmp_path: Any) -> None:
    path = tmp_path / "requests.jsonl"
    objs = [make_json(["sc0", "sc1"][i % 2], user_id=i, seed=i) for i in range(10)]
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    with service(predictor) as (url, recorder, _):
        cmd = [sys.executable, "-m", "mtfm_rec.serve.loadtest", "--url", url + "/score"]
        cmd += ["--requests", str(path), "--n", "40", "--concurrency", "4"]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr + done.stdout
        result = json.loads(done.stdout)
        assert (result["sent"], result["answered"], result["errors"]) == (40, 40, 0), result
        assert sum(len(c) for c in recorder.calls) == 40  # every POST reached the model once
        assert set(result) >= {"p50_ms", "p99_ms", "requests_per_s"}
