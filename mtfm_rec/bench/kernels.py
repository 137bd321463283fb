"""Kernel benchmarks: HSTU attention, Group LayerNorm, dynamic mask vs their references.

On CUDA: the Triton kernels vs the PyTorch references, plus PyTorch's own attention with the same
mask (SDPA with a boolean mask, FlexAttention with a ``mask_mod``) as *softmax* reference points.
On the CPU: the reference vs the CPU fast paths (``cpp``, ``blocksparse``) and the compiled
candidate (``mtfm_rec.bench.flex_attention``, full runs only); Triton under the interpreter is not a
performance path and is not timed. Batches follow the MTFM layout (H oldest, then R by ts, then T;
per sample N tokens, H : R : T = 2 : 1 : 1), in full (queries = all tokens) and target (queries = T)
variants.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from mtfm_rec.kernels.dynamic_mask import dynamic_mask
from mtfm_rec.kernels.group_norm import group_layer_norm
from mtfm_rec.kernels.hstu_attention import dynamic_mask_padded, hstu_attention
from mtfm_rec.kernels.jagged import KeySet, QuerySet, TokenKind

SOFTMAX = "PyTorch attention, same mask, softmax"


# --------------------------------------------------------------------------- inputs
def _attention_batch(
    n: int, batch: int, heads: int, kv_heads: int, dim: int, target: bool, device: str, dtype: torch.dtype
) -> Dict[str, Any]:
    lh, lr = n // 2, n // 4
    lt = n - lh - lr
    gen = torch.Generator().manual_seed(n)
    # History spans [0, 2 lh), real-time [n, n + lr) by ts, exposures among the real-time tail.
    exposure_ts = n + lr // 2 + torch.randint(0, lr, (lt,), generator=gen)
    ts = torch.cat([torch.arange(lh) * 2, n + torch.arange(lr), exposure_ts])
    kind = torch.cat(
        [
            torch.full((lh,), TokenKind.HISTORY),
            torch.full((lr,), TokenKind.REALTIME),
            torch.full((lt,), TokenKind.TARGET),
        ]
    ).to(torch.int8)
    kv_ts, kv_kind = ts.repeat(batch).to(device), kind.repeat(batch).to(device)
    kv_offsets = (torch.arange(batch + 1, dtype=torch.int64) * n).to(device)
    rows = torch.arange(batch * n, device=device)
    is_t = kv_kind == TokenKind.TARGET
    q_rows = rows[is_t] if target else rows
    q_offsets = (torch.arange(batch + 1, dtype=torch.int64) * (lt if target else n)).to(device)
    q_self = torch.where(is_t[q_rows], q_rows, torch.full_like(q_rows, -1))
    args: Dict[str, Any] = {
        "q": torch.randn(q_rows.numel(), heads, dim, generator=gen) * 0.5,
        "k": torch.randn(batch * n, kv_heads, dim, generator=gen) * 0.5,
        "v": torch.randn(batch * n, kv_heads, dim, generator=gen),
    }
    args = {name: t.to(device, dtype) for name, t in args.items()}
    args["queries"] = QuerySet.create(q_offsets, kv_ts[q_rows], q_self, lt if target else n)
    args["keys"] = KeySet.create(kv_offsets, kv_kind, kv_ts, n)
    return args


# --------------------------------------------------------------------------- timing
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


def _time(fn: Callable[[], Any], device: str, reps: int, warmup: int) -> float:
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


def _time_fwd_bwd(
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


class _CpuPeakMemory:
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


class _FwdBwdStep:
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


def _measure(
    fwd: Callable[[Dict[str, Any]], torch.Tensor], args: Dict[str, Any], device: str, reps: int, warmup: int
) -> Dict[str, Any]:
    """Training-forward ms, fwd+bwd ms and, on CUDA, the allocator's peak memory (MiB above the
    inputs, gradients of q, k, v included) of one fwd+bwd step. On the CPU the peak is measured in
    a separate pass (:class:`_CpuPeakMemory`)."""
    step = _FwdBwdStep(fwd, args)
    fwd_s, both_s = _time_fwd_bwd(step.forward, device, reps, warmup)
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


# --------------------------------------------------------------------------- softmax reference points
def _padded(x: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
    batch = offsets.numel() - 1
    return x.view(batch, max_len, *x.shape[1:])  # the bench batches are uniform


def _cpp(args: Dict[str, Any]) -> Callable[[Dict[str, Any]], torch.Tensor]:
    """The fused C++ kernel on the prefix encoding of the batch's mask (as the model builds it)."""
    queries = args["queries"].with_prefix(args["keys"])

    def run(a: Dict[str, Any]) -> torch.Tensor:
        return hstu_attention(a["q"], a["k"], a["v"], queries, a["keys"], backend="cpp")

    return run


