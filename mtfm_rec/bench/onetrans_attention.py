"""OneTrans attention on the CPU: one call padded to the batch's longest sample against the
length-sorted chunks of :func:`mtfm_rec.model.baselines.onetrans.length_chunks`.

One :class:`~mtfm_rec.model.baselines.onetrans.OneTransBlock` (``configs/ml1m_swr.yaml``'s
width: d_model 32, 2 heads), forward + backward, on a batch of 256 samples whose token counts
follow the ML-1M Scenario-Wise Rec batches (measured on four d0 training batches of 256: mean
98-103 tokens, median 110-129, longest 243-336): 90 % drawn uniformly from 1-170, 10 % from
170-340, seeded. Every sample attends causally within itself. The two paths compute the same
function (``tests/model/baselines/test_onetrans.py``); the rounds alternate between them, and
each reports its fastest round (process CPU time, one thread: ``mtfm_rec.bench.timing``).
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List

import torch

from mtfm_rec.bench.timing import time_fwd_bwd
from mtfm_rec.model.baselines.onetrans import CPU_ATTENTION_CHUNKS, OneTransBlock, TokenSlots, chunk_slots
from mtfm_rec.model.config import ModelConfig


def sample_lengths(batch: int, seed: int) -> List[int]:
    """Token counts of ``batch`` samples shaped like the ML-1M batches (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    short = torch.randint(1, 171, (batch,), generator=gen)
    long = torch.randint(170, 341, (batch,), generator=gen)
    return torch.where(torch.rand(batch, generator=gen) < 0.1, long, short).tolist()


def block_slots(lengths: List[int], max_chunks: int) -> TokenSlots:
    """One weight set; tokens in sample order, sample ``s``'s token ``p`` at padded row s*M + p."""
    m = max(lengths)
    pad_index = torch.cat([s * m + torch.arange(n) for s, n in enumerate(lengths)])
    chunks, chunk_index = chunk_slots(lengths, pad_index, m, max_chunks) if max_chunks > 1 else (None, None)
    return TokenSlots([len(pad_index)], pad_index, len(lengths), m, chunks, chunk_index)


def causal_mask(lengths: List[int]) -> torch.Tensor:
    """``[B, 1, M, M]``: each sample's tokens see themselves and earlier ones; padding itself."""
    m = max(lengths)
    j = torch.arange(m)
    causal = j[:, None] >= j[None, :]
    valid = j[None, :] < torch.tensor(lengths)[:, None]  # [B, M]
    return ((causal & valid[:, None, :]) | (j[:, None] == j[None, :])).unsqueeze(1)


def run(quick: bool) -> Dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the kernel suite: a shared CPU's OpenMP waits are noise
    try:
        torch.manual_seed(0)
        config = ModelConfig(d_model=32, num_heads=2)
        block = OneTransBlock(config, num_sets=1)
        batch = 32 if quick else 256
        lengths = sample_lengths(batch, seed=0)
        mask = causal_mask(lengths)
        x = torch.randn(sum(lengths), config.d_model, requires_grad=True)
        paths = {
            "one padded call": block_slots(lengths, 1),
            f"{CPU_ATTENTION_CHUNKS} chunks": block_slots(lengths, CPU_ATTENTION_CHUNKS),
        }
        best: Dict[str, List[float]] = {name: [float("inf")] * 2 for name in paths}
        for _ in range(1 if quick else 3):
            for name, slots in paths.items():
                fwd, both = time_fwd_bwd(functools.partial(block, x, slots, mask), "cpu", reps=2, warmup=1)
                best[name] = [min(best[name][0], fwd), min(best[name][1], both)]
        rows = [{"path": name, "forward_ms": 1e3 * f, "fwd_bwd_ms": 1e3 * b} for name, (f, b) in best.items()]
        longest = max(lengths)
        return {
            "quick": quick,
            "batch": batch,
            "tokens": sum(lengths),
            "longest": longest,
            # the padded call's share of useful (query, key) pairs: what chunking wins back
            "pair_efficiency": sum(n * n for n in lengths) / (batch * longest * longest),
            "rows": rows,
        }
    finally:
        torch.set_num_threads(threads)


def render(result: Dict[str, Any]) -> str:
    base = result["rows"][0]["fwd_bwd_ms"]
    lines = [
        f"One OneTrans block (d_model 32, 2 heads), forward + backward, {result['batch']} samples of "
        f"ML-1M-like lengths ({result['tokens']} tokens, longest {result['longest']}; a padded call's "
        f"useful (query, key) pairs: {100 * result['pair_efficiency']:.1f} %), one thread, fastest of "
        "alternating rounds. `python -m mtfm_rec.bench --only onetrans_attention`.",
        "",
        "| path | forward (ms) | forward + backward (ms) | speed-up |",
        "|---|---|---|---|",
    ]
    for row in result["rows"]:
        both = row["fwd_bwd_ms"]
        lines.append(f"| {row['path']} | {row['forward_ms']:.1f} | {both:.1f} | {base / both:.2f}x |")
    return "\n".join(lines) + "\n"


__all__ = ["block_slots", "causal_mask", "render", "run", "sample_lengths"]
