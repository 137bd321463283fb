"""Jagged HSTU attention with the MTFM dynamic mask: one dispatcher over every implementation.

Every implementation takes ``(q, k, v, queries, keys, alpha)`` (``mtfm_rec.kernels.jagged``:
:class:`~mtfm_rec.kernels.jagged.QuerySet`, :class:`~mtfm_rec.kernels.jagged.KeySet`) and has
the semantics of ``reference.py``. ``backend`` (an :class:`~mtfm_rec.kernels.backends.AttentionBackend` or its
value, as in ``model.attention_backend``):

* ``"auto"``: :func:`resolve` picks ``triton`` on CUDA and ``cpp`` on the CPU, here and in the
  model alike, so one config trains with Triton on a GPU and with the C++ kernel on the CPU.
* ``"reference"``: plain PyTorch (``reference.py``), the ground truth; any device.
* ``"prefix"``: padded batched matmuls on the prefix-encoded mask (``prefix.py``), the model's CPU
  path before ``cpp``; any device, runs under bf16 autocast.
* ``"blocksparse"``: PyTorch over (query chunk, key chunk) pairs, skipping the pairs the mask
  empties, like the Triton kernel (``blocksparse.py``); any device. Where the mask is dense (target
  layers) it runs the reference itself (docs/KERNELS.md).
* ``"cpp"``: the fused C++ CPU kernel on the prefix-encoded mask (``cpu.py``), forward and
  backward; CPU tensors only; built on first use.
* ``"triton"``: the Triton kernels (``triton.py``), forward and backward. Needs CUDA tensors, or
  CPU tensors with ``TRITON_INTERPRET=1`` (the interpreter: for tests, not for speed).

``prefix`` and ``cpp`` read ``queries.prefix`` / ``queries.self_local``
(:meth:`~mtfm_rec.kernels.jagged.QuerySet.with_prefix`), which need the ``(H; R by ts; T)``
layout of ``mtfm_rec.data.batch``; the others read the kinds and timestamps and take any layout.

A forced backend that cannot run raises; nothing falls back silently. docs/KERNELS.md has the
kernel designs and their measurements (FlexAttention and ``torch.compile`` candidates, which are
not backends, live in ``mtfm_rec.bench.flex_attention``).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from mtfm_rec.kernels import triton_support
from mtfm_rec.kernels.backends import AttentionBackend, values
from mtfm_rec.kernels.hstu_attention.blocksparse import hstu_attention_blocksparse
from mtfm_rec.kernels.hstu_attention.prefix import hstu_attention_prefix
from mtfm_rec.kernels.hstu_attention.reference import dynamic_mask_padded, hstu_attention_reference
from mtfm_rec.kernels.jagged import KeySet, QuerySet

BACKENDS = values(AttentionBackend)

AttentionFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, QuerySet, KeySet, Optional[float]], torch.Tensor
]

_IMPLEMENTATIONS = {
    AttentionBackend.REFERENCE: hstu_attention_reference,
    AttentionBackend.PREFIX: hstu_attention_prefix,
    AttentionBackend.BLOCKSPARSE: hstu_attention_blocksparse,
}


def resolve(backend: Union[AttentionBackend, str], device: torch.device) -> AttentionBackend:
    """The implementation ``backend`` means for tensors on ``device``: ``auto`` is ``triton`` on
    CUDA and ``cpp`` (the fastest exact CPU path, docs/KERNELS.md) elsewhere; any other name is
    itself. An unknown name raises ``ValueError``."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} unknown; choose one of {BACKENDS}")
    chosen = AttentionBackend(backend)
    if chosen is AttentionBackend.AUTO:
        return AttentionBackend.TRITON if device.type == "cuda" else AttentionBackend.CPP
    return chosen


def implementation(backend: AttentionBackend) -> AttentionFn:
    """The function of a resolved (not ``auto``) backend; the Triton and C++ modules are imported
    here, on demand."""
    if backend is AttentionBackend.TRITON:
        return triton_support.load(
            "mtfm_rec.kernels.hstu_attention.triton", "hstu_attention_triton", "attention"
        )
    if backend is AttentionBackend.CPP:
        # imported on use: `make install` runs cpu.py as a script (python -m ...cpu) to build it
        from mtfm_rec.kernels.hstu_attention.cpu import hstu_attention_cpu

        return hstu_attention_cpu
    if backend not in _IMPLEMENTATIONS:
        raise ValueError(f"attention backend {backend!r} must be resolved first (resolve())")
    return _IMPLEMENTATIONS[backend]


def hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    queries: QuerySet,
    keys: KeySet,
    alpha: Optional[float] = None,
    backend: Union[AttentionBackend, str] = AttentionBackend.AUTO,
) -> torch.Tensor:
    """HSTU attention of jagged queries over jagged keys under the dynamic mask.

    Args:
        q: [total_q, H, D]; k: [total_kv, G, D]; v: [total_kv, G, Dv] (H % G == 0).
        queries: the query rows' layout, timestamps and own key rows (and, for ``prefix`` /
            ``cpp``, the prefix encoding of their mask).
        keys: the key rows' layout, kinds and timestamps.
        alpha: score scale, default ``D ** -0.5``.
        backend: see the module docstring.
    Returns:
        [total_q, H, Dv] in q's dtype.
    """
    return implementation(resolve(backend, q.device))(q, k, v, queries, keys, alpha)


__all__ = [
    "BACKENDS",
    "AttentionBackend",
    "AttentionFn",
    "dynamic_mask_padded",
    "hstu_attention",
    "hstu_attention_reference",
    "implementation",
    "resolve",
]
