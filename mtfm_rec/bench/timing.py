"""Timing and peak-memory harness of the kernel benchmarks (``mtfm_rec.bench.kernels``).

Times are wall time on CUDA and process CPU time on the (shared, one-thread) CPU; a summary is
the median on CUDA and the minimum on the CPU. Peak memory is the CUDA allocator's peak, or on the
CPU the resident high-water mark (:class:`CpuPeakMemory`).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _clock(device: str) -> Callable[[], float]:
    """Wall time on CUDA. On the CPU (one thread) the process CPU time: other jobs share the
    cores, and CPU time does not count the time this process waits for them (wall time varied
    2x between identical runs)."""
    return time.perf_counter if device == "cuda" else time.process_time


def _summary(samples: List[float], device: str) -> float:
    """Median on CUDA; minimum on the shared CPU, where the noise only ever adds time."""
    return statistics.median(samples) if device == "cuda" else min(samples)


def time_fn(fn: Callable[[], Any], device: str, reps: int, warmup: int) -> float:
    """Seconds of ``fn`` (see :func:`_clock`, :func:`_summary`)."""
    clock = _clock(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(reps):
        t0 = clock()
        fn()
        _sync(device)
        samples.append(clock() - t0)
    return _summary(samples, device)


def time_fwd_bwd(
    forward: Callable[[], torch.Tensor], device: str, reps: int, warmup: int
) -> Tuple[float, float]:
    """Seconds of the training forward and of forward + backward, timed in the same steps (so
    the forward is always the part of its step it really was)."""
    clock = _clock(device)
    fwd, both = [], []
    for rep in range(warmup + reps):
        t0 = clock()
        out = forward()
        _sync(device)
        t1 = clock()
        out.backward(torch.ones_like(out))
        _sync(device)
        t2 = clock()
        del out
        if rep >= warmup:
            fwd.append(t1 - t0)
            both.append(t2 - t0)
    return _summary(fwd, device), _summary(both, device)


class CpuPeakMemory:
    """Peak resident memory of this process above a baseline, on Linux.

    glibc serves large blocks from ``mmap`` and unmaps them on free once ``M_MMAP_THRESHOLD`` is
    fixed (by default the threshold grows with freed sizes, and freed tensors then stay in the
    heap, resident, where the next run reuses them unseen); ``malloc_trim`` returns what the heap
    still holds before each measurement. The resident set then tracks the live tensors, and the
    kernel's high-water mark (``VmHWM``) is reset through ``/proc/self/clear_refs``. Create
    it after the timings: the fixed threshold makes every large allocation fault in fresh pages.
    Unavailable (``None``) off Linux / glibc.
    """

    def __init__(self) -> None:
        self.ok = False
        try:
            import ctypes

            self._libc = ctypes.CDLL("libc.so.6")
            m_mmap_threshold = -3
            self.ok = bool(self._libc.mallopt(m_mmap_threshold, 1 << 20)) and self._read("VmHWM") > 0
        except (OSError, AttributeError):
            pass

    @staticmethod
    def _read(field: str) -> float:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB -> MiB
        return 0.0

    def peak_mib(self, fn: Callable[[], Any]) -> Optional[float]:
        if not self.ok:
            return None
        self._libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current resident set
        base = self._read("VmRSS")
        fn()
        return self._read("VmHWM") - base


class FwdBwdStep:
    """Forward (+ backward) of an attention callable on its own leaf copies of q, k, v."""

    def __init__(self, fwd: Callable[[Dict[str, Any]], torch.Tensor], args: Dict[str, Any]) -> None:
        self.fwd = fwd
        self.leaves = {n: args[n].detach().clone().requires_grad_() for n in "qkv"}
        self.inputs = {**args, **self.leaves}

    def forward(self) -> torch.Tensor:
        for t in self.leaves.values():
            t.grad = None
        return self.fwd(self.inputs)

    def __call__(self) -> None:
        out = self.forward()
        out.backward(torch.ones_like(out))


def measure(
    fwd: Callable[[Dict[str, Any]], torch.Tensor], args: Dict[str, Any], device: str, reps: int, warmup: int
) -> Dict[str, Any]:
    """Training-forward ms, fwd+bwd ms and, on CUDA, the allocator's peak memory (MiB above the
    inputs, gradients of q, k, v included) of one fwd+bwd step. On the CPU the peak is measured in
    a separate pass (:class:`CpuPeakMemory`)."""
    step = FwdBwdStep(fwd, args)
    fwd_s, both_s = time_fwd_bwd(step.forward, device, reps, warmup)
    peak = None
    if device == "cuda":
        for t in step.leaves.values():
            t.grad = None
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return {"fwd_ms": fwd_s * 1e3, "fwd_bwd_ms": both_s * 1e3, "peak_mib": peak}
