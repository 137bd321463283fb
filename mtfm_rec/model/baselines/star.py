"""STAR (Sheng et al., "One Model to Serve All: Star Topology Adaptive Recommender for
Multi-Domain CTR Prediction", CIKM 2021), a multi-scenario baseline of the paper's Table 2.

One model for every scenario (a "domain" p of the STAR paper), in three parts:

* **Partitioned normalisation** (eq. 3), on the input of the FCN::

      z' = (gamma * gamma_p) * (z - E_p) / sqrt(Var_p + eps) + (beta + beta_p)

  ``E_p``/``Var_p``: in training the mean and (biased) variance of scenario p's rows of the
  batch, in evaluation per-scenario moving averages (updated as ``torch.nn.BatchNorm1d`` does,
  momentum 0.1, unbiased variance). A scenario with fewer than two rows in a training batch
  (the sparse scenario often has none or one) has no usable batch variance: it is normalised by
  its moving averages and leaves them unchanged.
* **Star topology FCN** (eq. 4-5): every layer's weight and bias are a scenario's own and the
  shared ones combined, ``W_p* = W_p (.) W`` (element-wise) and ``b_p* = b_p + b``::

      out_p(x) = x @ (W_p (.) W) + b_p + b,     ReLU between layers

  widths ``model.baseline.hidden``. ``W_p`` starts at ones and ``b_p`` at zeros (as in the
  paper), so every scenario starts from the shared network.
* **Auxiliary network** (eq. 6): a two-layer MLP (``model.tower_dim`` hidden units) over the
  concatenation of a learned scenario-indicator embedding (``model.embedding_dim``) and the
  fields; its logit ``s_a`` is added to the FCN's ``s_m``: ``p = sigmoid(s_m + s_a)``.

Inputs: per scenario the ``[n_s, F, d_model]`` exposure fields of
:mod:`mtfm_rec.model.baselines.inputs` (the candidate's features and its target-attention
pooled history; each scenario's own features are already mapped to ``d_model``), flattened to
``[n_s, F * d_model]`` (the paper's pooled and concatenated embeddings).

Tasks: the last FCN layer (and the auxiliary network) output one logit per task name of the
schema (``click``, ``order``, ...): a task of the same name shares its column across scenarios,
and each scenario reads the columns of its own tasks, in its funnel order. Trained on all
scenarios at once.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedTensor

from mtfm_rec.data.batch import Batch
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.model.baselines.inputs import ExposureFields, TaskColumns
from mtfm_rec.model.config import ModelConfig
from mtfm_rec.model.heads import MultiTaskOutput

PN_MOMENTUM = 0.1  # weight of a batch's statistics in the moving averages (BatchNorm's default)


class PartitionedNorm(nn.Module):
    """Eq. 3: normalisation by each partition's (scenario's) own statistics, with the shared
    ``gamma``/``beta`` times/plus the partition's ``gamma_p``/``beta_p``.

    Args:
        num_partitions: scenarios.
        dim: features normalised (the last dimension).
        eps: added to the variance.
        momentum: the batch statistics' weight in the moving averages.
    """

    running_mean: torch.Tensor  # [num_partitions, dim] buffers
    running_var: torch.Tensor

    def __init__(
        self, num_partitions: int, dim: int, eps: float = 1e-5, momentum: float = PN_MOMENTUM
    ) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.partition_weight = nn.Parameter(torch.ones(num_partitions, dim))
        self.partition_bias = nn.Parameter(torch.zeros(num_partitions, dim))
        self.register_buffer("running_mean", torch.zeros(num_partitions, dim))
        self.register_buffer("running_var", torch.ones(num_partitions, dim))

    def forward(self, xs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """``xs[p]``: partition p's rows ``[n_p, dim]`` -> each normalised by its own statistics."""
        return [self.normalize(x, p) for p, x in enumerate(xs)]

    def normalize(self, x: torch.Tensor, p: int) -> torch.Tensor:
        """Partition ``p``'s rows ``[n, dim]`` normalised (module docstring for n < 2)."""
        n = x.shape[0]  # a host-side shape: no synchronisation
        xf = x.float()  # statistics in float32 under bf16 autocast
        if self.training and n >= 2:
            mean, var = xf.mean(0), xf.var(0, unbiased=False)
            with torch.no_grad():
                self.running_mean[p].lerp_(mean.detach(), self.momentum)
                self.running_var[p].lerp_(var.detach() * (n / (n - 1)), self.momentum)
        else:
            mean, var = self.running_mean[p], self.running_var[p]
        scale = self.weight * self.partition_weight[p]
        shift = self.bias + self.partition_bias[p]
        return ((xf - mean) * torch.rsqrt(var + self.eps) * scale + shift).to(x.dtype)


