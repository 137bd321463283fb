"""The Hybrid Target Attention stack (paper 3.2.2): (K:P) x B layers.

Each of the B blocks is P full layers followed by K target layers (``ModelConfig.layer_kinds``),
so the context tokens (H, R) are refreshed by the full layers and the T tokens then attend to
them with the cheap target layers::

    (3:1) x 2:   full  target target target | full  target target target
    (0:16) x 1:  full x 16                  (plain HSTU, every token updated every layer)
    (16:0) x 1:  target x 16                (the "lazy decoder": H and R stay the tokenizer's)

Forward multiply-adds per layer for a sample of N tokens, L_T of them targets (D head dim)::

    full:    N d (2HD + 2GD) + N HD d + 2 N^2 H D            (f1, f2, attention)
    target:  N d 2GD + L_T d 2HD + L_T HD d + 2 L_T N H D     (f_kv on all N; f_uq, f2 on T)

so with L_T << N a target layer is O(N d G D + L_T N H D) against O(N^2 H D) for a full one;
``mtfm_rec.bench.model`` measures both.
"""

from __future__ import annotations

import torch
from torch import nn

from mtfm_rec.model.attention import make_layer
from mtfm_rec.model.config import ModelConfig
from mtfm_rec.model.mask import AttentionLayout


class HybridTargetAttention(nn.Module):
    """``config.layer_kinds`` HSTU layers with per-token-group norms (``num_groups`` groups)."""

    def __init__(self, config: ModelConfig, num_groups: int, ticks_per_second: int = 1) -> None:
        super().__init__()
        self.kinds = config.layer_kinds
        self.layers = nn.ModuleList(
            make_layer(kind, config, num_groups, ticks_per_second) for kind in self.kinds
        )

    def forward(self, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        """``x``: ``[N, d_model]`` tokens of ``layout`` -> ``[N, d_model]``."""
        for layer in self.layers:
            x = layer(x, layout)
        return x
