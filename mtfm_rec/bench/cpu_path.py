"""CPU training speed: the fused C++ path (``model.attention_backend=cpp``, the CPU default of
``auto``) against the previous default (``prefix``), same model, data, batch and seed, one run.

Both are real ``python -m mtfm_rec.train`` jobs of ``configs/mtfm_small.yaml`` on one fixed
synthetic dataset (``mtfm_rec.data.synthetic``, 3,000 users x 10 days, seed 0, the size the
speed issue profiled), one rank on all cores, in alternating rounds (prefix, cpp, prefix, cpp) so a
neighbour's load on a shared machine falls on both. Samples/s and MFU are the medians of the
steady-state log windows of all rounds (each job's first window, with the pipeline's tracing, is
left out).
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
from typing import Any, Dict, List

from mtfm_rec.bench.training import run_training_job

CONFIG = "configs/mtfm_small.yaml"

PATHS = (
    ("prefix", "previous CPU path: padded PyTorch, reference Group LayerNorm"),
    ("cpp", "fused C++ attention and Group LayerNorm kernels, scatter-free gathers"),
)


ROUNDS = 2  # alternating rounds: a neighbour's load on the shared machine hits both paths alike


def _median(points: List[Any]) -> float:
    """Median value of (step, value) log points."""
    return float(statistics.median(v for _, v in points)) if points else math.nan


def _job(raw: str, tmp: str, backend: str, steps: int, rnd: int) -> Dict[str, Any]:
    return run_training_job(
        raw,
        os.path.join(tmp, f"{backend}-{rnd}"),
        1,
        [
            f"model.attention_backend={backend}",
            f"train.max_steps={steps}",
            "train.log_every=25",
            "train.eval_every=0",
            "train.eval_splits=[]",
            "train.max_minutes=0",
        ],
        os.path.join(tmp, "cache"),
        config=CONFIG,
    )


def run(quick: bool) -> Dict[str, Any]:
    users, days, steps = (600, 4, 60) if quick else (3000, 10, 200)
    rounds = 1 if quick else ROUNDS
    out: Dict[str, Any] = {
        "dataset": {"users": users, "days": days, "seed": 0},
        "steps": steps,
        "rounds": rounds,
        "rows": [],
    }
    series: Dict[str, Dict[str, List[Any]]] = {b: {"samples": [], "gflops": [], "mfu": []} for b, _ in PATHS}
    summaries: Dict[str, List[Dict[str, Any]]] = {b: [] for b, _ in PATHS}
    with tempfile.TemporaryDirectory() as tmp:
        from mtfm_rec.data.synthetic import generate

        raw = os.path.join(tmp, "raw")
        generate(raw, num_users=users, num_days=days, seed=0)
        for rnd in range(rounds):
            for backend, _ in PATHS:
                job = _job(raw, tmp, backend, steps, rnd)
                log = job["log"]
                # the steady windows of every round (the first window, with the tracing, left out)
                series[backend]["samples"] += log.get("perf/samples_per_s", [])[1:]
                series[backend]["gflops"] += log.get("perf/model_gflops_per_s", [])[1:]
                series[backend]["mfu"] += log.get("perf/mfu", [])[1:]
                summaries[backend].append(job["summary"])
    for backend, what in PATHS:
        s = series[backend]
        row = {
            "backend": backend,
            "what": what,
            "samples_per_s": _median(s["samples"]),
            "model_gflops_per_s": _median(s["gflops"]),
            "mfu": _median(s["mfu"]),
            "peak_gflops": statistics.median(j.get("peak_gflops", math.nan) for j in summaries[backend]),
            "peak_host_rss_gb": max(j.get("peak_host_rss_gb", math.nan) for j in summaries[backend]),
        }
        out["rows"].append(row)
        print(
            f"[bench.cpu_path] {backend}: {row['samples_per_s']:.1f} samples/s, MFU {100 * row['mfu']:.2f} %",
            flush=True,
        )
    return out


def render(result: Dict[str, Any]) -> str:
    ds, rows = result["dataset"], result["rows"]
    base = next(r for r in rows if r["backend"] == "prefix")["samples_per_s"]
    lines = [
        f"`{CONFIG}` on synthetic data ({ds['users']} users x {ds['days']} days, seed {ds['seed']}), "
        f"{result['steps']} steps, 1 rank, batch 64, "
        f"{result.get('rounds', 1)} alternating round(s) per path; medians "
        "of the steady-state log windows of all rounds. MFU: useful "
        "model FLOP/s over the fp32 matmul peak the job measured at its start.",
        "",
        "| `model.attention_backend` | what | samples/s | vs prefix | model GFLOP/s | fp32 peak GFLOP/s | MFU"
        " | peak RSS (GiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['backend']}` | {r['what']} | {r['samples_per_s']:.0f} "
            f"| {r['samples_per_s'] / base:.2f}x | "
            f"{r['model_gflops_per_s']:.1f} | {r['peak_gflops']:.0f} | {100 * r['mfu']:.1f} % | "
            f"{r['peak_host_rss_gb']:.2f} |"
        )
    return "\n".join(lines) + "\n"
