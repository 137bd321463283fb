"""Group LayerNorm dispatcher (see ``reference.py`` for the semantics).

``backend``: ``"auto"`` (Triton for CUDA tensors, the reference otherwise), ``"reference"``,
``"triton"`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), ``"onehot"`` (the
per-group affine as one-hot matmuls, ``onehot.py``: the CPU fast path, whose backward avoids the
reference's serial accumulating gather). A forced backend that
cannot run raises; nothing falls back silently.
"""

from __future__ import annotations

import torch

from mtfm_rec.kernels.group_norm.onehot import group_layer_norm_onehot
from mtfm_rec.kernels.group_norm.reference import group_layer_norm_reference

BACKENDS = ("auto", "reference", "triton", "onehot")


def group_layer_norm(
    x: torch.Tensor,
    group: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    backend: str = "auto",
) -> torch.Tensor:
    """LayerNorm over the last dim of ``x`` [N, D] with affine ``weight[group]``, ``bias[group]``."""
    if backend not in BACKENDS:
        raise ValueError(f"group norm backend {backend!r} unknown; choose one of {BACKENDS}")
    if backend == "auto":
        backend = "triton" if x.is_cuda else "reference"
    if backend == "triton":
        try:
            from mtfm_rec.kernels.group_norm.triton import group_layer_norm_triton
        except ImportError as exc:
            raise RuntimeError(f"group norm backend 'triton' unavailable: {exc}") from exc
        return group_layer_norm_triton(x, group, weight, bias, eps)
    if backend == "onehot":
        return group_layer_norm_onehot(x, group, weight, bias, eps)
    return group_layer_norm_reference(x, group, weight, bias, eps)


__all__ = ["BACKENDS", "group_layer_norm", "group_layer_norm_onehot", "group_layer_norm_reference"]
