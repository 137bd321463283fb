"""Parity of the HSTU attention backends with the PyTorch reference, forward and every gradient.

CPU tests run the Triton kernels in the interpreter (``TRITON_INTERPRET=1``, set by ``make test``)
on CPU tensors, calling the Triton implementation directly (not the dispatcher's CPU default).
GPU tests use larger shapes and bf16 and are skipped without CUDA.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Dict, Tuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jagged_inputs import attention_cases, build_batch

from mtfm_rec.kernels.hstu_attention import (
    BACKENDS,
    AttentionBackend,
    hstu_attention,
    hstu_attention_reference,
    resolve,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
needs_interpreter = pytest.mark.skipif(
    not INTERPRET, reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (make test sets it)"
)
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _triton():
    from mtfm_rec.kernels.hstu_attention.triton import hstu_attention_triton

    return hstu_attention_triton


def _run(fn: Callable, case: Dict[str, object], grad_out: torch.Tensor | None = None, upcast: bool = False):
    """(out, dq, dk, dv) of ``fn`` on ``case``; ``upcast`` runs it in fp32 on the same values."""
    leaves = {}
    for name in "qkv":
        t = case[name]
        leaves[name] = (t.float() if upcast else t).detach().clone().requires_grad_()
    out = fn(**{**case, **leaves})
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    if out.numel():
        out.backward(grad_out.to(out.dtype))
    grads = tuple(
        leaves[n].grad if leaves[n].grad is not None else torch.zeros_like(leaves[n]) for n in "qkv"
    )
    return (out.detach(),) + grads, grad_out


def _assert_close(
    got: Tuple[torch.Tensor, ...], want: Tuple[torch.Tensor, ...], atol: float, rtol: float
) -> None:
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape, name
        torch.testing.assert_close(
            g.float(), w.float(), atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}"
        )


@needs_interpreter
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attention_cases())
def test_triton_matches_reference_interpreted(spec):
    case = build_batch(**spec)
    want, grad_out = _run(hstu_attention_reference, case)
    got, _ = _run(_triton(), case, grad_out)
    _assert_close(got, want, atol=1e-5, rtol=1e-4)


@needs_interpreter
@settings(max_examples=4, deadline=None)
@given(attention_cases(max_batch=2))
def test_triton_bf16_interpreted(spec):
    # The reference runs in fp32 on the same bf16 values; the kernel rounds weights to bf16.
    dtype = torch.bfloat16
    case = build_batch(**spec, dtype=dtype)
    want, grad_out = _run(hstu_attention_reference, case, upcast=True)
    got, _ = _run(_triton(), case, grad_out)
    assert got[0].dtype == dtype
    _assert_close(got, want, atol=3e-2, rtol=3e-2)


@needs_interpreter
@pytest.mark.parametrize("target", [False, True])
def test_edge_layouts_interpreted(target):
    # Whole batch without T tokens (zero queries in target mode), single tokens, empty samples.
    for blocks in ([(3, 2, 0), (0, 0, 0)], [(0, 0, 1)], [(1, 0, 0), (0, 1, 0), (0, 0, 0)], []):
        case = build_batch(blocks, num_heads=2, num_kv_heads=1, dim=8, dim_v=8, target=target)
        want, grad_out = _run(hstu_attention_reference, case)
        got, _ = _run(_triton(), case, grad_out)
        _assert_close(got, want, atol=1e-5, rtol=1e-4)


@needs_interpreter
def test_tiles_are_skipped_interpreted():
    # T keys are visible only to their own query, so a long T block leaves whole tiles empty.
    case = build_batch([(4, 4, 40)], num_heads=1, num_kv_heads=1, dim=8, dim_v=8, target=False)
    from mtfm_rec.kernels.hstu_attention.triton import _fwd_configs

    assert _fwd_configs()[0].kwargs == {"BLOCK_M": 16, "BLOCK_N": 16}
    stats = torch.zeros(2, dtype=torch.int32)
    out = _triton()(**case, tile_stats=stats)
    # 48 tokens = 3 x 3 tiles of 16; rows 0-7 are H/R, 8-47 T. Query tile 0 needs key tile 0;
    # tiles 1 and 2 need key tile 0 (H) and their own diagonal tile: 5 of 9 computed.
    assert stats.tolist() == [9, 5]
    torch.testing.assert_close(out, hstu_attention_reference(**case), atol=1e-5, rtol=1e-4)


def test_dispatcher_rules(monkeypatch):
    case = build_batch([(3, 2, 2)], num_heads=2, num_kv_heads=1, dim=8, dim_v=8, target=False)
    assert set(BACKENDS) >= {"auto", "reference", "triton", "blocksparse", "prefix", "cpp"}
    with pytest.raises(ValueError, match="unknown"):
        hstu_attention(**case, backend="nope")
    # auto has one meaning everywhere (the model's): Triton on CUDA, the C++ kernel on the CPU
    assert resolve("auto", torch.device("cuda", 0)) is AttentionBackend.TRITON
    assert resolve("auto", torch.device("cpu")) is AttentionBackend.CPP
    assert resolve("prefix", torch.device("cuda")) is AttentionBackend.PREFIX
    torch.testing.assert_close(
        hstu_attention(**case, backend="reference"), hstu_attention_reference(**case), atol=0, rtol=0
    )
    # the C++ kernel's parity tolerance (tests/kernels/test_hstu_cpu.py)
    torch.testing.assert_close(hstu_attention(**case), hstu_attention_reference(**case), atol=1e-5, rtol=1e-4)
    for backend in ("blocksparse", "prefix"):
        torch.testing.assert_close(
            hstu_attention(**case, backend=backend), hstu_attention_reference(**case), atol=1e-5, rtol=1e-4
        )
    # the prefix-encoded backends refuse queries built without the encoding
    plain = dataclasses.replace(case["queries"], prefix=None, self_local=None)
    for backend in ("cpp", "prefix"):
        with pytest.raises(ValueError, match="needs the prefix-encoded mask"):
            hstu_attention(**{**case, "queries": plain}, backend=backend)
    # A forced Triton backend on CPU tensors without the interpreter raises, never falls back.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA"):
        hstu_attention(**case, backend="triton")


@settings(max_examples=40, deadline=None)
@given(attention_cases(max_block=20), st.sampled_from([4, 8, 16]))
def test_blocksparse_matches_reference(spec, block):
    from mtfm_rec.kernels.hstu_attention.blocksparse import hstu_attention_blocksparse

    case = build_batch(**spec)
    want, grad_out = _run(hstu_attention_reference, case)
    # dense_above=1.0: always the block-sparse path (the dense switch is tested below).
    got, _ = _run(lambda **kw: hstu_attention_blocksparse(**kw, block=block, dense_above=1.0), case, grad_out)
    _assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_blocksparse_skips_pairs():
    from mtfm_rec.kernels.hstu_attention.blocksparse import hstu_attention_blocksparse

    # Same layout as the Triton tile test: 3 x 3 chunks of 16, 5 of them non-empty.
    case = build_batch([(4, 4, 40)], num_heads=1, num_kv_heads=1, dim=8, dim_v=8, target=False)
    stats: dict = {}
    out = hstu_attention_blocksparse(**case, block=16, stats=stats)
    assert stats == {"pairs_total": 9, "pairs_kept": 5, "dense": False}
    torch.testing.assert_close(out, hstu_attention_reference(**case), atol=1e-5, rtol=1e-4)
    # 5 / 9 = 56% of the pairs: below 0.5 the dense reference runs, bit-identical to it.
    out = hstu_attention_blocksparse(**case, block=16, dense_above=0.5, stats=stats)
    assert stats["dense"]
    torch.testing.assert_close(out, hstu_attention_reference(**case), atol=0, rtol=0)


# ----------------------------------------------------------------------------- GPU
@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("target", [False, True])
@pytest.mark.parametrize("heads", [(4, 1), (4, 2), (4, 4)])
def test_triton_matches_reference_gpu(dtype, target, heads):
    gen = torch.Generator().manual_seed(0)
    blocks = [tuple(torch.randint(1, 400, (3,), generator=gen).tolist()) for _ in range(6)]
    blocks += [(0, 0, 0), (513, 0, 0), (0, 0, 1), (1000, 300, 200)]
    case = build_batch(blocks, heads[0], heads[1], 64, 64, target, dtype=dtype, device="cuda", max_ts=1000)
    want, grad_out = _run(hstu_attention_reference, case, upcast=True)
    got, _ = _run(_triton(), case, grad_out)
    # fp32 runs tl.dot in TF32 on tensor cores; bf16 rounds the weights before the PV product.
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    _assert_close(got, want, atol=tol, rtol=tol)
