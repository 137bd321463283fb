"""Group LayerNorm for the CPU with the per-group affine as one-hot matmuls.

The reference reads ``weight[group]``: its backward is an accumulating ``index_put`` of N rows
into G rows, which runs serially on the CPU and was the largest single cost of a training step
(docs/KERNELS.md). Here the gather is ``onehot(group) @ weight`` ([N, G] x [G, D]), whose backward
``onehot^T @ dy`` is one small matmul; each output row sums one non-zero term, so the forward
equals the reference exactly and the parameter gradients to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def group_layer_norm_onehot(
    x: torch.Tensor, group: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """Same contract as ``reference.group_layer_norm_reference``."""
    normed = F.layer_norm(x, (x.shape[-1],), eps=eps)
    onehot = F.one_hot(group, weight.shape[0]).to(normed.dtype)  # [N, G]
    return normed * (onehot @ weight.to(normed.dtype)) + onehot @ bias.to(normed.dtype)
