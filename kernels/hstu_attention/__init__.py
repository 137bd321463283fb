"""Jagged HSTU attention with the MTFM dynamic mask: dispatcher over implementations.

``backend``:

* ``"auto"``: Triton for CUDA tensors, the reference otherwise.
* ``"reference"``: plain PyTorch (``reference.py``), the ground truth; any device.
* ``"triton"``: the Triton kernels (``triton.py``), forward and backward. Needs CUDA tensors, or
  CPU tensors with ``TRITON_INTERPRET=1`` (the interpreter: for tests, not for speed).
* ``"blocksparse"``: the CPU fast path (``blocksparse.py``): PyTorch over (query chunk, key
  chunk) pairs, skipping the pairs the mask empties, like the Triton kernel; any device.
  Measured ~2x the reference's fwd+bwd for full-attention layers from N ~ 1024 tokens per
  sample; where the mask is dense (target layers) it runs the reference itself (docs/KERNELS.md).

FlexAttention cannot express SiLU attention and ``torch.compile`` of the padded reference was
no faster than the reference on our CPU (``flex.py``, docs/KERNELS.md), so neither is a backend.

A forced backend that cannot run raises; nothing falls back silently. See ``reference.py`` for
the exact semantics and docs/KERNELS.md for the kernel design.
"""

from __future__ import annotations

from typing import Optional

import torch

from mtfm_rec.kernels.hstu_attention.reference import (
    KIND_HISTORY,
    KIND_REALTIME,
    KIND_TARGET,
    dynamic_mask_padded,
    hstu_attention_reference,
)

BACKENDS = ("auto", "reference", "triton", "blocksparse")


def _triton_impl():
    try:
        from mtfm_rec.kernels.hstu_attention.triton import hstu_attention_triton
    except ImportError as exc:  # triton missing or broken on this platform
        raise RuntimeError(f"attention backend 'triton' unavailable: {exc}") from exc
    return hstu_attention_triton


def hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    q_ts: torch.Tensor,
    q_self: torch.Tensor,
    kv_kind: torch.Tensor,
    kv_ts: torch.Tensor,
    max_q_len: int,
    max_kv_len: int,
    alpha: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """HSTU attention of jagged queries over jagged keys under the dynamic mask.

    Args:
        q: [total_q, H, D]; k: [total_kv, G, D]; v: [total_kv, G, Dv] (H % G == 0).
        q_offsets, kv_offsets: [B+1] jagged layouts of queries and keys.
        q_ts: [total_q] query timestamps; q_self: [total_q] the query's own key row (global),
            -1 for queries that are not T tokens.
        kv_kind: [total_kv] 0 = H, 1 = R, 2 = T; kv_ts: [total_kv] key timestamps.
        max_q_len, max_kv_len: host-side maxima of the per-sample lengths.
        alpha: score scale, default ``D ** -0.5``.
        backend: see the module docstring.
    Returns:
        [total_q, H, Dv] in q's dtype.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} unknown; choose one of {BACKENDS}")
    args = (q, k, v, q_offsets, kv_offsets, q_ts, q_self, kv_kind, kv_ts, max_q_len, max_kv_len, alpha)
    if backend == "auto":
        backend = "triton" if q.is_cuda else "reference"
    if backend == "triton":
        return _triton_impl()(*args)
    if backend == "blocksparse":
        from mtfm_rec.kernels.hstu_attention.blocksparse import hstu_attention_blocksparse

        return hstu_attention_blocksparse(*args)
    return hstu_attention_reference(*args)


__all__ = [
    "BACKENDS",
    "KIND_HISTORY",
    "KIND_REALTIME",
    "KIND_TARGET",
    "dynamic_mask_padded",
    "hstu_attention",
    "hstu_attention_reference",
]
