"""The backend names of every op's dispatcher, as ``str``-valued enums (no torch import).

A dispatcher takes a member or its value (``backend="triton"``); the model's config names its
attention backend by value (``model.attention_backend``) and validates it here, so loading a
config does not pull in torch. The dispatchers (``mtfm_rec.kernels.<op>``) document what each
backend runs; ``auto`` is resolved there (for attention: ``hstu_attention.resolve``).
"""

from __future__ import annotations

import enum
from typing import Tuple, Type


class AttentionBackend(str, enum.Enum):
    """HSTU attention (``mtfm_rec.kernels.hstu_attention``): ``AUTO`` is ``TRITON`` on CUDA and
    ``CPP`` on the CPU."""

    AUTO = "auto"
    REFERENCE = "reference"
    PREFIX = "prefix"
    BLOCKSPARSE = "blocksparse"
    CPP = "cpp"
    TRITON = "triton"


class NormBackend(str, enum.Enum):
    """Group LayerNorm (``mtfm_rec.kernels.group_norm``): ``AUTO`` is ``TRITON`` on CUDA and
    ``REFERENCE`` on the CPU."""

    AUTO = "auto"
    REFERENCE = "reference"
    TRITON = "triton"
    ONEHOT = "onehot"
    CPP = "cpp"


class MaskBackend(str, enum.Enum):
    """The materialised dynamic mask (``mtfm_rec.kernels.dynamic_mask``): ``AUTO`` is ``TRITON``
    on CUDA and ``REFERENCE`` on the CPU."""

    AUTO = "auto"
    REFERENCE = "reference"
    TRITON = "triton"


def values(backends: Type[enum.Enum]) -> Tuple[str, ...]:
    """The names a dispatcher (or the config) accepts, in declaration order."""
    return tuple(b.value for b in backends)


__all__ = ["AttentionBackend", "MaskBackend", "NormBackend", "values"]
