"""Parity of the Group LayerNorm kernels (Triton, C++, one-hot) with the reference: y, dx, dweight, dbias.

CPU tests call the Triton implementation directly under ``TRITON_INTERPRET=1`` (set by
``make test``); GPU tests use larger shapes and bf16 and are skipped without CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtfm_rec.kernels.group_norm import (
    BACKENDS,
    group_layer_norm,
    group_layer_norm_onehot,
    group_layer_norm_reference,
)
from mtfm_rec.kernels.group_norm.cpu import group_layer_norm_cpu

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(
    not INTERPRET, reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (make test sets it)"
)


def _triton():
    from mtfm_rec.kernels.group_norm.triton import group_layer_norm_triton

    return group_layer_norm_triton


def _grads(fn, x, group, weight, bias, dy, upcast=False):
    leaves = [(t.float() if upcast else t).detach().clone().requires_grad_() for t in (x, weight, bias)]
    y = fn(leaves[0], group, leaves[1], leaves[2])
    y.backward(dy.to(y.dtype))
    return (y.detach(),) + tuple(t.grad for t in leaves)


def _case(n, d, groups, sorted_groups, seed, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=gen) * 3 + 1).to(dtype)
    group = torch.randint(0, groups, (n,), generator=gen)
    if sorted_groups:  # like the T block: scenario after scenario
        group = group.sort().values
    weight = torch.randn(groups, d, generator=gen).to(dtype)
    bias = torch.randn(groups, d, generator=gen).to(dtype)
    dy = torch.randn(n, d, generator=gen)
    return [t.to(device) for t in (x, group, weight, bias, dy)]


# hypothesis strategies of _case's arguments, shared by the parity tests
CASES = dict(
    n=st.integers(0, 40),
    d=st.sampled_from([1, 3, 16, 24]),
    groups=st.integers(1, 6),
    sorted_groups=st.booleans(),
    seed=st.integers(0, 2**16),
)


def _assert_close(got, want, atol, rtol):
    for name, g, w in zip(("y", "dx", "dweight", "dbias"), got, want):
        torch.testing.assert_close(
            g.float(), w.float(), atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}"
        )


@needs_interpreter
@settings(max_examples=15, deadline=None)
@given(**CASES)
def test_triton_matches_reference_interpreted(n, d, groups, sorted_groups, seed):
    x, group, weight, bias, dy = _case(n, d, groups, sorted_groups, seed)
    want = _grads(group_layer_norm_reference, x, group, weight, bias, dy)
    got = _grads(_triton(), x, group, weight, bias, dy)
    _assert_close(got, want, atol=1e-4, rtol=1e-4)


# the CPU implementations: (function, y bit-exact?). onehot's y is the reference's arithmetic;
# the C++ kernel computes the moments in its own order, so y too is equal to float rounding.
CPU_IMPLS = {"onehot": (group_layer_norm_onehot, True), "cpp": (group_layer_norm_cpu, False)}


@pytest.mark.parametrize("name", sorted(CPU_IMPLS))
@settings(max_examples=25, deadline=None)
@given(**CASES)
def test_cpu_backend_matches_reference(name, n, d, groups, sorted_groups, seed):
    """y, dx, dweight, dbias to float rounding (sums in another order)."""
    impl, exact_y = CPU_IMPLS[name]
    x, group, weight, bias, dy = _case(n, d, groups, sorted_groups, seed)
    want = _grads(group_layer_norm_reference, x, group, weight, bias, dy)
    got = _grads(impl, x, group, weight, bias, dy)
    if exact_y:
        torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
    _assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_cpp_on_several_threads():
    """Rows split over threads, each summing its own dweight / dbias partials."""
    x, group, weight, bias, dy = _case(3000, 24, 5, False, 3)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = _grads(group_layer_norm_cpu, x, group, weight, bias, dy)
    finally:
        torch.set_num_threads(before)
    want = _grads(group_layer_norm_reference, x, group, weight, bias, dy)
    _assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_cpp_without_input_grad_and_in_bf16():
    """Only the affine parameters learn (x is a leaf without grad), and a bf16 input is computed
    in float32 and cast back, like the reference on upcast inputs."""
    x, group, weight, bias, dy = _case(40, 16, 3, False, 1)
    x, weight, bias = x.detach(), weight.requires_grad_(), bias.requires_grad_()
    group_layer_norm_cpu(x, group, weight, bias).backward(dy)
    want_w, want_b = torch.autograd.grad(
        group_layer_norm_reference(x, group, weight, bias), (weight, bias), dy
    )
    torch.testing.assert_close(weight.grad, want_w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bias.grad, want_b, atol=1e-5, rtol=1e-5)
    xb = x.to(torch.bfloat16)
    with torch.no_grad():
        got = group_layer_norm_cpu(xb, group, weight, bias)
        want = group_layer_norm_reference(xb.float(), group, weight, bias).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


def test_cpp_refuses_a_group_out_of_range():
    x, group, weight, bias, _ = _case(9, 8, 3, False, 2)
    group = group.clone()
    group[4] = 3
    with pytest.raises(RuntimeError, match=r"group\[4\] = 3 is outside \[0, 3\)"):
        group_layer_norm_cpu(x, group, weight, bias)


@needs_interpreter
def test_bf16_interpreted():
    x, group, weight, bias, dy = _case(33, 24, 4, False, 0, dtype=torch.bfloat16)
    want = _grads(group_layer_norm_reference, x, group, weight, bias, dy, upcast=True)
    got = _grads(_triton(), x, group, weight, bias, dy)
    assert got[0].dtype == torch.bfloat16
    _assert_close(got, want, atol=5e-2, rtol=5e-2)


def test_dispatcher_rules(monkeypatch):
    x, group, weight, bias, _ = _case(7, 8, 3, False, 0)
    assert set(BACKENDS) >= {"auto", "reference", "triton", "onehot", "cpp"}
    with pytest.raises(ValueError, match="unknown"):
        group_layer_norm(x, group, weight, bias, backend="nope")
    torch.testing.assert_close(
        group_layer_norm(x, group, weight, bias),
        group_layer_norm_reference(x, group, weight, bias),
        atol=0,
        rtol=0,
    )
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA"):
        group_layer_norm(x, group, weight, bias, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 256, 1000])
def test_triton_matches_reference_gpu(dtype, d):
    x, group, weight, bias, dy = _case(20_000, d, 12, False, 0, dtype=dtype, device="cuda")
    want = _grads(group_layer_norm_reference, x, group, weight, bias, dy, upcast=True)
    got = _grads(_triton(), x, group, weight, bias, dy)
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-3  # dweight/dbias sum ~2k rows per group
    _assert_close(got, want, atol=tol, rtol=tol)
