"""The ``kernels`` section of docs/BENCHMARKS.md and its figure, drawn from the suite's JSON.

:func:`plot` and :func:`render` are the suite's report half (``mtfm_rec.bench.kernels``
re-exports them, as ``python -m mtfm_rec.bench`` looks them up there).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from mtfm_rec.bench.attention_impls import SOFTMAX


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


def _preamble(result: Dict[str, Any], gpu: bool) -> List[str]:
    """The device, the targets and how the batches and the numbers were made."""
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
    return lines


def _attention_table(result: Dict[str, Any]) -> List[str]:
    """One row per (variant, N, implementation): times, speed-up over the reference, peak memory;
    the tile-skipping rows give the fraction of tiles (chunk pairs) computed."""
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
    lines = [_row(*header), _row(*["---"] * 8)]
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
    return lines


def _group_norm_and_mask_tables(result: Dict[str, Any], gpu: bool) -> List[str]:
    lines = ["", "### Group LayerNorm", ""]
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
            "Group LayerNorm on the CPU: the reference, the one-hot norm and the fused C++ kernel "
            "(`cpp`, the norm of the `cpp` attention path); their Triton kernels, and the dynamic "
            "mask's, need a GPU to be timed.",
        ]
    return lines


def render(result: Dict[str, Any]) -> str:
    """The markdown section: preamble, the attention table (and figure), Group LayerNorm, mask."""
    gpu = result["device"] != "cpu"
    lines = _preamble(result, gpu)
    lines += ["", "### HSTU attention", ""]
    if result.get("plot"):
        lines += [f"![attention time and memory against N]({result['plot']})", ""]
    lines += _attention_table(result)
    lines += _group_norm_and_mask_tables(result, gpu)
    return "\n".join(lines) + "\n"
