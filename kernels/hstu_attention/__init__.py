"""Jagged HSTU attention with the MTFM dynamic mask: dispatcher over implementations.

``backend``: ``"auto"`` (Triton for CUDA tensors when available, else the reference),
``"reference"``, ``"triton"``. See ``reference.py`` for the exact semantics.
"""

from __future__ import annotations

import torch

from mtfm_rec.kernels.hstu_attention.reference import (
    KIND_HISTORY,
    KIND_REALTIME,
    KIND_TARGET,
    dynamic_mask_padded,
    hstu_attention_reference,
)

BACKENDS = ("auto", "reference")


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
    alpha: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} unknown; choose one of {BACKENDS}")
    return hstu_attention_reference(
        q, k, v, q_offsets, kv_offsets, q_ts, q_self, kv_kind, kv_ts, max_q_len, max_kv_len, alpha
    )


__all__ = [
    "BACKENDS",
    "KIND_HISTORY",
    "KIND_REALTIME",
    "KIND_TARGET",
    "dynamic_mask_padded",
    "hstu_attention",
    "hstu_attention_reference",
]
