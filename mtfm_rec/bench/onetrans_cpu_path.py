"""OneTrans on the CPU: the masked path (every row through every layer, one call padded to the
batch's longest sample: the accelerator path) against the pruned path of
:mod:`mtfm_rec.model.baselines.onetrans` (rows dropped as the pyramid drops them, the last layer
on the T tokens alone, the attention on per-sample suffixes), with one padded call or in
``CPU_ATTENTION_CHUNKS`` length-sorted chunks.

The stack of ``configs/ml1m_genre.yaml``'s OneTrans jobs (d_model 64, 4 heads, 4 layers, pyramid
to 1/4), forward + backward from ``X(0)`` (tokenizer and heads left out: the same in every path),
the per-batch plan or masks included. 256 samples whose token mix follows the ML-1M genre
training batches of 256 (measured on eight drama batches: per sample H 66.3, R 19.6, T 6.4
tokens, longest 218-273): H uniform in 0-132, R in 0-40, T in 1-12, seeded. The paths compute
the same T outputs (``tests/model/baselines/test_onetrans.py``); the rounds alternate between
them, and each reports its fastest round (process CPU time, one thread: ``mtfm_rec.bench.timing``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Tuple, cast

import torch

from mtfm_rec.bench.timing import time_fwd_bwd
from mtfm_rec.data.batch import Batch
from mtfm_rec.model.baselines.onetrans import CPU_ATTENTION_CHUNKS, OneTransDense, layer_masks, pruned_layers
from mtfm_rec.model.config import BaselineConfig, ModelConfig
from mtfm_rec.model.examples import long_history_schema, random_batch
from mtfm_rec.model.sparse_dense import SparseDenseModel
from mtfm_rec.model.zoo import build_model

# per sample, inclusive ranges: H, R (the schema's "hist" and "rt") and T
TOKEN_MIX = {"hist": (0, 132), "rt": (0, 40)}
TARGETS = (1, 12)


def genre_model(seed: int = 0) -> SparseDenseModel:
    """OneTrans with ml1m_genre.yaml's model section, on a one-scenario schema."""
    torch.manual_seed(seed)
    config = ModelConfig(
        name="onetrans",
        d_model=64,
        num_heads=4,
        tokenizer_hidden=[64],
        baseline=BaselineConfig(onetrans_layers=4, pyramid_final_fraction=0.25),
    )
    return build_model(long_history_schema(num_scenarios=1), config)


Path = Callable[[torch.Tensor], torch.Tensor]


def mix_batch(size: int, seed: int) -> Batch:
    """``size`` samples of the module's token mix on the one-scenario schema."""
    return random_batch(
        long_history_schema(num_scenarios=1), size, seq_len=TOKEN_MIX, exposures=TARGETS, seed=seed
    )


def paths(model: SparseDenseModel, batch: Batch) -> Tuple[torch.Tensor, Dict[str, Path]]:
    """``(x, {path: x -> the last layer's T outputs})`` for one batch."""
    dense = cast(OneTransDense, model.dense)
    with torch.no_grad():
        emb = model.embedding_collection(batch.sparse_features)
        x, layout, perm, slots, num_history = dense.sorted_tokens(emb, batch)

    def masked(leaf: torch.Tensor) -> torch.Tensor:
        masks = layer_masks(layout, num_history, dense.layers, dense.fraction)
        return dense.run_masked(leaf, slots, masks)[slots.group_sizes[0] :]

    def pruned(leaf: torch.Tensor, max_chunks: int) -> torch.Tensor:
        sizes = slots.group_sizes
        plan = pruned_layers(layout, perm, sizes, num_history, dense.layers, dense.fraction, max_chunks)
        return dense.run_pruned(leaf, plan)

    return x, {
        "masked, one padded call": masked,
        "pruned, one padded call": functools.partial(pruned, max_chunks=1),
        f"pruned, {CPU_ATTENTION_CHUNKS} chunks": functools.partial(pruned, max_chunks=CPU_ATTENTION_CHUNKS),
    }


def run(quick: bool) -> Dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the kernel suite: a shared CPU's OpenMP waits are noise
    try:
        model = genre_model()
        size = 32 if quick else 256
        batch = mix_batch(size, seed=0)
        x, timed = paths(model, batch)
        leaf = x.detach().requires_grad_(True)
        best: Dict[str, List[float]] = {name: [float("inf")] * 2 for name in timed}
        for _ in range(1 if quick else 3):
            for name, fn in timed.items():
                fwd, both = time_fwd_bwd(functools.partial(fn, leaf), "cpu", reps=2, warmup=1)
                best[name] = [min(best[name][0], fwd), min(best[name][1], both)]
        counts = [batch.num_history, batch.num_realtime, batch.num_targets]
        return {
            "quick": quick,
            "batch": size,
            "tokens": int(batch.num_tokens),
            "longest": int(batch.max_tokens),
            "mean_h_r_t": [round(float(c.float().mean()), 1) for c in counts],
            "rows": [{"path": n, "forward_ms": 1e3 * f, "fwd_bwd_ms": 1e3 * b} for n, (f, b) in best.items()],
        }
    finally:
        torch.set_num_threads(threads)


def render(result: Dict[str, Any]) -> str:
    base = result["rows"][0]["fwd_bwd_ms"]
    h, r, t = result["mean_h_r_t"]
    lines = [
        f"OneTrans stack of the ML-1M genre jobs (d_model 64, 4 heads, 4 layers, pyramid to 1/4), forward + "
        f"backward from X(0), {result['batch']} samples ({result['tokens']} tokens, longest "
        f"{result['longest']}; per sample H {h}, R {r}, T {t}), one thread, fastest of alternating rounds. "
        "The masked path is the accelerators'; the CPU runs the pruned one in chunks. "
        "`python -m mtfm_rec.bench --only onetrans_cpu_path`.",
        "",
        "| path | forward (ms) | forward + backward (ms) | speed-up |",
        "|---|---|---|---|",
    ]
    for row in result["rows"]:
        both = row["fwd_bwd_ms"]
        lines.append(f"| {row['path']} | {row['forward_ms']:.1f} | {both:.1f} | {base / both:.2f}x |")
    return "\n".join(lines) + "\n"


__all__ = ["TARGETS", "TOKEN_MIX", "genre_model", "mix_batch", "paths", "render", "run"]
