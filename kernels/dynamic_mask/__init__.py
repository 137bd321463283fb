"""Fused dynamic-mask construction: the padded bool mask [B, Lq, Lk] (see ``reference.py``).

``backend``: ``"auto"`` (Triton for CUDA tensors, the reference otherwise), ``"reference"``,
``"triton"`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``). A forced backend that
cannot run raises. The attention kernels do not use this op (they build the mask per tile), nor
does training: it serves the kernel bench and the tests.
"""

from __future__ import annotations

from typing import Union

import torch

from mtfm_rec.kernels import triton_support
from mtfm_rec.kernels.backends import MaskBackend, values
from mtfm_rec.kernels.dynamic_mask.reference import dynamic_mask_reference
from mtfm_rec.kernels.jagged import KeySet, QuerySet

BACKENDS = values(MaskBackend)


def dynamic_mask(
    queries: QuerySet, keys: KeySet, backend: Union[MaskBackend, str] = MaskBackend.AUTO
) -> torch.Tensor:
    """Padded dynamic mask [B, queries.max_len, keys.max_len] (bool); ``mtfm_rec.kernels.jagged``
    states the rules."""
    if backend not in BACKENDS:
        raise ValueError(f"dynamic mask backend {backend!r} unknown; choose one of {BACKENDS}")
    chosen = MaskBackend(backend)
    if chosen is MaskBackend.AUTO:
        chosen = MaskBackend.TRITON if queries.offsets.is_cuda else MaskBackend.REFERENCE
    if chosen is MaskBackend.TRITON:
        impl = triton_support.load(
            "mtfm_rec.kernels.dynamic_mask.triton", "dynamic_mask_triton", "dynamic mask"
        )
        return impl(queries, keys)
    return dynamic_mask_reference(queries, keys)


__all__ = ["BACKENDS", "MaskBackend", "dynamic_mask", "dynamic_mask_reference"]
