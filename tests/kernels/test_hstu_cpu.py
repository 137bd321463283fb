"""Parity of the fused C++ CPU kernel (``attention_backend=cpp``) with the reference: forward and
the gradients of q, k and v, on collated batches (the prefix-encoded mask needs the (H; R; T)
layout of ``mtfm_rec.data.batch``), for full and target queries and every GQA grouping.

The extension is built on first use (``make install`` builds it beforehand).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtfm_rec.kernels.hstu_attention import hstu_attention_reference
from mtfm_rec.kernels.hstu_attention.cpu import MAX_SAVED_WEIGHTS_BYTES, hstu_attention_cpu
from mtfm_rec.model.examples import demo_schema, random_batch
from mtfm_rec.model.mask import AttentionLayout, build_layout

SCHEMA = demo_schema(num_scenarios=3)


def _both(
    layout: AttentionLayout,
    target: bool,
    heads: int,
    kv_heads: int,
    dim: int,
    dim_v: int,
    seed: int,
    max_saved_bytes: int = MAX_SAVED_WEIGHTS_BYTES,
):
    gen = torch.Generator().manual_seed(seed)
    n_q = layout.num_targets if target else layout.num_tokens
    leaves = [
        torch.randn(n_q, heads, dim, generator=gen),
        torch.randn(layout.num_tokens, kv_heads, dim, generator=gen),
        torch.randn(layout.num_tokens, kv_heads, dim_v, generator=gen),
    ]
    grad_out = torch.randn(n_q, heads, dim_v, generator=gen)
    queries = layout.queries(target)
    results = []
    for impl in ("reference", "cpp"):
        q, k, v = (t.clone().requires_grad_() for t in leaves)
        if impl == "reference":
            out = hstu_attention_reference(q, k, v, queries, layout.keys, 0.37)
        else:
            out = hstu_attention_cpu(q, k, v, queries, layout.keys, 0.37, max_saved_bytes)
        if n_q == 0:  # no query: the reference returns a constant, there is nothing to differentiate
            results.append((out.detach(), torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)))
            continue
        out.backward(grad_out)
        results.append((out.detach(), q.grad, k.grad, v.grad))
    return results


@settings(max_examples=40, deadline=None)
@given(
    batch_size=st.integers(1, 6),
    max_seq=st.integers(0, 40),
    max_exposures=st.integers(0, 8),
    kv_heads=st.sampled_from([1, 2, 4]),
    dim=st.sampled_from([4, 16, 24]),
    dim_v=st.sampled_from([8, 16]),
    target=st.booleans(),
    ts_pool=st.sampled_from([0, 4]),
    seed=st.integers(0, 2**16),
    save_weights=st.booleans(),
)
def test_cpp_kernel_matches_reference_forward_and_gradients(
    batch_size, max_seq, max_exposures, kv_heads, dim, dim_v, target, ts_pool, seed, save_weights
) -> None:
    """Both backwards: from the weights the forward saved, and recomputing them (a zero budget)."""
    batch = random_batch(
        SCHEMA, batch_size, seq_len=(0, max_seq), exposures=(0, max_exposures), seed=seed, ts_pool=ts_pool
    )
    budget = MAX_SAVED_WEIGHTS_BYTES if save_weights else 0
    want, got = _both(build_layout(batch), target, 4, kv_heads, dim, dim_v, seed, budget)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_cpp_kernel_saves_weights_only_for_training_and_within_the_budget() -> None:
    from mtfm_rec.kernels.hstu_attention.cpu import extension

    layout = build_layout(random_batch(SCHEMA, 4, seq_len=(8, 20), exposures=(2, 6), seed=3))
    q_off, (q_prefix, q_self_local) = layout.full.offsets, layout.full.prefix_encoding("cpp")
    torch.manual_seed(0)
    q, k = torch.randn(layout.num_tokens, 2, 8), torch.randn(layout.num_tokens, 1, 8)
    ops, mask = extension(), (q_off, layout.keys.offsets, q_prefix, q_self_local)
    out, saved = ops.forward(q, k, k, *mask, 0.5, True, 1 << 30)
    assert saved.shape[0] == 2 and saved.shape[1] > 0
    # p beyond each row's prefix and d there are 0; the visible weights are those of the output
    assert saved.shape[1] >= int(q_prefix.clamp(min=0).sum()) * 2
    assert ops.forward(q, k, k, *mask, 0.5, False, 1 << 30)[1].numel() == 0  # inference keeps nothing
    assert ops.forward(q, k, k, *mask, 0.5, True, saved.numel() * 4 - 1)[1].numel() == 0  # over budget
    go = torch.randn_like(out)
    with pytest.raises(RuntimeError, match="saved weights do not match this layout"):
        ops.backward(go, q, k, k, *mask, 0.5, saved[:, 1:].contiguous())
    from_saved = ops.backward(go, q, k, k, *mask, 0.5, saved)
    recomputed = ops.backward(go, q, k, k, *mask, 0.5, torch.empty(0, 0))
    # the same sums in another order (the saved path reads the forward's p and d): fp32 rounding
    # only, 1.2e-7 seen on an AMD EPYC where the Xeon matched to 1e-7
    for a, b in zip(from_saved, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cpp_kernel_keeps_the_input_dtype_and_refuses_other_devices() -> None:
    layout = build_layout(random_batch(SCHEMA, 3, seed=1))
    q = torch.randn(layout.num_tokens, 2, 8).to(torch.bfloat16)
    k = torch.randn(layout.num_tokens, 1, 8).to(torch.bfloat16)
    out = hstu_attention_cpu(q, k, k, layout.full, layout.keys, 0.5)
    assert out.dtype == torch.bfloat16 and out.shape == (layout.num_tokens, 2, 8)
    with pytest.raises(RuntimeError, match="runs on the CPU, got meta tensors"):
        hstu_attention_cpu(q.to("meta"), k.to("meta"), k.to("meta"), layout.full, layout.keys, 0.5)


def test_cpp_kernel_refuses_index_tensors_that_would_read_out_of_bounds() -> None:
    from mtfm_rec.kernels.hstu_attention.cpu import extension

    layout = build_layout(random_batch(SCHEMA, 3, seq_len=(2, 6), seed=2))
    q_off, (q_prefix, q_self_local) = layout.full.offsets, layout.full.prefix_encoding("cpp")
    n = layout.num_tokens
    q, k = torch.randn(n, 2, 8), torch.randn(n, 1, 8)
    ops = extension()
    args = dict(q_offsets=q_off, kv_offsets=layout.keys.offsets, q_prefix=q_prefix, q_self_local=q_self_local)
    bad = {
        "one entry per query row": dict(args, q_prefix=q_prefix[:-1]),
        "must be >= 0": dict(args, q_prefix=torch.where(q_prefix > 0, -q_prefix, q_prefix)),
        "end at the row counts": dict(args, kv_offsets=layout.keys.offsets + torch.tensor([0] * 3 + [1])),
        "B \\+ 1 entries": dict(args, q_offsets=q_off[:-1]),
        "1-d int64": dict(args, q_prefix=q_prefix.to(torch.int32)),
    }
    for rule, a in bad.items():
        with pytest.raises(RuntimeError, match=rule):
            ops.forward(
                q, k, k, a["q_offsets"], a["kv_offsets"], a["q_prefix"], a["q_self_local"], 0.5, True, 1 << 20
            )


def test_inference_goes_through_the_operator_that_torch_export_can_trace() -> None:
    """Without gradients the kernel runs as ``torch.ops.mtfm_rec.hstu_attention_cpu_forward``:
    the same forward (equal to the reference), and a graph op in an exported program (the
    serving packages hold it), which also runs on a non-contiguous int input."""
    layout = build_layout(random_batch(SCHEMA, 4, seq_len=(3, 20), exposures=(1, 6), seed=7))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(layout.num_tokens, h, 8, generator=gen) for h in (4, 2, 2))
    with torch.no_grad():
        got = hstu_attention_cpu(q, k, v, layout.full, layout.keys, 0.37)
    want = hstu_attention_reference(q, k, v, layout.full, layout.keys, 0.37)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    prefix, self_local = layout.full.prefix_encoding("cpp")
    op = torch.ops.mtfm_rec.hstu_attention_cpu_forward

    class Attend(torch.nn.Module):
        def forward(self, q, k, v, q_off, kv_off, prefix, self_local):  # type: ignore[no-untyped-def]
            return op(q, k, v, q_off, kv_off, prefix, self_local, 0.37)

    ints = (layout.full.offsets, layout.keys.offsets, prefix, self_local)
    program = torch.export.export(Attend(), (q, k, v, *ints))
    assert any(node.target is op.default for node in program.graph.nodes)
    strided = torch.stack([prefix, prefix], dim=1)[:, 0]  # the same values, not contiguous
    assert not strided.is_contiguous()
    out = program.module()(q, k, v, layout.full.offsets, layout.keys.offsets, strided, self_local)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
