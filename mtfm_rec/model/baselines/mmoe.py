"""MMoE (Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD 2018), a general recommender of the paper's Table 2.

Eq. 5 of the MMoE paper, per task k over the shared experts f_i::

    y_k = h_k( sum_i g_k(x)_i f_i(x) ),   g_k(x) = softmax(W_gk x)

Input ``x``: the flattened exposure fields of :mod:`mtfm_rec.model.baselines.inputs` (the
candidate's features and its target-attention pooled history). The experts, gates and towers
are :class:`mtfm_rec.model.heads.MMoEHeads`, MTFM's own heads, on that vector: the comparison
then isolates what MTFM adds before its heads. Trained per scenario (one model per scenario).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedTensor

from mtfm_rec.data.batch import Batch
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.model.baselines.inputs import ExposureFields
from mtfm_rec.model.config import ModelConfig
from mtfm_rec.model.heads import MMoEHeads, MultiTaskOutput


class MMoEDense(nn.Module):
    """Exposure fields -> flattened -> MMoE experts, per-task gates and towers -> loss."""

    def __init__(self, schema: DatasetSchema, config: ModelConfig) -> None:
        super().__init__()
        self.inputs = ExposureFields(schema, config)
        width = self.inputs.num_fields * config.d_model
        self.scenario_names = [s.name for s in schema.scenarios]
        self.heads = MMoEHeads(schema, dataclasses.replace(config, d_model=width))
        self.output = MultiTaskOutput(schema, config)

    def forward(
        self,
        embeddings: Dict[str, JaggedTensor],
        batch: Batch,
        bag_embeddings: Optional[KeyedTensor] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        fields = self.inputs(embeddings, batch, bag_embeddings)
        raw = {
            name: self.heads.scenario_logits(i, fields[name].flatten(1))
            for i, name in enumerate(self.scenario_names)
        }
        return self.output(raw, batch)
