"""Fused dynamic-mask construction: the padded bool mask [B, Lq, Lk] (see ``reference.py``).

``backend``: ``"auto"`` (Triton for CUDA tensors, the reference otherwise), ``"reference"``,
``"triton"`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``). A forced backend that
cannot run raises. The attention kernels do not use this op: they build the mask per tile.
"""

from __future__ import annotations

import torch

from mtfm_rec.kernels.dynamic_mask.reference import dynamic_mask_reference

BACKENDS = ("auto", "reference", "triton")


def dynamic_mask(
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    q_ts: torch.Tensor,
    q_self: torch.Tensor,
    kv_kind: torch.Tensor,
    kv_ts: torch.Tensor,
    max_q_len: int,
    max_kv_len: int,
    backend: str = "auto",
) -> torch.Tensor:
    """Padded dynamic mask [B, max_q_len, max_kv_len] (bool); arguments as ``hstu_attention``."""
    if backend not in BACKENDS:
        raise ValueError(f"dynamic mask backend {backend!r} unknown; choose one of {BACKENDS}")
    args = (q_offsets, kv_offsets, q_ts, q_self, kv_kind, kv_ts, max_q_len, max_kv_len)
    if backend == "auto":
        backend = "triton" if q_offsets.is_cuda else "reference"
    if backend == "triton":
        try:
            from mtfm_rec.kernels.dynamic_mask.triton import dynamic_mask_triton
        except ImportError as exc:
            raise RuntimeError(f"dynamic mask backend 'triton' unavailable: {exc}") from exc
        return dynamic_mask_triton(*args)
    return dynamic_mask_reference(*args)


__all__ = ["BACKENDS", "dynamic_mask", "dynamic_mask_reference"]
