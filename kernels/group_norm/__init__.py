"""Group LayerNorm dispatcher (see ``reference.py`` for the semantics).

``backend`` (a :class:`NormBackend` or its value):

* ``"auto"``: Triton for CUDA tensors, the reference otherwise.
* ``"reference"``: plain PyTorch; any device.
* ``"triton"``: the Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
* ``"onehot"``: the per-group affine as one-hot matmuls (``onehot.py``), whose backward avoids
  the reference's serial accumulating gather.
* ``"cpp"``: the fused C++ kernel (``cpu.py``), one pass per direction: the CPU fast path.

A forced backend that cannot run raises; nothing falls back silently.
"""

from __future__ import annotations

from typing import Union

import torch

from mtfm_rec.kernels import triton_support
from mtfm_rec.kernels.backends import NormBackend, values
from mtfm_rec.kernels.group_norm.onehot import group_layer_norm_onehot
from mtfm_rec.kernels.group_norm.reference import group_layer_norm_reference

BACKENDS = values(NormBackend)


def group_layer_norm(
    x: torch.Tensor,
    group: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    backend: Union[NormBackend, str] = NormBackend.AUTO,
) -> torch.Tensor:
    """LayerNorm over the last dim of ``x`` [N, D] with affine ``weight[group]``, ``bias[group]``."""
    if backend not in BACKENDS:
        raise ValueError(f"group norm backend {backend!r} unknown; choose one of {BACKENDS}")
    chosen = NormBackend(backend)
    if chosen is NormBackend.AUTO:
        chosen = NormBackend.TRITON if x.is_cuda else NormBackend.REFERENCE
    if chosen is NormBackend.TRITON:
        impl = triton_support.load(
            "mtfm_rec.kernels.group_norm.triton", "group_layer_norm_triton", "group norm"
        )
        return impl(x, group, weight, bias, eps)
    if chosen is NormBackend.ONEHOT:
        return group_layer_norm_onehot(x, group, weight, bias, eps)
    if chosen is NormBackend.CPP:
        from mtfm_rec.kernels.group_norm.cpu import group_layer_norm_cpu  # builds on first use

        return group_layer_norm_cpu(x, group, weight, bias, eps)
    return group_layer_norm_reference(x, group, weight, bias, eps)


__all__ = [
    "BACKENDS",
    "NormBackend",
    "group_layer_norm",
    "group_layer_norm_onehot",
    "group_layer_norm_reference",
]
