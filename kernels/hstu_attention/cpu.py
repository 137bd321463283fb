"""The fused C++ CPU kernel of HSTU attention (``csrc/hstu_cpu.cpp``): forward and backward.

Takes the prefix-encoded dynamic mask of ``mtfm_rec.model.mask`` (per query: keys
``[0, prefix)`` of its sample are visible, plus ``self_local`` for a T token) on jagged tensors::

    q [total_q, H, D]   queries.offsets [B+1]   queries.prefix, queries.self_local [total_q]
    k [total_kv, G, D]  keys.offsets [B+1]      (sample-local key indices)
    v [total_kv, G, Dv]

Semantics: those of ``reference.hstu_attention_reference`` (tested equal, every gradient). Nothing
padded or masked is computed, so time follows the visible (query, key) pairs, not
``B x max_len^2``; a training forward keeps the attention weights for the backward within a memory
budget (:data:`MAX_SAVED_WEIGHTS_BYTES`), beyond which the backward recomputes them and memory is
O(inputs).

The extension is compiled on first use with the machine's C++ compiler, once per CPU kind, and
``make install`` builds it (``mtfm_rec.kernels.cpu_extension``), so training never waits for the
compiler. float32 only: other dtypes are computed in float32 and cast back (bf16 matmuls are
slower than fp32 on CPUs without AMX).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from mtfm_rec.kernels.cpu_extension import load_extension
from mtfm_rec.kernels.hstu_attention.reference import score_scale
from mtfm_rec.kernels.jagged import KeySet, QuerySet


def extension() -> Any:
    """The compiled module (built on first call, then loaded from the build directory)."""
    return load_extension("mtfm_hstu_cpu")


# The forward keeps the attention weights and their derivative factors (8 bytes per computed
# (query, head, key) entry) for a backward without the score GEMM and the sigmoids, while they fit
# in this budget; beyond it the backward recomputes them. Both give the same gradients (the same
# arithmetic), so the budget trades memory for time only. Measured (docs/KERNELS.md): ~10 % of
# fwd+bwd where it fits, but a loss above ~32 MiB, where every call faults in fresh pages (glibc
# returns blocks that large to the system on free) and writing them costs more than the GEMM saved.
MAX_SAVED_WEIGHTS_BYTES = 32 << 20


class _HSTUCpu(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_offsets: torch.Tensor,
        kv_offsets: torch.Tensor,
        q_prefix: torch.Tensor,
        q_self_local: torch.Tensor,
        alpha: float,
        max_saved_bytes: int,
    ) -> torch.Tensor:
        out, saved = extension().forward(
            q,
            k,
            v,
            q_offsets,
            kv_offsets,
            q_prefix,
            q_self_local,
            alpha,
            any(ctx.needs_input_grad[:3]),
            max_saved_bytes,
        )
        ctx.save_for_backward(q, k, v, q_offsets, kv_offsets, q_prefix, q_self_local, saved)
        ctx.alpha = alpha
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[Any, ...]:
        q, k, v, q_offsets, kv_offsets, q_prefix, q_self_local, saved = ctx.saved_tensors
        dq, dk, dv = extension().backward(
            grad_out.contiguous(), q, k, v, q_offsets, kv_offsets, q_prefix, q_self_local, ctx.alpha, saved
        )
        return dq, dk, dv, None, None, None, None, None, None


@torch.library.custom_op("mtfm_rec::hstu_attention_cpu_forward", mutates_args=())
def hstu_attention_cpu_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    q_prefix: torch.Tensor,
    q_self_local: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """The kernel's forward as a torch operator (no autograd: inference), so that
    ``torch.export`` and AOTInductor can hold it in a graph (``mtfm_rec.serve``); a compiled
    program calls it through the dispatcher, so this module must be imported where it runs."""
    # contiguous here, on the real tensors: in a traced graph the caller's .contiguous() calls can
    # be dropped (a fake tensor's layout is not the runtime one), and the kernel reads raw memory
    args = [t.contiguous() for t in (q, k, v, q_offsets, kv_offsets, q_prefix, q_self_local)]
    out, _ = extension().forward(*args, alpha, False, 0)
    return out


@hstu_attention_cpu_forward.register_fake
def _forward_shape(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    q_prefix: torch.Tensor,
    q_self_local: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    return q.new_empty((q.shape[0], q.shape[1], v.shape[2]))


def hstu_attention_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    queries: QuerySet,
    keys: KeySet,
    alpha: Optional[float] = None,
    max_saved_bytes: int = MAX_SAVED_WEIGHTS_BYTES,
) -> torch.Tensor:
    """HSTU attention with the prefix-encoded mask (module docstring); returns ``[total_q, H, Dv]``.

    Args:
        queries: with the prefix encoding (:meth:`QuerySet.with_prefix`).
        keys: the keys (only ``offsets`` is read: the mask is in ``queries``).
        alpha: score scale, default ``D ** -0.5``.
        max_saved_bytes: the budget for the weights a training forward keeps for its backward
            (:data:`MAX_SAVED_WEIGHTS_BYTES`; 0 recomputes them in the backward).
    """
    q_prefix, q_self_local = queries.prefix_encoding("cpp")
    if q.device.type != "cpu":
        raise RuntimeError(f"attention backend 'cpp' runs on the CPU, got {q.device.type} tensors")
    alpha = score_scale(q, alpha)
    dtype = q.dtype
    f32 = [t.float().contiguous() for t in (q, k, v)]
    ints = [t.to(torch.int64).contiguous() for t in (queries.offsets, keys.offsets, q_prefix, q_self_local)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        out = _HSTUCpu.apply(*f32, *ints, float(alpha), int(max_saved_bytes))
    else:  # the same forward, as an operator that torch.export can trace
        out = hstu_attention_cpu_forward(*f32, *ints, float(alpha))
    return out.to(dtype)
