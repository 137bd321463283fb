"""``model.attention_normalisation: segment`` (mtfm_rec.model.segment_norm) on every backend,
against a dense-mask reference that normalises each segment by its own visible count, forward
and every gradient."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from jagged_inputs import attention_cases, build_batch

from mtfm_rec.kernels.hstu_attention import dynamic_mask_padded, hstu_attention
from mtfm_rec.kernels.hstu_attention.reference import jagged_heads, padded_heads
from mtfm_rec.kernels.jagged import KeySet, QuerySet, TokenKind, pad
from mtfm_rec.model.config import ModelConfig
from mtfm_rec.model.segment_norm import hstu_attention_by_segment

BACKENDS = ["reference", "prefix", "blocksparse", "cpp"]
if os.environ.get("TRITON_INTERPRET") == "1":
    BACKENDS.append("triton")


def segment_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, queries: QuerySet, keys: KeySet, alpha: float
) -> torch.Tensor:
    """Each segment of the dense mask (history keys; every other key) over its own count."""
    if q.shape[0] == 0:
        return q.new_zeros(0, q.shape[1], v.shape[-1])
    qp, kp, vp = padded_heads(q, k, v, queries, keys)
    mask = dynamic_mask_padded(queries, keys)  # [B, Lq, Lk]
    history = pad((keys.kind == TokenKind.HISTORY).to(torch.int64), keys.offsets, keys.max_len) == 1
    silu = F.silu(alpha * torch.matmul(qp, kp.unsqueeze(2).transpose(-1, -2)))  # [B, G, r, Lq, Lk]
    out = 0
    for segment in (mask & history[:, None, :], mask & ~history[:, None, :]):
        weights = silu * segment[:, None, None].to(silu.dtype)
        count = segment.sum(-1).clamp(min=1).to(silu.dtype)[:, None, None, :, None]
        out = out + torch.matmul(weights, vp.unsqueeze(2)) / count
    return jagged_heads(out, queries, q.shape[0])


def _forward_backward(fn, case: dict) -> tuple:
    leaves = {n: case[n].detach().clone().requires_grad_() for n in "qkv"}
    out = fn(leaves["q"], leaves["k"], leaves["v"], case["queries"], case["keys"])
    if out.numel():
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)))
    grads = [leaves[n].grad if leaves[n].grad is not None else torch.zeros_like(leaves[n]) for n in "qkv"]
    return (out.detach(), *grads)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=attention_cases())
def test_every_backend_normalises_each_segment_by_its_own_count(backend: str, spec: dict) -> None:
    case = build_batch(**{**spec, "sorted_layout": True})
    alpha = 0.7
    want = _forward_backward(lambda q, k, v, qs, ks: segment_reference(q, k, v, qs, ks, alpha), case)
    got = _forward_backward(
        lambda q, k, v, qs, ks: hstu_attention_by_segment(q, k, v, qs, ks, alpha, backend), case
    )
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_a_short_burst_weighs_as_much_as_a_long_history() -> None:
    """One T query over 6 history keys and 2 real-time keys with equal scores: under ``segment``
    each segment's values average to its own mean; under ``visible`` the burst gets 2/9."""
    case = build_batch([(6, 2, 1)], num_heads=1, num_kv_heads=1, dim=4, dim_v=1, target=True, max_ts=1)
    keys = dataclasses.replace(case["keys"], ts=torch.tensor([0] * 6 + [1, 2, 5]))
    queries = QuerySet.create(
        case["queries"].offsets, torch.tensor([5]), case["queries"].self_rows, 1
    ).with_prefix(keys)
    q, k = torch.zeros(1, 1, 4), torch.zeros(9, 1, 4)
    q[0, 0, 0], k[:, 0, 0] = 1.0, 1.0  # every score is 1: every key weighs silu(1)
    v = torch.tensor([0.0] * 6 + [1.0, 1.0, 0.0])[:, None, None]
    out = hstu_attention_by_segment(q, k, v, queries, keys, 1.0, "reference")
    # history: mean 0; the rest (2 clicks of value 1, the query itself of value 0): mean 2/3
    torch.testing.assert_close(out.flatten(), F.silu(torch.tensor([1.0])) * 2 / 3)
    visible = hstu_attention(q, k, v, queries, keys, 1.0, "reference")
    torch.testing.assert_close(visible.flatten(), F.silu(torch.tensor([1.0])) * 2 / 9)


def test_an_unknown_normalisation_is_refused_with_the_key_and_the_choices() -> None:
    message = r"model.attention_normalisation='softmax' unknown; choose one of \('visible', 'segment'\)"
    with pytest.raises(ValueError, match=message):
        ModelConfig(attention_normalisation="softmax")