class StarLinear(nn.Module):
    """Eq. 4-5: one FCN layer whose weight is ``W_p (.) W`` and bias ``b_p + b`` for partition p.

    ``W`` is initialised as :class:`mtfm_rec.model.heads._Towers` initialises its layers,
    ``W_p`` to ones and ``b, b_p`` to zeros.
    """

    def __init__(self, num_partitions: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        self.partition_weight = nn.Parameter(torch.ones(num_partitions, in_dim, out_dim))
        self.partition_bias = nn.Parameter(torch.zeros(num_partitions, out_dim))
        nn.init.uniform_(self.weight, -(in_dim**-0.5), in_dim**-0.5)

    def forward(self, x: torch.Tensor, p: int) -> torch.Tensor:
        """``x [n, in_dim]`` of partition ``p`` -> ``[n, out_dim]``."""
        return x @ (self.partition_weight[p] * self.weight) + self.partition_bias[p] + self.bias


class StarFCN(nn.Module):
    """Star topology FCN: :class:`StarLinear` layers of ``widths`` with ReLU (and dropout) between."""

    def __init__(self, num_partitions: int, widths: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(StarLinear(num_partitions, i, o) for i, o in zip(widths[:-1], widths[1:]))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, p: int) -> torch.Tensor:
        """``x [n, widths[0]]`` of partition ``p`` -> ``[n, widths[-1]]``."""
        for i, layer in enumerate(self.layers):
            x = layer(x, p)
            if i < len(self.layers) - 1:
                x = self.dropout(F.relu(x))
        return x


class AuxiliaryNetwork(nn.Module):
    """Eq. 6: a two-layer MLP over (scenario-indicator embedding, features) -> logits ``s_a``."""

    def __init__(
        self, num_partitions: int, indicator_dim: int, in_dim: int, hidden: int, out_dim: int
    ) -> None:
        super().__init__()
        self.indicator = nn.Embedding(num_partitions, indicator_dim)
        self.mlp = nn.Sequential(
            nn.Linear(indicator_dim + in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim)
        )

    def forward(self, x: torch.Tensor, p: int) -> torch.Tensor:
        """``x [n, in_dim]`` of partition ``p`` -> ``[n, out_dim]``."""
        indicator = self.indicator.weight[p].expand(x.shape[0], -1)
        return self.mlp(torch.cat([indicator.to(x.dtype), x], dim=-1))


class STARDense(nn.Module):
    """Exposure fields -> flattened -> partitioned norm -> star FCN, + auxiliary net -> loss."""

    def __init__(self, schema: DatasetSchema, config: ModelConfig) -> None:
        super().__init__()
        self.inputs = ExposureFields(schema, config)
        width = self.inputs.num_fields * config.d_model
        num_scenarios = len(schema.scenarios)
        self.scenario_names = [s.name for s in schema.scenarios]
        self.tasks = TaskColumns(schema)
        self.norm = PartitionedNorm(num_scenarios, width, eps=config.norm_eps)
        self.fcn = StarFCN(
            num_scenarios, [width, *config.baseline.hidden, len(self.tasks.names)], config.dropout
        )
        self.aux = AuxiliaryNetwork(
            num_scenarios, config.embedding_dim, width, config.tower_dim, len(self.tasks.names)
        )
        self.output = MultiTaskOutput(schema, config)

    def scenario_logits(self, p: int, x: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
        """Raw logits ``s_m + s_a`` ``[n, num_tasks_p]`` of scenario ``p`` from its flat fields
        ``x`` and their partitioned normalisation ``normed``."""
        logits = self.fcn(normed, p) + self.aux(x, p)
        return self.tasks(logits, p)

    def forward(
        self,
        embeddings: Dict[str, JaggedTensor],
        batch: Batch,
        bag_embeddings: Optional[KeyedTensor] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        fields = self.inputs(embeddings, batch, bag_embeddings)
        flat = [fields[name].flatten(1) for name in self.scenario_names]
        normed = self.norm(flat)
        raw = {
            name: self.scenario_logits(p, flat[p], normed[p]) for p, name in enumerate(self.scenario_names)
        }
        return self.output(raw, batch)
