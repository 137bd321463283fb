"""The fused Triton dynamic mask equals the reference mask exactly (bool, [B, Lq, Lk])."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from hypothesis import given, settings
from jagged_inputs import MASK_KEYS, attention_cases, build_batch

from mtfm_rec.kernels.dynamic_mask import BACKENDS, dynamic_mask, dynamic_mask_reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _mask_args(spec, device="cpu"):
    case = build_batch(**spec, device=device)
    return {k: case[k] for k in MASK_KEYS}


@pytest.mark.skipif(
    not INTERPRET, reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (make test sets it)"
)
@settings(max_examples=20, deadline=None)
@given(attention_cases(max_block=20))
def test_triton_equals_reference_interpreted(spec):
    from mtfm_rec.kernels.dynamic_mask.triton import dynamic_mask_triton

    args = _mask_args(spec)
    want = dynamic_mask_reference(**args)
    got = dynamic_mask_triton(**args)
    assert got.dtype == torch.bool and got.shape == want.shape
    assert torch.equal(got, want)


def test_reference_rules():
    # One sample: H(ts 5), R(ts 3), R(ts 9), T(ts 7), T(ts 8); full attention.
    args = _mask_args(dict(blocks=[(1, 2, 2)], num_heads=1, num_kv_heads=1, dim=4, dim_v=4, target=False))
    ts = torch.tensor([5, 3, 9, 7, 8])
    queries = dataclasses.replace(args["queries"], ts=ts, prefix=None, self_local=None)  # no stale encoding
    args = {"queries": queries, "keys": dataclasses.replace(args["keys"], ts=ts)}
    m = dynamic_mask(**args)[0].int()
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0],  # H query at ts 5: H, the earlier R
            [1, 0, 0, 0, 0],  # R at ts 3: only H (the R at ts 3 is not strictly earlier)
            [1, 1, 0, 0, 0],  # R at ts 9: H, R at ts 3 (not itself: ts 9 is not < 9)
            [1, 1, 0, 1, 0],  # T at ts 7: H, R 3, itself
            [1, 1, 0, 0, 1],  # T at ts 8
        ]
    )
    assert torch.equal(m, expected)


def test_dispatcher_rules(monkeypatch):
    args = _mask_args(dict(blocks=[(2, 2, 2)], num_heads=1, num_kv_heads=1, dim=4, dim_v=4, target=True))
    assert set(BACKENDS) >= {"auto", "reference", "triton"}
    with pytest.raises(ValueError, match="unknown"):
        dynamic_mask(**args, backend="nope")
    assert torch.equal(dynamic_mask(**args), dynamic_mask_reference(**args))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA"):
        dynamic_mask(**args, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_triton_equals_reference_gpu():
    from mtfm_rec.kernels.dynamic_mask.triton import dynamic_mask_triton

    blocks = [(700, 300, 120), (0, 0, 0), (1, 0, 0), (2000, 10, 3)]
    spec = dict(blocks=blocks, num_heads=1, num_kv_heads=1, dim=4, dim_v=4, target=False, max_ts=500)
    args = _mask_args(spec, device="cuda")
    assert torch.equal(dynamic_mask_triton(**args), dynamic_mask_reference(**args))
