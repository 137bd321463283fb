"""The dynamic mask's prefix encoding against the three rules and the kernel reference."""

from __future__ import annotations

import torch

from mtfm_rec.data.batch import Batch
from mtfm_rec.kernels.hstu_attention import dynamic_mask_padded
from mtfm_rec.kernels.jagged import KeySet, QuerySet
from mtfm_rec.model.examples import demo_schema, random_batch
from mtfm_rec.model.mask import build_layout, dense_mask


def _hand_batch() -> Batch:
    """One sample: H = 2 tokens, R ts (3, 5, 5, 8), T ts (4, 6, 9, 5); a second sample: 1 H, 1 T."""
    kind = [0, 0, 1, 1, 1, 1, 2, 2, 2, 2] + [0, 2]
    ts = [1, 2, 3, 5, 5, 8, 4, 6, 9, 5] + [7, 9]
    n = len(kind)
    return Batch(
        sparse_features=None,  # type: ignore[arg-type]  (the layout does not read it)
        token_offsets=torch.tensor([0, 10, 12]),
        num_history=torch.tensor([2, 1]),
        num_realtime=torch.tensor([4, 0]),
        num_targets=torch.tensor([4, 1]),
        token_ts=torch.tensor(ts),
        token_kind=torch.tensor(kind, dtype=torch.int8),
        token_group=torch.zeros(n, dtype=torch.int64),
        target_offsets=torch.tensor([0, 4, 5]),
        target_rows=torch.tensor([6, 7, 8, 9, 11]),
        sequence_positions={},
        target_positions={},
        exposure_sample={},
        dense_features={},
        labels={},
        label_mask={},
        user_id=torch.tensor([1, 2]),
        window_start=torch.tensor([0, 0]),
        batch_size=2,
        num_tokens=n,
        max_tokens=10,
        max_targets=4,
    )


def _rules(kind: list, ts: list) -> torch.Tensor:
    """The three rules of paper 3.2.2, written out per (query, key) pair."""
    n = len(kind)
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if kind[j] == 0:
                m[i, j] = True  # (1) H visible to all
            elif kind[j] == 1:
                m[i, j] = ts[j] < ts[i]  # (2) R only to strictly later tokens
            else:
                m[i, j] = i == j  # (3) T only to itself
    return m


def test_hand_made_mask_follows_the_three_rules() -> None:
    batch = _hand_batch()
    layout = build_layout(batch)
    full = dense_mask(layout, target_queries=False)
    kind, ts = batch.token_kind.tolist(), batch.token_ts.tolist()
    assert torch.equal(full[0], _rules(kind[:10], ts[:10]))
    expected_1 = torch.zeros(10, 10, dtype=torch.bool)
    expected_1[:2, :2] = _rules(kind[10:], ts[10:])
    assert torch.equal(full[1], expected_1)
    # Spelled out for the T token with ts 6: H, R(3), R(5), R(5), itself; not R(8), not other T.
    assert full[0, 7].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 7]
    # Target queries: rows of M_T are the T rows of M (eq. 12).
    target = dense_mask(layout, target_queries=True)
    assert torch.equal(target[0], full[0, 6:10])
    assert torch.equal(target[1, 0], full[1, 1])
    assert not target[1, 1:].any()  # padded query rows see nothing
    assert layout.target.prefix.tolist() == [3, 5, 6, 3, 1]  # L_H + #{R ts < T ts}


def test_prefix_encoding_matches_kernel_reference_mask() -> None:
    schema = demo_schema()
    for seed in range(3):
        batch = random_batch(schema, 5, seed=seed, ts_pool=6)  # ties between R and T ts
        layout = build_layout(batch)
        keys = KeySet.create(batch.token_offsets, batch.token_kind, batch.token_ts, batch.max_tokens)
        full = QuerySet.create(batch.token_offsets, batch.token_ts, layout.full.self_rows, batch.max_tokens)
        ref_full = dynamic_mask_padded(full, keys)
        assert torch.equal(dense_mask(layout, target_queries=False), ref_full)
        target = QuerySet.create(batch.target_offsets, layout.target.ts, batch.target_rows, batch.max_targets)
        ref_target = dynamic_mask_padded(target, keys)
        assert torch.equal(dense_mask(layout, target_queries=True), ref_target)
