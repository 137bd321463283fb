"""Group LayerNorm dispatcher (see ``reference.py`` for the semantics)."""

from __future__ import annotations

import torch

from mtfm_rec.kernels.group_norm.reference import group_layer_norm_reference

BACKENDS = ("auto", "reference")


def group_layer_norm(
    x: torch.Tensor,
    group: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    backend: str = "auto",
) -> torch.Tensor:
    if backend not in BACKENDS:
        raise ValueError(f"group norm backend {backend!r} unknown; choose one of {BACKENDS}")
    return group_layer_norm_reference(x, group, weight, bias, eps)


__all__ = ["BACKENDS", "group_layer_norm", "group_layer_norm_reference"]
