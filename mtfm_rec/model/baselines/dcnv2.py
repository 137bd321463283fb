"""DCN-V2 (Wang et al., "DCN V2: Improved Deep & Cross Network and Practical Lessons for
Web-scale Learning to Rank Systems", WWW 2021), a feature-interaction baseline of the paper's
Table 2.

Cross layer, eq. (1) of the DCN-V2 paper, on ``x0`` and the previous layer's ``x_l`` (width ``D``)::

    x_{l+1} = x0 ⊙ (W_l x_l + b_l) + x_l                 W_l: D x D (model.baseline.cross_rank=0)

and its low-rank form, eq. (2) (``cross_rank=r > 0``; mixture-free, one expert)::

    x_{l+1} = x0 ⊙ (U_l (V_l^T x_l) + b_l) + x_l         U_l, V_l: D x r

``model.baseline.cross_layers`` such layers form the cross network; the deep network is an MLP
(``model.baseline.hidden``, ReLU). Structures (section 3.1, Figure 2)::

    stacked   (cross_structure=stacked):  logits = head(deep(cross(x0)))
    parallel  (cross_structure=parallel): logits = head([cross(x0); deep(x0)])

``head`` is the paper's output layer ``w^T x``, one logit per task of the scenario.

Input ``x0``: the flattened exposure fields of :mod:`mtfm_rec.model.baselines.inputs` (the
candidate's features and its target-attention pooled history), ``D = num_fields * d_model``,
layer-normalised first (not in the paper: the fields come out of MLPs and an attention readout,
not raw embedding lookups, and ``x0 ⊙ (.)`` compounds their scale layer after layer). The
networks are per scenario, as the paper trains one model per scenario (one job each with
``data.scenarios=[<s>]``); the inputs are shared.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.model.baselines.inputs import PerScenarioDense
from mtfm_rec.model.config import BaselineConfig, ModelConfig


class CrossLayer(nn.Module):
    """One cross layer: eq. (1) with ``rank=0``, else eq. (2) (module docstring).

    Args:
        width: ``D``, the width of ``x0`` and ``x_l``.
        rank: 0 for a full-rank ``W``; ``r > 0`` for ``W = U V^T`` (``project[0]`` is ``V^T``,
            ``project[1]`` is ``U`` and holds ``b``).
    """

    def __init__(self, width: int, rank: int = 0) -> None:
        super().__init__()
        self.project: nn.Module
        if rank == 0:
            self.project = nn.Linear(width, width)
        else:
            self.project = nn.Sequential(nn.Linear(width, rank, bias=False), nn.Linear(rank, width))

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``x0``, ``x``: ``[n, D]`` -> ``x_{l+1}`` ``[n, D]``."""
        return x0 * self.project(x) + x


def deep_network(in_dim: int, hidden: List[int], dropout: float) -> nn.Sequential:
    """The deep part: ``Linear -> ReLU -> Dropout`` per width of ``hidden`` (identity if empty)."""
    layers: List[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = width
    return nn.Sequential(*layers)


class DCNv2Network(nn.Module):
    """One scenario's DCN-V2: ``x0 [n, D]`` -> raw logits ``[n, num_tasks]``.

    Args:
        width: ``D``.
        num_tasks: the scenario's tasks (one logit each).
        baseline: ``cross_layers``, ``cross_rank``, ``cross_structure``, ``hidden``.
        dropout: of the deep network.
        norm_eps: of the input LayerNorm.
    """

    def __init__(
        self,
        width: int,
        num_tasks: int,
        baseline: BaselineConfig,
        dropout: float = 0.0,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.stacked = baseline.cross_structure == "stacked"
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        rank = baseline.cross_rank
        self.cross = nn.ModuleList(CrossLayer(width, rank) for _ in range(baseline.cross_layers))
        self.deep = deep_network(width, list(baseline.hidden), dropout)
        deep_out = baseline.hidden[-1] if baseline.hidden else width
        self.head = nn.Linear(deep_out if self.stacked else width + deep_out, num_tasks)

    def cross_network(self, x0: torch.Tensor) -> torch.Tensor:
        """``x_L`` after every cross layer, ``[n, D]``."""
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return x

    def features(self, x0: torch.Tensor) -> torch.Tensor:
        """What the head reads: ``deep(cross(x0))`` (stacked) or ``[cross(x0); deep(x0)]`` (parallel)."""
        if self.stacked:
            return self.deep(self.cross_network(x0))
        return torch.cat([self.cross_network(x0), self.deep(x0)], dim=-1)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.norm(x0)))


class DCNv2Dense(PerScenarioDense):
    """Exposure fields -> flattened -> the scenario's DCN-V2 -> one logit per task -> loss."""

    def __init__(self, schema: DatasetSchema, config: ModelConfig) -> None:
        super().__init__(
            schema,
            config,
            lambda width, tasks: DCNv2Network(width, tasks, config.baseline, config.dropout, config.norm_eps),
        )
