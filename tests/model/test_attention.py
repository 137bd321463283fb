"""Full / target HSTU layers: the model's CPU attention path, GQA, and target == full on T rows."""

from __future__ import annotations

import pytest
import torch
from model_helpers import small_config

from mtfm_rec.kernels.hstu_attention import hstu_attention_reference
from mtfm_rec.kernels.hstu_attention.prefix import hstu_attention_prefix
from mtfm_rec.model import ModelConfig
from mtfm_rec.model.attention import FullAttentionLayer, TargetAttentionLayer
from mtfm_rec.model.examples import random_batch
from mtfm_rec.model.mask import build_layout


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
@pytest.mark.parametrize("target", [False, True])
def test_prefix_attention_equals_kernel_reference(schema, num_kv_heads: int, target: bool) -> None:
    batch = random_batch(schema, 4, seed=3, ts_pool=5)
    layout = build_layout(batch)
    gen = torch.Generator().manual_seed(0)
    n_q = layout.num_targets if target else layout.num_tokens
    q = torch.randn(n_q, 4, 8, generator=gen)
    k = torch.randn(layout.num_tokens, num_kv_heads, 8, generator=gen)
    v = torch.randn(layout.num_tokens, num_kv_heads, 8, generator=gen)
    queries = layout.queries(target)
    ref = hstu_attention_reference(q, k, v, queries, layout.keys, 0.3)
    ours = hstu_attention_prefix(q, k, v, queries, layout.keys, 0.3)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "prefix"])
def test_target_layer_equals_full_layer_on_target_rows(schema, backend: str) -> None:
    batch = random_batch(schema, 4, seed=5)
    layout = build_layout(batch)
    config = small_config(attention_backend=backend)
    groups = len(schema.token_groups)
    torch.manual_seed(0)
    full = FullAttentionLayer(config, groups)
    with torch.no_grad():  # non-trivial norm parameters, so per-group params matter
        for p in full.parameters():
            p.add_(0.1 * torch.randn_like(p))
    target = TargetAttentionLayer(config, groups)
    target.load_state_dict(full.state_dict())
    x = torch.randn(layout.num_tokens, config.d_model)
    y_full, y_target = full(x, layout), target(x, layout)
    rows = layout.target_rows
    torch.testing.assert_close(y_target[rows], y_full[rows], rtol=1e-5, atol=1e-6)
    keep = torch.ones(layout.num_tokens, dtype=torch.bool)
    keep[rows] = False
    assert torch.equal(y_target[keep], x[keep])  # H and R pass through unchanged
    assert not torch.allclose(y_full[keep], x[keep])  # ... while a full layer updates them


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_gqa_layer_matches_expanded_kv_heads(schema, num_kv_heads: int) -> None:
    """GQA with G kv heads == multi-head attention whose kv heads repeat each group r times."""
    batch = random_batch(schema, 3, seed=7)
    layout = build_layout(batch)
    torch.manual_seed(1)
    gqa = FullAttentionLayer(small_config(num_heads=4, num_kv_heads=num_kv_heads), len(schema.token_groups))
    mha = FullAttentionLayer(small_config(num_heads=4, num_kv_heads=4), len(schema.token_groups))
    state = gqa.state_dict()
    d_head, h, g = 8, 4, num_kv_heads
    w, b = state["f1.weight"], state["f1.bias"]
    uq = 2 * h * d_head

    def expand(t: torch.Tensor) -> torch.Tensor:  # [G*D, ...] -> [H*D, ...], head i reads group i // r
        return (
            t.view(g, d_head, *t.shape[1:]).repeat_interleave(h // g, dim=0).reshape(h * d_head, *t.shape[1:])
        )

    k_w, v_w = w[uq : uq + g * d_head], w[uq + g * d_head :]
    k_b, v_b = b[uq : uq + g * d_head], b[uq + g * d_head :]
    state["f1.weight"] = torch.cat([w[:uq], expand(k_w), expand(v_w)])
    state["f1.bias"] = torch.cat([b[:uq], expand(k_b), expand(v_b)])
    mha.load_state_dict(state)
    x = torch.randn(layout.num_tokens, 32)
    torch.testing.assert_close(gqa(x, layout), mha(x, layout), rtol=1e-5, atol=1e-6)


def test_heads_not_divisible_by_kv_heads_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"num_heads=4.*num_kv_heads=3"):
        ModelConfig(num_heads=4, num_kv_heads=3)
