"""What the non-sequential baselines read: per exposure a few ``d_model`` fields, built from the
same tokens MTFM builds (so every model sees the same features through the same lookups).

MTFM turns a sample into tokens (H; R; T) and attends over them. DCNv2, MMoE, RankMixer, STAR
and PEPNet take one feature vector per exposure instead, and their papers read user behaviour
through a target-attention pooling of the sequence (DIN-style), so that is what they get::

    X(0) = HeterogeneousTokenizer(embeddings)          # [N, d]: H, R, T tokens (paper eq. 3-5)
    candidate_s = X(0)[T rows of scenario s]           # field 0: the exposure's features (eq. 4)
    interest_s  = TargetAttentionLayer(X(0))[T] - candidate_s
                                                       # field 1: one HSTU target-attention
                                                       # readout over the visible H and R tokens
    fields_s = stack(candidate_s, interest_s)          # [n_s, F, d], F = 2 (1 without sequences)

The pooling is one of MTFM's own target layers, under the same dynamic mask, so a baseline sees
exactly the history MTFM sees and no future action (R tokens only before the exposure's ts). Its
pointwise ``silu`` weights are not normalised over the history, as in DIN.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedTensor

from mtfm_rec.data.batch import Batch
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.model.attention import TargetAttentionLayer
from mtfm_rec.model.config import ModelConfig
from mtfm_rec.model.heads import MultiTaskOutput
from mtfm_rec.model.mask import model_layout
from mtfm_rec.model.tokenizer import HeterogeneousTokenizer


class TaskColumns(nn.Module):
    """For a network shared by all scenarios with one output column per task name (the
    schema's task names in first-appearance order, ``names``): each scenario's own tasks, in its
    funnel order, picked from those columns. A task name ("click") thus shares its column, and
    its output weights, across the scenarios that have it."""

    def __init__(self, schema: DatasetSchema) -> None:
        super().__init__()
        self.names: List[str] = []
        for s in schema.scenarios:
            self.names.extend(t for t in s.tasks if t not in self.names)
        for i, s in enumerate(schema.scenarios):
            cols = torch.tensor([self.names.index(t) for t in s.tasks], dtype=torch.int64)
            self.register_buffer(f"columns_{i}", cols, persistent=False)

    def columns(self, scenario: int) -> torch.Tensor:
        """``[num_tasks_s]`` column of each task of scenario number ``scenario``."""
        return getattr(self, f"columns_{scenario}")

    def forward(self, logits: torch.Tensor, scenario: int) -> torch.Tensor:
        """``[n, len(names)]`` -> scenario ``scenario``'s ``[n, num_tasks_s]``."""
        return logits.index_select(1, self.columns(scenario))


class ExposureFields(nn.Module):
    """Per scenario, ``[n_s, num_fields, d_model]`` fields of each exposure (module docstring).

    Args:
        schema: the dataset schema.
        config: ``model.*``; ``use_sequences=false`` leaves the candidate field alone.
    """

    def __init__(self, schema: DatasetSchema, config: ModelConfig) -> None:
        super().__init__()
        self.use_sequences = config.use_sequences
        self.tokenizer = HeterogeneousTokenizer(schema, config)
        self.pool = TargetAttentionLayer(config, len(schema.token_groups)) if config.use_sequences else None
        self.num_fields = 2 if config.use_sequences else 1
        self.d_model = config.d_model

    def forward(
        self,
        embeddings: Dict[str, JaggedTensor],
        batch: Batch,
        bag_embeddings: Optional[KeyedTensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """scenario -> ``[n_s, num_fields, d_model]`` (exposures in KJT order); ``bag_embeddings``:
        the pooled multi-hot features (the EmbeddingBagCollection output), when the schema has any."""
        layout, rows = model_layout(batch, self.use_sequences)
        x = self.tokenizer(embeddings, batch, layout.num_tokens, rows, bag_embeddings)
        if self.pool is None:
            return {name: x[r].unsqueeze(1) for name, r in rows.items()}
        interest = self.pool(x, layout) - x  # zero on H and R rows: a target layer updates T only
        return {name: torch.stack([x[r], interest[r]], dim=1) for name, r in rows.items()}


class PerScenarioDense(nn.Module):
    """The shape of every single-scenario baseline: shared :class:`ExposureFields`, flattened,
    then one network per scenario (the paper trains one model per scenario; in a one-scenario
    job, ``data.scenarios=[<s>]``, only scenario s's network gets data) -> loss.

    Args:
        schema: the dataset schema.
        config: ``model.*``.
        make_network: ``(input width, number of tasks) -> module`` mapping ``[n, width]`` to
            the scenario's raw tower logits ``[n, num_tasks]``.
    """

    def __init__(
        self, schema: DatasetSchema, config: ModelConfig, make_network: Callable[[int, int], nn.Module]
    ) -> None:
        super().__init__()
        self.inputs = ExposureFields(schema, config)
        width = self.inputs.num_fields * config.d_model
        self.scenario_names = [s.name for s in schema.scenarios]
        self.networks = nn.ModuleList(make_network(width, len(s.tasks)) for s in schema.scenarios)
        self.output = MultiTaskOutput(schema, config)

    def forward(
        self,
        embeddings: Dict[str, JaggedTensor],
        batch: Batch,
        bag_embeddings: Optional[KeyedTensor] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        fields = self.inputs(embeddings, batch, bag_embeddings)
        raw = {name: net(fields[name].flatten(1)) for name, net in zip(self.scenario_names, self.networks)}
        return self.output(raw, batch)
