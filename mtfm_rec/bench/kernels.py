"""Kernel benchmarks: HSTU attention, Group LayerNorm, dynamic mask vs their references.

On CUDA: the Triton kernels vs the PyTorch references, plus PyTorch's own attention with the same
mask (SDPA with a boolean mask, FlexAttention with a ``mask_mod``) as *softmax* reference points.
On the CPU: the reference vs the CPU fast paths (``cpp``, ``blocksparse``) and the compiled
candidate (``mtfm_rec.bench.flex_attention``, full runs only); Triton under the interpreter is not a
performance path and is not timed. Batches follow the MTFM layout (H oldest, then R by ts, then T;
per sample N tokens, H : R : T = 2 : 1 : 1), in full (queries = all tokens) and target (queries = T)
variants.

This module is the suite (``run``); its parts live beside it: the attention batches and contenders
in ``mtfm_rec.bench.attention_impls``, the timing and peak-memory harness in
``mtfm_rec.bench.timing``, the report (``render``, ``plot``, re-exported here for
``python -m mtfm_rec.bench``) in ``mtfm_rec.bench.kernels_report``.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Sequence, Tuple

import torch

from mtfm_rec.bench.attention_impls import attention_batch, attention_impls, attention_sizes
from mtfm_rec.bench.kernels_report import plot, render
from mtfm_rec.bench.timing import CpuPeakMemory, FwdBwdStep, measure, time_fn, time_fwd_bwd
from mtfm_rec.kernels.dynamic_mask import dynamic_mask
from mtfm_rec.kernels.group_norm import group_layer_norm

# (target, N, batch) of each attention batch
_Shape = Tuple[bool, int, int]


def _attention_config(cuda: bool) -> Tuple[int, int, int, torch.dtype]:
    """(heads, kv heads, head dim, dtype) of the attention batches."""
    heads, kv_heads, dim = (8, 2, 64) if cuda else (4, 2, 32)
    return heads, kv_heads, dim, torch.bfloat16 if cuda else torch.float32


def _attention_shapes(cuda: bool, quick: bool) -> List[_Shape]:
    """Full then target batches at every N, of max(1, 16384 // N) samples (2048 on the CPU)."""
    return [
        (target, n, max(1, (16384 if cuda else 2048) // n))
        for target in (False, True)
        for n in attention_sizes(cuda, quick)
    ]


def _skipping_row(
    args: Dict[str, Any], cuda: bool, device: str, variant: str, n: int, batch: int
) -> Dict[str, Any]:
    """How much the mask lets the kernel skip: Triton's key tiles computed / visited on CUDA, the
    block-sparse path's chunk pairs kept / total on the CPU."""
    if cuda:
        stats = torch.zeros(2, dtype=torch.int32, device=device)
        from mtfm_rec.kernels.hstu_attention.triton import hstu_attention_triton

        hstu_attention_triton(**args, tile_stats=stats)
        return {
            "variant": variant,
            "n": n,
            "batch": batch,
            "impl": "triton: tiles computed / visited",
            "tiles": stats.tolist(),
        }
    from mtfm_rec.kernels.hstu_attention.blocksparse import hstu_attention_blocksparse

    st: Dict[str, int] = {}
    hstu_attention_blocksparse(**args, stats=st)
    label = "blocksparse: chunk pairs kept / total" + (" (ran the dense reference)" if st["dense"] else "")
    return {
        "variant": variant,
        "n": n,
        "batch": batch,
        "impl": label,
        "tiles": [st["pairs_kept"], st["pairs_total"]],
    }


def _cpu_peak_memory(rows: List[Dict[str, Any]], shapes: Sequence[_Shape], device: str, quick: bool) -> None:
    """Fills ``peak_mib`` of the timed CPU rows, in a second pass after every timing: fixing glibc's
    mmap threshold (what makes the resident set measurable) also makes every large allocation fault
    in fresh pages, which would distort the times."""
    heads, kv_heads, dim, dtype = _attention_config(False)
    memory = CpuPeakMemory()
    for target, n, batch in shapes:
        args = attention_batch(n, batch, heads, kv_heads, dim, target, device, dtype)
        impls = attention_impls(args, n, False, quick)
        for row in rows:
            if (row["variant"], row["n"]) == ("target" if target else "full", n) and row["impl"] in impls:
                row["peak_mib"] = memory.peak_mib(FwdBwdStep(impls[row["impl"]], args))


def _time_attention(shapes: Sequence[_Shape], device: str, quick: bool) -> List[Dict[str, Any]]:
    """One row per (batch, implementation) with its times (and its peak memory on CUDA), then a
    tile-skipping row per batch."""
    cuda = device == "cuda"
    heads, kv_heads, dim, dtype = _attention_config(cuda)
    rows = []
    for target, n, batch in shapes:
        variant = "target" if target else "full"
        # CPU: one fwd+bwd of the padded reference at N = 8192 takes tens of seconds
        reps, warmup = (10, 3) if cuda else (5, 1) if n <= 2048 else (2, 0)
        args = attention_batch(n, batch, heads, kv_heads, dim, target, device, dtype)
        for name, fn in attention_impls(args, n, cuda, quick).items():
            try:
                res = measure(fn, args, device, reps, warmup)
            except torch.cuda.OutOfMemoryError:
                res = {"error": "out of memory"}
            rows.append({"variant": variant, "n": n, "batch": batch, "impl": name, **res})
            print(f"[bench] attention {rows[-1]}", flush=True)
        rows.append(_skipping_row(args, cuda, device, variant, n, batch))
    return rows


def _attention(device: str, quick: bool) -> List[Dict[str, Any]]:
    cuda = device == "cuda"
    shapes = _attention_shapes(cuda, quick)
    rows = _time_attention(shapes, device, quick)
    if not cuda:
        _cpu_peak_memory(rows, shapes, device, quick)
    return rows


def _group_norm(device: str, quick: bool) -> List[Dict[str, Any]]:
    cuda = device == "cuda"
    n, d, groups = (65536 if cuda else 8192), 512, 12
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device, dtype)
    group = torch.randint(0, groups, (n,), generator=gen).sort().values.to(device)
    weight = torch.randn(groups, d, generator=gen).to(device, dtype)
    bias = torch.randn(groups, d, generator=gen).to(device, dtype)
    reps, warmup = (20, 3) if cuda else (5, 1)
    rows = []
    for name in ["reference", "triton"] if cuda else ["reference", "onehot", "cpp"]:
        xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, weight, bias))

        def forward(xs=xs, ws=ws, bs=bs, name=name) -> torch.Tensor:  # bound now: called in this iteration
            for t in (xs, ws, bs):
                t.grad = None
            return group_layer_norm(xs, group, ws, bs, backend=name)

        f, both = time_fwd_bwd(forward, device, reps, warmup)
        rows.append(
            {"impl": name, "n": n, "d": d, "groups": groups, "fwd_ms": f * 1e3, "fwd_bwd_ms": both * 1e3}
        )
    return rows


