"""What the target tokens attend to: attention on same-category history and real-time actions.

    python -m mtfm_rec.bench.attention_probe RUN_DIR [--batches 20]

For a trained run (its ``config.yaml`` and best/last checkpoint) on a synthetic dataset, every
target layer's pointwise attention weights ``silu(alpha q.k) / n_visible`` (mean over heads;
under ``model.attention_normalisation: segment`` the count of the key's own segment) of each T
token over its visible keys are split by the key's kind (H or R) and by whether the key's
``category`` equals the candidate's (scenarios whose item ``category`` column shares the id space
of the sequences': feed and coupon in ``mtfm_rec.data.synthetic``). A model that reads the
planted taste and intent puts more weight on the same-category keys than on the others; the
ratio of the two means is printed per layer, kind and scenario. Test split, no gradients.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F

from mtfm_rec.data.batch import Batch
from mtfm_rec.kernels.jagged import TokenKind
from mtfm_rec.model.attention import TargetAttentionLayer
from mtfm_rec.model.mask import AttentionLayout
from mtfm_rec.model.segment_norm import visible_counts

CATEGORY = "category"


def _ids_by_row(batch: Batch, positions: Dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """``[N]``: the id of feature ``key.format(name)`` at each token row of ``positions[name]``, else -1."""
    out = torch.full((batch.num_tokens,), -1, dtype=torch.int64)
    jt = batch.sparse_features.to_dict()
    for name, rows in positions.items():
        if key.format(name) in jt:
            out[rows] = jt[key.format(name)].values().to(torch.int64)
    return out


def token_categories(batch: Batch, feature: str = CATEGORY) -> torch.Tensor:
    """``[N]`` the ``feature`` id of every sequence token (-1 for T tokens and absent features)."""
    return _ids_by_row(batch, batch.sequence_positions, "seq/{}/" + feature)


def candidate_categories(batch: Batch, feature: str = CATEGORY) -> torch.Tensor:
    """``[N]`` the item ``feature`` id of every T token of a scenario that has it (else -1)."""
    return _ids_by_row(batch, batch.target_positions, "exp/{}/item/" + feature)


def _weights(
    layer: TargetAttentionLayer, x: torch.Tensor, layout: AttentionLayout
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(per T query the [max_tokens] mean-over-heads weights, and the key rows they belong to)."""
    x_norm = layer._norm_in(x, layout.token_group, layer.resolved_backend(x.device))
    k, _ = layer._kv(x_norm, layout.keys.ts)
    rows = layout.target_rows
    _, q = layer._uq(x_norm[rows], layout.target.ts, layout.token_group[rows])
    q, k = layer.rotary(q, layout.target.ts), layer.rotary(k, layout.keys.ts)  # as _attend does
    r = layer.num_heads // layer.num_kv_heads
    prefix, self_local = layout.target.prefix_encoding("attention probe")
    sample = torch.searchsorted(layout.target.offsets, torch.arange(len(layout.target_rows)), right=True) - 1
    start = layout.keys.offsets[sample]
    cols = torch.arange(layout.keys.max_len)
    key_rows = (start[:, None] + cols[None, :]).clamp(max=layout.num_tokens - 1)
    visible = (cols[None, :] < prefix[:, None]) | (cols[None, :] == self_local[:, None])
    kk = k[key_rows].repeat_interleave(r, dim=2)  # [T, L, H, D]
    scores = torch.einsum("thd,tlhd->tlh", q, kk)
    history = layout.keys.kind[key_rows] == TokenKind.HISTORY
    n = visible_counts(visible, history, layer.segment_norm).to(scores.dtype)
    w = F.silu(layer.alpha * scores).mean(dim=2) * visible / n
    return w, torch.where(visible, key_rows, -1)


def probe(model: torch.nn.Module, batches: List[Batch], feature: str = CATEGORY) -> Dict[str, float]:
    """Mean attention weight on same-``feature`` / other keys, by target layer, key kind and scenario.

    Returns ``{"layer<i>/<scenario>/<H|R>/<same|other>": mean weight}`` (NaN where no such pair).
    """
    owner: Any = model.module if hasattr(model, "module") else model  # DMP-wrapped or plain
    dense = owner.dense
    layers = [m for m in dense.hta.layers if isinstance(m, TargetAttentionLayer)]
    sums: Dict[str, List[float]] = defaultdict(lambda: [0.0, 0.0])
    captured: Dict[int, Tuple[torch.Tensor, AttentionLayout]] = {}
    hooks = [
        layer.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a))
        for i, layer in enumerate(layers)
    ]
    try:
        for batch in batches:
            with torch.no_grad():
                model(batch)
                key_cat, cand_cat = token_categories(batch, feature), candidate_categories(batch, feature)
                scenario_of = torch.full((batch.num_tokens,), -1, dtype=torch.int64)
                names = list(batch.target_positions)
                for s, rows in enumerate(batch.target_positions.values()):
                    scenario_of[rows] = s
                for i, layer in enumerate(layers):
                    x, layout = captured[i]
                    w, key_rows = _weights(layer, x, layout)
                    cand = cand_cat[layout.target_rows]
                    valid_key = key_rows >= 0
                    kind = batch.token_kind[key_rows.clamp(min=0)].to(torch.int64)
                    same = key_cat[key_rows.clamp(min=0)] == cand[:, None]
                    for s, name in enumerate(names):
                        q_mask = (scenario_of[layout.target_rows] == s) & (cand >= 0)
                        for kind_id, kind_name in ((TokenKind.HISTORY, "H"), (TokenKind.REALTIME, "R")):
                            base = valid_key & (kind == kind_id) & q_mask[:, None]
                            for tag, m in (("same", base & same), ("other", base & ~same)):
                                acc = sums[f"layer{i}/{name}/{kind_name}/{tag}"]
                                acc[0] += float(w[m].sum())
                                acc[1] += float(m.sum())
    finally:
        for h in hooks:
            h.remove()
    return {k: (v[0] / v[1] if v[1] else float("nan")) for k, v in sums.items()}


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args(argv)
    from mtfm_rec.config import load_config
    from mtfm_rec.training.trainer import Trainer

    cfg = load_config(
        os.path.join(args.run_dir, "config.yaml"),
        [
            "train.resume=auto",
            "train.progress_bar=false",
            "train.tensorboard=false",
            "train.sharding.print_plan=false",
        ],
    )
    trainer = Trainer(cfg)
    try:
        trainer.maybe_resume()
        trainer.load_best()
        trainer.model.eval()
        batches = []
        for batch in trainer._loader_fn("test"):
            batches.append(batch)
            if len(batches) >= args.batches:
                break
        result = probe(trainer.model, batches)
    finally:
        trainer.close()
    keys = sorted({k.rsplit("/", 1)[0] for k in result})
    print("| layer / scenario / key kind | mean weight, same category | other categories | ratio |")
    print("|---|---|---|---|")
    for key in keys:
        same, other = result[f"{key}/same"], result[f"{key}/other"]
        print(f"| {key} | {same:.5f} | {other:.5f} | {same / other:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
