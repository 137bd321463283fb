"""Training benchmarks: throughput on 1 and 2 ranks, data-wait share and peak memory (model
quality is the ``quality`` suite).

Every measurement is a real ``python -m mtfm_rec.train`` job (torchrun for 2 ranks) on a fresh
synthetic dataset (``mtfm_rec.data.synthetic``), read back from the run directory
(``fit_summary.json``, ``log.csv``, ``metrics.json``).

* Throughput: global samples/s over the steady-state log windows (the first window, which
  holds the pipeline's tracing and warm-up, is left out), with the same per-rank batch on 1 and
  2 ranks. ``data_wait_share``: time the step loop spent blocked on the loader / wall time.
  ``model_gflops_per_s`` / ``mfu``: the trainer's ``perf/model_gflops_per_s`` and ``perf/mfu``
  (useful model FLOPs of ``mtfm_rec.model.flops`` over the matmul peak the job measured at its
  start, summed over its ranks), same windows.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Sequence

from mtfm_rec.training.logger import read_log

CONFIG = "configs/synthetic.yaml"  # throughput


def run_training_job(
    raw: str, run_dir: str, nproc: int, overrides: Sequence[str], cache: str, config: str = CONFIG
) -> Dict[str, Any]:
    """Runs one training job; returns its fit summary, log series and test metrics."""
    base = [
        "--config",
        config,
        f"data.raw={raw}",
        f"data.cache_dir={cache}",
        f"train.run_dir={run_dir}",
        "train.resume=never",
        "train.progress_bar=false",
        "train.tensorboard=false",
        "train.plots=false",
        "train.sharding.print_plan=false",
    ]
    if nproc == 1:
        cmd = [sys.executable, "-m", "mtfm_rec.train"]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "mtfm_rec.train",
        ]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc)))
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run(cmd + base + list(overrides), env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"training job failed ({' '.join(overrides)}):\n{proc.stderr[-4000:]}")
    with open(os.path.join(run_dir, "fit_summary.json")) as fh:
        summary = json.load(fh)
    metrics = {}
    path = os.path.join(run_dir, "metrics.json")
    if os.path.exists(path):
        with open(path) as fh:
            metrics = json.load(fh)
    return {"summary": summary, "log": read_log(run_dir), "metrics": metrics}


def _steady(series: List[Any]) -> float:
    values = [v for _, v in series[1:]] or [v for _, v in series]
    return float(statistics.median(values)) if values else float("nan")


def run(quick: bool) -> Dict[str, Any]:
    users, days = (300, 5) if quick else (1000, 6)
    tput_steps = 30 if quick else 80
    out: Dict[str, Any] = {
        "dataset": {"generator": "mtfm_rec.data.synthetic", "users": users, "days": days},
    }
    with tempfile.TemporaryDirectory() as tmp:
        from mtfm_rec.data.synthetic import generate

        raw = os.path.join(tmp, "raw")
        generate(raw, num_users=users, num_days=days, seed=11)
        cache = os.path.join(tmp, "cache")

        throughput = []
        for nproc in (1, 2):
            job = run_training_job(
                raw,
                os.path.join(tmp, f"tput{nproc}"),
                nproc,
                [
                    f"train.max_steps={tput_steps}",
                    "train.log_every=10",
                    "train.eval_every=0",
                    "train.eval_splits=[]",
                    "data.loader.batch_size=32",
                    "train.max_minutes=0",
                ],
                cache,
            )
            s = job["summary"]
            throughput.append(
                {
                    "ranks": nproc,
                    "batch_per_rank": 32,
                    "samples_per_s": _steady(job["log"].get("perf/samples_per_s", [])),
                    "data_wait_share": _steady(job["log"].get("perf/data_wait_share", [])),
                    "model_gflops_per_s": _steady(job["log"].get("perf/model_gflops_per_s", [])),
                    "mfu": _steady(job["log"].get("perf/mfu", [])),
                    "peak_gflops": s.get("peak_gflops"),
                    "peak_host_rss_gb": s.get("peak_host_rss_gb"),
                    "peak_device_memory_gb": s.get("peak_device_memory_gb"),
                }
            )
            row = throughput[-1]
            print(
                f"[bench.training] {nproc} rank(s): {row['samples_per_s']:.1f} samples/s, "
                f"{row['model_gflops_per_s']:.2f} model GFLOP/s, MFU {100 * row['mfu']:.2f} %",
                flush=True,
            )
        out["throughput"] = throughput

    return out


def render(result: Dict[str, Any]) -> str:
    ds = result["dataset"]
    lines = [
        f"Synthetic data ({ds['users']} users x {ds['days']} days, `{ds['generator']}`), "
        f"`{CONFIG}` model, gloo on the CPU / NCCL on GPUs.",
    ]
    mfu = all("mfu" in row for row in result["throughput"])  # older results lack the MFU columns
    if mfu:
        lines += [
            "",
            "MFU: the trainer's `perf/mfu`, useful model FLOP/s (`mtfm_rec.model.flops`, forward + backward "
            "= 3 x forward) over the fp32 matmul peak each job measured at its start, summed over ranks "
            "(`mtfm_rec.bench.peak`).",
        ]
    lines += [
        "",
        "| ranks | batch / rank | samples/s | data wait share | peak host RSS (GiB) | peak device (GiB) |"
        + (" model GFLOP/s | matmul peak GFLOP/s | MFU |" if mfu else ""),
        "|---|---|---|---|---|---|" + ("---|---|---|" if mfu else ""),
    ]
    for row in result["throughput"]:
        dev = row.get("peak_device_memory_gb")
        cells = ""
        if mfu:
            peak = row.get("peak_gflops")
            cells = (
                f" {row['model_gflops_per_s']:.2f} | {'-' if peak is None else f'{peak:.0f}'} | "
                f"{100 * row['mfu']:.2f} % |"
            )
        lines.append(
            f"| {row['ranks']} | {row['batch_per_rank']} | {row['samples_per_s']:.1f} | "
            f"{100 * row['data_wait_share']:.1f} % | {row['peak_host_rss_gb']:.2f} | "
            f"{'-' if dev is None else f'{dev:.2f}'} |" + cells
        )
    return "\n".join(lines) + "\n"