def _mask(device: str, quick: bool) -> List[Dict[str, Any]]:
    cuda = device == "cuda"
    n = 4096 if cuda else 1024
    args = attention_batch(n, 4, 1, 1, 8, False, device, torch.float32)
    reps, warmup = (20, 3) if cuda else (5, 1)
    rows = []
    for name in ["reference", "triton"] if cuda else ["reference"]:
        build = functools.partial(dynamic_mask, args["queries"], args["keys"], backend=name)
        ms = time_fn(build, device, reps, warmup) * 1e3
        rows.append({"impl": name, "n": n, "batch": 4, "ms": ms})
    return rows


def run(quick: bool) -> Dict[str, Any]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = torch.get_num_threads()
    if device == "cpu":
        # One thread: on a shared, oversubscribed CPU, OpenMP workers waiting on each other made
        # every op 5-10x slower and the numbers meaningless (measured: 853 vs 152 ms).
        torch.set_num_threads(1)
    try:
        return {
            "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
            "quick": quick,
            "threads": torch.get_num_threads(),
            "attention": _attention(device, quick),
            "group_norm": _group_norm(device, quick),
            "dynamic_mask": _mask(device, quick),
        }
    finally:
        torch.set_num_threads(threads)


__all__ = ["run", "render", "plot"]
