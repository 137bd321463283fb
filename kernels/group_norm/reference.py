"""Group LayerNorm (paper eq. 6, 10): LayerNorm over features with per-group affine parameters.

x       [N, D]   jagged tokens of a batch
group   [N]      int64 group of each token (which history / real-time sequence, which scenario)
weight  [G, D], bias [G, D]

y[i] = (x[i] - mean(x[i])) / sqrt(var(x[i]) + eps) * weight[group[i]] + bias[group[i]]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def group_layer_norm_reference(
    x: torch.Tensor, group: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    normed = F.layer_norm(x, (x.shape[-1],), eps=eps)
    return normed * weight[group] + bias[group]
