"""A bounded load generator for the scoring service (``mtfm_rec.serve.http``).

::

    python -m mtfm_rec.serve.loadtest --url http://127.0.0.1:8000/score \\
        --requests requests.jsonl --n 200 --concurrency 8

sends ``--n`` POSTs (request ``i`` is line ``i mod lines`` of the JSONL file, one JSON request
per line, e.g. written with :func:`mtfm_rec.serve.json_request.request_to_json`) from
``--concurrency`` threads, and prints one JSON object: latency percentiles of the answered
requests, throughput, and how many were sent, answered (200 with one score row per
candidate) and failed. The exit status is 1 when any request failed. Standard library only, so
that it starts fast and runs beside the server without torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, Mapping, Optional, Sequence


def _percentile(sorted_ms: List[float], q: float) -> Optional[float]:
    """Nearest-rank percentile ``q`` (0..100) of ascending values; None when there are none."""
    if not sorted_ms:
        return None
    rank = max(1, min(len(sorted_ms), int(-(-q * len(sorted_ms) // 100))))  # ceil(q% of n)
    return sorted_ms[rank - 1]


def _post(url: str, body: bytes, timeout_s: float) -> Any:
    """The decoded JSON answer of a 200; raises on any other outcome."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def _answered(answer: Any, request: Mapping[str, Any]) -> bool:
    """Whether an answer holds one score row per candidate of ``request``."""
    scores = answer.get("scores") if isinstance(answer, dict) else None
    return isinstance(scores, list) and len(scores) == len(request["candidates"])


def run_load(
    url: str,
    requests_json: Sequence[Mapping[str, Any]],
    num_requests: int,
    concurrency: int,
    timeout_s: float = 30.0,
) -> Dict[str, Any]:
    """Sends ``num_requests`` POSTs to ``url`` from ``concurrency`` threads.

    Args:
        url: the service's ``/score`` URL.
        requests_json: JSON requests; request ``i`` sent is ``requests_json[i % len]``.
        num_requests: POSTs to send in all.
        concurrency: threads sending at once (each waits for its answer before the next).
        timeout_s: per-request timeout.

    Returns:
        ``{p50_ms, p99_ms, requests_per_s, sent, answered, errors, error_samples}``:
        percentiles over answered requests (None when none was), ``answered / wall time``,
        and up to 5 error messages.
    """
    if not requests_json or num_requests < 0 or concurrency < 1:
        raise ValueError(
            f"need requests, num_requests >= 0, concurrency >= 1 ({num_requests=}, {concurrency=})"
        )
    bodies = [json.dumps(r).encode() for r in requests_json]
    lock = threading.Lock()
    state: Dict[str, Any] = {"next": 0, "sent": 0, "answered": 0, "errors": [], "latency_ms": []}

    def worker() -> None:
        while True:
            with lock:
                i = state["next"]
                if i >= num_requests:
                    return
                state["next"] = i + 1
                state["sent"] += 1
            k = i % len(bodies)
            start = time.perf_counter()
            try:
                ok = _answered(_post(url, bodies[k], timeout_s), requests_json[k])
                error = None if ok else f"request {i}: answer without one score row per candidate"
            except urllib.error.HTTPError as exc:  # the service's error answer says why
                error = f"request {i}: HTTP {exc.code}: {exc.read()[:300].decode(errors='replace')}"
            except Exception as exc:  # noqa: BLE001 - every failure is counted, none ends a thread
                error = f"request {i}: {type(exc).__name__}: {exc}"
            elapsed_ms = (time.perf_counter() - start) * 1000.0
            with lock:
                if error is None:
                    state["answered"] += 1
                    state["latency_ms"].append(elapsed_ms)
                else:
                    state["errors"].append(error)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latency = sorted(state["latency_ms"])
    return {
        "p50_ms": _percentile(latency, 50),
        "p99_ms": _percentile(latency, 99),
        "requests_per_s": state["answered"] / wall if wall > 0 else None,
        "sent": state["sent"],
        "answered": state["answered"],
        "errors": len(state["errors"]),
        "error_samples": state["errors"][:5],
    }


def read_jsonl(path: str) -> List[Dict[str, Any]]:
    """The JSON requests of a JSONL file (blank lines skipped)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError as exc:
                    raise SystemExit(f"{path}:{n}: not a JSON line ({exc})") from None
    if not out:
        raise SystemExit(f"{path}: no request")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mtfm_rec.serve.loadtest", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--url", required=True, help="the service's /score URL")
    parser.add_argument("--requests", required=True, help="JSONL file: one JSON request per line")
    parser.add_argument("--n", type=int, default=200, help="requests to send (default 200)")
    parser.add_argument("--concurrency", type=int, default=8, help="sending threads (default 8)")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, seconds")
    args = parser.parse_args(argv)
    result = run_load(args.url, read_jsonl(args.requests), args.n, args.concurrency, args.timeout)
    print(json.dumps(result))
    return 0 if result["errors"] == 0 and result["answered"] == result["sent"] else 1


if __name__ == "__main__":
    sys.exit(main())
