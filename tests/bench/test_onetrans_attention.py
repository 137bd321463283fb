"""The OneTrans attention benchmark times two paths of one function on lengths like ML-1M's."""

from __future__ import annotations

import torch

from mtfm_rec.bench.onetrans_attention import block_slots, causal_mask, render, sample_lengths
from mtfm_rec.model.baselines.onetrans import OneTransBlock
from mtfm_rec.model.config import ModelConfig


def test_the_two_timed_paths_compute_the_same_block_output() -> None:
    torch.manual_seed(0)
    lengths = sample_lengths(24, seed=3)
    block = OneTransBlock(ModelConfig(d_model=16, num_heads=2), num_sets=1)
    x = torch.randn(sum(lengths), 16)
    mask = causal_mask(lengths)
    one, chunked = block_slots(lengths, 1), block_slots(lengths, 4)
    assert chunked.chunks is not None and 1 < len(chunked.chunks) <= 4
    torch.testing.assert_close(block(x, chunked, mask), block(x, one, mask), atol=1e-5, rtol=1e-5)


def test_lengths_follow_the_documented_mix() -> None:
    lengths = sample_lengths(4000, seed=0)
    assert min(lengths) >= 1 and max(lengths) <= 340
    long_share = sum(n > 170 for n in lengths) / len(lengths)
    assert 0.07 < long_share < 0.13  # 10 % from 170-340 (a few of them are 170 itself)


def test_render_reports_the_speed_up_over_the_padded_call() -> None:
    result = {
        "batch": 4,
        "tokens": 10,
        "longest": 5,
        "pair_efficiency": 0.5,
        "rows": [
            {"path": "one padded call", "forward_ms": 2.0, "fwd_bwd_ms": 6.0},
            {"path": "8 chunks", "forward_ms": 1.0, "fwd_bwd_ms": 2.0},
        ],
    }
    text = render(result)
    assert "| one padded call | 2.0 | 6.0 | 1.00x |" in text and "| 8 chunks | 1.0 | 2.0 | 3.00x |" in text