def _sdpa(args: Dict[str, Any]) -> Callable[[Dict[str, Any]], torch.Tensor]:
    mask = dynamic_mask_padded(args["queries"], args["keys"])[:, None]  # [B, 1, Lq, Lk]

    def run(a: Dict[str, Any]) -> torch.Tensor:
        queries, keys = a["queries"], a["keys"]
        q = _padded(a["q"], queries.offsets, queries.max_len).transpose(1, 2)
        k = _padded(a["k"], keys.offsets, keys.max_len).transpose(1, 2)
        v = _padded(a["v"], keys.offsets, keys.max_len).transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    return run


def _flex(args: Dict[str, Any]) -> Callable[[Dict[str, Any]], torch.Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    queries, keys = args["queries"], args["keys"]
    batch = keys.batch_size
    lq, lk = queries.max_len, keys.max_len
    kind = keys.kind.view(batch, lk).to(torch.int32)
    kts = keys.ts.view(batch, lk)
    qts = queries.ts.view(batch, lq)
    self_local = (queries.self_rows - keys.offsets[:-1].repeat_interleave(lq)).view(batch, lq)
    history, realtime = int(TokenKind.HISTORY), int(TokenKind.REALTIME)

    def mask_mod(b, h, qi, kj):
        return (
            (kind[b, kj] == history)
            | ((kind[b, kj] == realtime) & (kts[b, kj] < qts[b, qi]))
            | (self_local[b, qi] == kj)
        )

    block_mask = create_block_mask(mask_mod, batch, None, lq, lk, device=args["q"].device)
    compiled = torch.compile(flex_attention)

    def run(a: Dict[str, Any]) -> torch.Tensor:
        q = _padded(a["q"], queries.offsets, lq).transpose(1, 2)
        k = _padded(a["k"], keys.offsets, lk).transpose(1, 2)
        v = _padded(a["v"], keys.offsets, lk).transpose(1, 2)
        return compiled(q, k, v, block_mask=block_mask, enable_gqa=True)

    return run


# --------------------------------------------------------------------------- suites
def _attention_sizes(cuda: bool, quick: bool) -> List[int]:
    if quick:
        return [256, 1024, 2048] if cuda else [256, 512]
    return [256, 512, 1024, 2048, 4096, 8192]


def _attention_impls(args: Dict[str, Any], n: int, cuda: bool, quick: bool) -> Dict[str, Callable]:
    """Name -> callable on the args dict, for the implementations measured at this size."""
    score_bytes = args["keys"].batch_size * args["q"].shape[1] * args["queries"].max_len * n * 4
    dense_fits = score_bytes <= (4 << 30 if cuda else 1 << 30)  # the padded paths hold several [B,H,Lq,Lk]
    impls: Dict[str, Callable] = {}
    if dense_fits:
        impls["reference"] = lambda a: hstu_attention(**a, backend="reference")
    if cuda:
        impls["triton"] = lambda a: hstu_attention(**a, backend="triton")
    else:
        impls["cpp"] = _cpp(args)
        impls["blocksparse"] = lambda a: hstu_attention(**a, backend="blocksparse")
        if not quick and n <= 1024:
            from mtfm_rec.bench.flex_attention import hstu_attention_compiled

            impls["compiled (torch.compile, padded)"] = lambda a: hstu_attention_compiled(**a)
    if dense_fits:
        impls[f"SDPA bool mask ({SOFTMAX})"] = _sdpa(args)
    if cuda:
        try:
            impls[f"FlexAttention ({SOFTMAX})"] = _flex(args)
        except Exception as exc:  # noqa: BLE001 - a reference point only
            print(f"[bench] flex unavailable: {exc}")
    return impls


def _attention(device: str, quick: bool) -> List[Dict[str, Any]]:
    cuda = device == "cuda"
    heads, kv_heads, dim = (8, 2, 64) if cuda else (4, 2, 32)
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = []
    shapes = [
        (target, n, max(1, (16384 if cuda else 2048) // n))
        for target in (False, True)
        for n in _attention_sizes(cuda, quick)
    ]
    for target, n, batch in shapes:
        variant = "target" if target else "full"
        # CPU: one fwd+bwd of the padded reference at N = 8192 takes tens of seconds
        reps, warmup = (10, 3) if cuda else (5, 1) if n <= 2048 else (2, 0)
        args = _attention_batch(n, batch, heads, kv_heads, dim, target, device, dtype)
        for name, fn in _attention_impls(args, n, cuda, quick).items():
            try:
                res = _measure(fn, args, device, reps, warmup)
            except torch.cuda.OutOfMemoryError:
                res = {"error": "out of memory"}
            rows.append({"variant": variant, "n": n, "batch": batch, "impl": name, **res})
            print(f"[bench] attention {rows[-1]}", flush=True)
        if cuda:
            stats = torch.zeros(2, dtype=torch.int32, device=device)
            from mtfm_rec.kernels.hstu_attention.triton import hstu_attention_triton

            hstu_attention_triton(**args, tile_stats=stats)
            rows.append(
                {
                    "variant": variant,
                    "n": n,
                    "batch": batch,
                    "impl": "triton: tiles computed / visited",
                    "tiles": stats.tolist(),
                }
            )
        else:
            from mtfm_rec.kernels.hstu_attention.blocksparse import hstu_attention_blocksparse

            st: Dict[str, int] = {}
            hstu_attention_blocksparse(**args, stats=st)
            label = "blocksparse: chunk pairs kept / total" + (
                " (ran the dense reference)" if st["dense"] else ""
            )
            rows.append(
                {
                    "variant": variant,
                    "n": n,
                    "batch": batch,
                    "impl": label,
                    "tiles": [st["pairs_kept"], st["pairs_total"]],
                }
            )
    if not cuda:
        # A second pass, after every timing: fixing glibc's mmap threshold (what makes the resident
        # set measurable) also makes every large allocation fault in fresh pages, which would
        # distort the times.
        memory = _CpuPeakMemory()
        for target, n, batch in shapes:
            args = _attention_batch(n, batch, heads, kv_heads, dim, target, device, dtype)
            impls = _attention_impls(args, n, cuda, quick)
            for row in rows:
                if (row["variant"], row["n"]) == ("target" if target else "full", n) and row["impl"] in impls:
                    row["peak_mib"] = memory.peak_mib(_FwdBwdStep(impls[row["impl"]], args))
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
    for name in ["reference", "triton"] if cuda else ["reference"]:
        xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, weight, bias))

        def forward(xs=xs, ws=ws, bs=bs, name=name) -> torch.Tensor:  # bound now: called in this iteration
            for t in (xs, ws, bs):
                t.grad = None
            return group_layer_norm(xs, group, ws, bs, backend=name)

        f, both = _time_fwd_bwd(forward, device, reps, warmup)
        rows.append(
            {"impl": name, "n": n, "d": d, "groups": groups, "fwd_ms": f * 1e3, "fwd_bwd_ms": both * 1e3}
        )
    return rows


def _mask(device: str, quick: bool) -> List[Dict[str, Any]]:
    cuda = device == "cuda"
    n = 4096 if cuda else 1024
    args = _attention_batch(n, 4, 1, 1, 8, False, device, torch.float32)
    reps, warmup = (20, 3) if cuda else (5, 1)
    rows = []
    for name in ["reference", "triton"] if cuda else ["reference"]:
        build = functools.partial(dynamic_mask, args["queries"], args["keys"], backend=name)
        ms = _time(build, device, reps, warmup) * 1e3
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


# --------------------------------------------------------------------------- report
def plot(result: Dict[str, Any], path: str) -> None:
    """fwd+bwd time and peak memory against N, per implementation, full and target variants."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["attention"] if "fwd_bwd_ms" in r]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), squeeze=False)
    for col, variant in enumerate(("full", "target")):
        for row_i, (key, label) in enumerate((("fwd_bwd_ms", "fwd+bwd ms"), ("peak_mib", "peak MiB"))):
            ax = axes[row_i][col]
            for i, impl in enumerate(dict.fromkeys(r["impl"] for r in rows)):  # one colour per impl
                points = [
                    (r["n"], r[key])
                    for r in rows
                    if r["impl"] == impl and r["variant"] == variant and r.get(key) is not None
                ]
                if points:
                    ns, values = zip(*points)
                    ax.plot(
                        ns,
                        values,
                        marker="o",
                        color=f"C{i}",
                        label=impl.replace(f" ({SOFTMAX})", " (softmax)"),
                    )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N tokens per sample")
            ax.set_ylabel(label)
            ax.set_title(f"{variant} attention: {label}")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    device = result["device"] if result["device"] != "cpu" else f"CPU, {result['threads']} thread"
    tokens = 16384 if result["device"] != "cpu" else 2048
    fig.suptitle(f"HSTU attention with the MTFM mask ({device}); batch = max(1, {tokens} // N) samples")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def render(result: Dict[str, Any]) -> str:
    gpu = result["device"] != "cpu"
    targets = (
        "Triton fwd+bwd >= 3x the reference at N = 2048, and within 1.5x of PyTorch's fastest "
        "attention with the same mask, which is softmax attention: a reference point, not the same math"
    )
    if gpu:
        head = f"Device: **{result['device']}** (bf16). Targets: {targets}."
    else:
        head = (
            f"Device: **CPU** ({result['threads']} thread, fp32). **GPU numbers were not measured: no GPU "
            "was present.** The Triton kernels ran only under `TRITON_INTERPRET=1` for the parity tests, "
            f"which is not a performance path, so the GPU targets ({targets}) are unverified. The CPU "
            "is shared with other jobs: CPU times are process CPU time (single thread), minimum of 5 runs "
            "(2 from N = 4096). Peak MiB on the CPU: the process's resident high-water mark above the inputs "
            "during one fwd+bwd, measured in a second pass after the timings with glibc's mmap threshold "
            "fixed at 1 MiB so freed tensors leave the resident set (docs/KERNELS.md)."
        )
    lines = [
        head,
        "",
        "Batches: MTFM layout (H oldest, R by ts, T among the latest R; H:R:T = 2:1:1), N tokens per sample, "
        f"batch = max(1, {'16384' if gpu else '2048'} // N) samples; full = all tokens query, "
        "target = T tokens query. "
        f"`{SOFTMAX}` rows compute softmax attention with the same boolean mask, for scale only. "
        "fwd = the forward of a training step (autograd on), timed within the same steps as fwd+bwd.",
    ]
    if result.get("quick"):
        lines.append("Quick mode (smaller sizes).")
    lines += ["", "### HSTU attention", ""]
    if result.get("plot"):
        lines += [f"![attention time and memory against N]({result['plot']})", ""]
    header = (
        "variant",
        "N",
        "batch",
        "implementation",
        "fwd ms",
        "fwd+bwd ms",
        "fwd+bwd vs reference",
        "peak MiB",
    )
    lines.append(_row(*header))
    lines.append(_row(*["---"] * 8))
    rows = result["attention"]
    ref = {(r["variant"], r["n"]): r.get("fwd_bwd_ms") for r in rows if r["impl"] == "reference"}
    for r in rows:
        key = (r["variant"], r["n"], r["batch"], r["impl"])
        if "tiles" in r:
            kept, total = r["tiles"]
            lines.append(
                _row(*key, f"{kept} / {total} ({100 * kept / max(total, 1):.0f}% computed)", "", "", "")
            )
        elif "error" in r:
            lines.append(_row(*key, r["error"], "", "", ""))
        else:
            base = ref.get((r["variant"], r["n"]))
            speed = f"{base / r['fwd_bwd_ms']:.2f}x" if base else "-"
            lines.append(_row(*key, _fmt(r["fwd_ms"]), _fmt(r["fwd_bwd_ms"]), speed, _fmt(r["peak_mib"])))
    lines += ["", "### Group LayerNorm", ""]
    lines.append(_row("implementation", "tokens", "D", "groups", "fwd ms", "fwd+bwd ms"))
    lines.append(_row(*["---"] * 6))
    for r in result["group_norm"]:
        lines.append(_row(r["impl"], r["n"], r["d"], r["groups"], _fmt(r["fwd_ms"]), _fmt(r["fwd_bwd_ms"])))
    lines += ["", "### Dynamic mask construction ([B, N, N] bool)", ""]
    lines.append(_row("implementation", "N", "batch", "ms"))
    lines.append(_row(*["---"] * 4))
    for r in result["dynamic_mask"]:
        lines.append(_row(r["impl"], r["n"], r["batch"], _fmt(r["ms"])))
    if not gpu:
        lines += [
            "",
            "Group LayerNorm and dynamic mask: only the references run on the CPU (their Triton kernels "
            "need a GPU to be timed).",
        ]
    return "\n".join(lines) + "\n"
