"""PEPNet (Chang et al., "PEPNet: Parameter and Embedding Personalized Network for Infusing with
Personalized Prior Information", KDD 2023), a multi-scenario multi-task baseline of the paper's
Table 2. One model for every scenario (the PEPNet paper's "domains") and task.

* **Gate NU** (eq. 1-2): ``delta = gamma * sigmoid(W2 relu(W1 x + b1) + b2)``, ``gamma = 2``: a
  gate in (0, 2) that can amplify as well as damp what it scales. Its hidden width is the width
  of what it gates (``d_model`` for EPNet, the layer's width for PPNet).
* **EPNet** (eq. 3): ``delta_domain = GateNU(E(F_d) (+) stopgrad(E))`` with one scalar per field,
  and ``O_ep = delta_domain (x) E``: each field's embedding scaled by its domain gate.
* **PPNet** (eq. 4-5): per task a DNN tower of ``model.baseline.hidden`` widths (ReLU) and one
  logit; every hidden layer's output ``H`` is scaled by its own Gate NU over the personal prior
  and ``stopgrad(O_ep)``: ``O_pp = delta_task (x) H``, ``delta_task = GateNU(prior (+)
  stopgrad(O_ep))`` (one gate per layer, its output split among the tasks).

The stop-gradients keep the gates from reshaping the general embeddings: ``E`` (and ``O_ep``)
get gradients only through what they are multiplied with, never through a gate's input.

Which of our features play the paper's priors:

* general embeddings ``E``: the ``[n_s, F, d_model]`` exposure fields of
  :mod:`mtfm_rec.model.baselines.inputs` (field 0 the candidate, the exposure's own user, item,
  cross and dense features through the tokenizer; field 1 its target-attention pooled history);
* domain prior ``E(F_d)`` (the paper's domain id and domain statistics): a learned scenario
  embedding of ``model.embedding_dim``;
* user / item / author priors ``E(F_u) (+) E(F_i) (+) E(F_a)``: the candidate field (field 0),
  which carries the item and user features of the exposure (we have no separate author id, and
  the user's id enters only through those features), concatenated with the scenario embedding.

Tasks: one tower per task name of the schema (``click``, ``order``, ...), shared by the scenarios
that have that task (PEPNet's towers are per task; the scenario personalises them through EPNet
and the prior); each scenario reads its own tasks' logits, in its funnel order. Trained on all
scenarios at once.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedTensor

from mtfm_rec.data.batch import Batch
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.model.baselines.inputs import ExposureFields, TaskColumns
from mtfm_rec.model.config import ModelConfig
from mtfm_rec.model.heads import MultiTaskOutput

GATE_GAMMA = 2.0  # the paper's scaling factor gamma of the Gate NU's sigmoid


class GateNU(nn.Module):
    """Eq. 1-2: ``gamma * sigmoid(W2 relu(W1 x + b1) + b2)``, values in ``(0, gamma)``."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, gamma: float = GATE_GAMMA) -> None:
        super().__init__()
        self.gamma = gamma
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [n, in_dim]`` -> gate ``[n, out_dim]``."""
        return self.gamma * torch.sigmoid(self.fc2(F.relu(self.fc1(x))))


class EPNet(nn.Module):
    """Eq. 3: per field a domain gate over (domain prior, stopgrad(fields)) scales the field."""

    def __init__(self, num_fields: int, field_dim: int, domain_dim: int) -> None:
        super().__init__()
        self.gate = GateNU(domain_dim + num_fields * field_dim, field_dim, num_fields)

    def forward(self, fields: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        """``fields [n, F, d]``, ``domain [n, domain_dim]`` -> ``O_ep [n, F, d]``."""
        delta = self.gate(torch.cat([domain, fields.detach().flatten(1)], dim=-1))  # [n, F]
        return delta.unsqueeze(-1) * fields


class PPNet(nn.Module):
    """Eq. 4-5: ``num_tasks`` DNN towers over ``O_ep``; each hidden layer's output is scaled by a
    Gate NU over (personal prior, stopgrad(O_ep)).

    Args:
        in_dim: width of the flat ``O_ep``.
        prior_dim: width of the personal prior.
        hidden: the towers' hidden widths (``model.baseline.hidden``); none: linear towers.
        num_tasks: towers (one logit each).
        dropout: after each gated hidden layer.
    """

    def __init__(
        self, in_dim: int, prior_dim: int, hidden: Sequence[int], num_tasks: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.num_tasks, self.hidden = num_tasks, list(hidden)
        widths = [in_dim, *hidden]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(num_tasks, i, o)) for i, o in zip(widths[:-1], widths[1:])
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(num_tasks, o)) for o in hidden)
        self.gates = nn.ModuleList(GateNU(prior_dim + in_dim, o, num_tasks * o) for o in hidden)
        self.out_weight = nn.Parameter(torch.empty(num_tasks, widths[-1]))
        self.out_bias = nn.Parameter(torch.zeros(num_tasks))
        for w, fan_in in zip([*self.weights, self.out_weight], widths):
            nn.init.uniform_(w, -(fan_in**-0.5), fan_in**-0.5)
        self.dropout = nn.Dropout(dropout)

    def forward(self, o_ep: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """``o_ep [n, in_dim]``, ``prior [n, prior_dim]`` -> logits ``[n, num_tasks]``."""
        gate_input = torch.cat([prior, o_ep.detach()], dim=-1)
        h = o_ep.unsqueeze(1).expand(-1, self.num_tasks, -1)  # [n, tasks, in_dim]
        for w, b, gate, width in zip(self.weights, self.biases, self.gates, self.hidden):
            h = F.relu(torch.einsum("nki,kio->nko", h, w) + b)
            h = self.dropout(h * gate(gate_input).view(-1, self.num_tasks, width))
        return (h * self.out_weight).sum(-1) + self.out_bias


class PEPNetDense(nn.Module):
    """Exposure fields -> EPNet (scenario gate per field) -> PPNet towers -> loss."""

    def __init__(self, schema: DatasetSchema, config: ModelConfig) -> None:
        super().__init__()
        self.inputs = ExposureFields(schema, config)
        num_fields, d = self.inputs.num_fields, config.d_model
        self.scenario_names = [s.name for s in schema.scenarios]
        self.tasks = TaskColumns(schema)
        self.scenario_embedding = nn.Embedding(len(schema.scenarios), config.embedding_dim)
        self.epnet = EPNet(num_fields, d, config.embedding_dim)
        self.ppnet = PPNet(
            num_fields * d,
            d + config.embedding_dim,
            config.baseline.hidden,
            len(self.tasks.names),
            config.dropout,
        )
        self.output = MultiTaskOutput(schema, config)

    def scenario_logits(self, p: int, fields: torch.Tensor) -> torch.Tensor:
        """Raw logits ``[n, num_tasks_p]`` of scenario ``p`` from its fields ``[n, F, d_model]``."""
        domain = self.scenario_embedding.weight[p].expand(fields.shape[0], -1).to(fields.dtype)
        o_ep = self.epnet(fields, domain)
        prior = torch.cat([fields[:, 0], domain], dim=-1)  # user/item prior (module docstring)
        logits = self.ppnet(o_ep.flatten(1), prior)
        return self.tasks(logits, p)

    def forward(
        self,
        embeddings: Dict[str, JaggedTensor],
        batch: Batch,
        bag_embeddings: Optional[KeyedTensor] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        fields = self.inputs(embeddings, batch, bag_embeddings)
        raw = {name: self.scenario_logits(p, fields[name]) for p, name in enumerate(self.scenario_names)}
        return self.output(raw, batch)
