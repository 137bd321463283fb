"""Matmul peak of this machine: the denominator of MFU (model FLOP utilisation).

``python -m mtfm_rec.bench --only peak`` measures square fp32 and bf16 matmuls (``size``^3,
best of ``reps`` after a warm-up) on 1 thread and on all of PyTorch's threads, and on the GPU
when there is one. The best of a few runs, because the machine may be shared: the table is
the attainable matmul rate, and MFU = model FLOP/s / that rate.

The trainer measures a cheaper one at the start of ``fit`` (:func:`matmul_gflops` at
``TRAINER_SIZE``, its own threads and training dtype) unless ``train.peak_gflops`` is set;
measurements are cached per process, so the benchmark suites and repeated trainers measure once.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Dict, List, Optional

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SIZE, QUICK_SIZE, REPS = 2048, 1024, 3
# The trainer's probe: ~2 GFLOP on a CPU (~0.1-0.3 s in fp32); on a GPU 3 x 64 MiB of fp32 operands
# (they count in the run's peak device memory) and 10 matmuls per timed run, so that one launch
# is not what is timed.
TRAINER_SIZE = {"cpu": 1024, "cuda": 4096}
INNER = {"cpu": 1, "cuda": 10}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(
    dtype: str = "fp32",
    threads: Optional[int] = None,
    size: int = SIZE,
    reps: int = REPS,
    device: str = "cpu",
) -> float:
    """Best GFLOP/s of a ``[size, size] @ [size, size]`` matmul (2 size^3 FLOPs) over ``reps`` runs,
    measured once per process for each set of arguments.

    Args:
        dtype: ``"fp32"`` or ``"bf16"``.
        threads: ``torch.set_num_threads`` for the measurement (restored after); None: as is.
            Ignored on a GPU.
        size: the matrices' side.
        reps: timed runs after one warm-up.
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:1"``, ...).
    """
    if dtype not in DTYPES:
        raise ValueError(f"matmul peak: dtype {dtype!r} unknown; choose one of {sorted(DTYPES)}")
    if threads is None and torch.device(device).type == "cpu":
        threads = torch.get_num_threads()  # the cache must not serve another thread count
    return _measure(dtype, threads, size, reps, str(device))


@functools.lru_cache(maxsize=None)
def _measure(dtype: str, threads: Optional[int], size: int, reps: int, device: str) -> float:
    dev = torch.device(device)
    before = torch.get_num_threads()
    if threads is not None and dev.type == "cpu":
        torch.set_num_threads(threads)
    inner = INNER["cuda" if dev.type == "cuda" else "cpu"]
    try:
        # Constant operands: no RNG is drawn (the trainer's random streams stay as seeded), and
        # dense matmul speed does not depend on the values.
        a = torch.full((size, size), 1.0 / size, dtype=DTYPES[dtype], device=dev)
        b = torch.full((size, size), 1.0, dtype=DTYPES[dtype], device=dev)
        best = float("inf")
        for i in range(reps + 1):
            _sync(dev)
            start = time.perf_counter()
            for _ in range(inner):
                torch.mm(a, b)
            _sync(dev)
            if i:  # the first run warms up the kernel and the allocator
                best = min(best, time.perf_counter() - start)
        del a, b
    finally:
        torch.set_num_threads(before)
    return 2 * size**3 * inner / best / 1e9


def trainer_peak_gflops(device: torch.device, bf16: bool) -> float:
    """The trainer's start-up peak: its own threads, its training dtype, ``TRAINER_SIZE``."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    return matmul_gflops("bf16" if bf16 else "fp32", None, TRAINER_SIZE[kind], REPS, str(device))


def run(quick: bool) -> Dict[str, Any]:
    """The peak table: fp32 / bf16 x 1 / all threads on the CPU (and the GPU's, if any)."""
    size = QUICK_SIZE if quick else SIZE
    load = os.getloadavg()[0]  # on a shared machine: about how many cores others were using
    all_threads = torch.get_num_threads()
    rows: List[Dict[str, Any]] = []
    for dtype in DTYPES:
        for threads in sorted({1, all_threads}):
            gflops = matmul_gflops(dtype, threads, size, REPS, "cpu")
            rows.append({"device": "cpu", "dtype": dtype, "threads": threads, "size": size, "gflops": gflops})
            print(f"[bench.peak] cpu {dtype} {threads} thread(s): {gflops:.1f} GFLOP/s", flush=True)
    if torch.cuda.is_available():
        gpu_size = TRAINER_SIZE["cuda"]
        for dtype in DTYPES:
            gflops = matmul_gflops(dtype, None, gpu_size, REPS, "cuda")
            rows.append(
                {"device": "cuda", "dtype": dtype, "threads": None, "size": gpu_size, "gflops": gflops}
            )
            print(f"[bench.peak] cuda {dtype}: {gflops:.1f} GFLOP/s", flush=True)
    return {"quick": quick, "reps": REPS, "load_average": load, "rows": rows}


def render(result: Dict[str, Any]) -> str:
    lines = [
        f"Square matmuls (`torch.mm`, 2 n^3 FLOPs), best of {result['reps']} after a warm-up"
        f"{' (quick mode)' if result['quick'] else ''}: the attainable rate that MFU (model FLOP/s / "
        "peak) divides by. The CPU may be shared with other jobs (1-minute load average before the "
        f"measurement: {result.get('load_average', float('nan')):.2f}), so these are lower bounds of an "
        "idle machine's peak. The trainer measures its own at the start of `fit` (`train.peak_gflops`, "
        "docs/TRAINING.md).",
        "",
        "| device | dtype | threads | n | GFLOP/s |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        threads = "-" if r["threads"] is None else r["threads"]
        lines.append(f"| {r['device']} | {r['dtype']} | {threads} | {r['size']} | {r['gflops']:.1f} |")
    return "\n".join(lines) + "\n"
