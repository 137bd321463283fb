"""MMoE heads over the last layer's T tokens, one tower per scenario x task, and the loss.

::

    T token of scenario s  --> experts e=1..E (shared by all scenarios): silu(W_e x)  [n_s, E, expert_dim]
                           --> gate (s, t): softmax(G_{s,t} x)                          [n_s, T_s, E]
                           --> mixture (s, t) = sum_e gate * expert                     [n_s, T_s, expert_dim]
                           --> tower (s, t): MLP -> one raw logit z_{s,t}               [n_s, T_s]

Funnel tasks (``tasks: [click, order]``: a later task implies the earlier ones). With
``conditional_towers`` (default) tower t predicts the conditional ``p(task t | task t-1)`` and
the exposure-level probability is the product down the funnel (ESMM-style CTCVR)::

    p(click) = sigmoid(z_click)
    p(order) = p(click) * sigmoid(z_order)          = p(click) * p(order | click)

Each unconditional probability is trained with BCE against its own label on every labelled
exposure (the whole exposure space, so no selection bias), computed in log space. The returned
``logits`` are ``log(p / (1 - p))`` of these unconditional probabilities. With
``conditional_towers: false`` every tower predicts its task independently (``p = sigmoid(z)``).

Loss (``loss_average``), over the exposures whose ``label_mask`` is set:

* ``exposure`` (default): the ``task_weights``-weighted mean BCE over every labelled
  (exposure, task) pair of the batch, ``sum w_st * sum_i bce_i / sum w_st * n_st``. Every label
  counts the same, whatever its scenario's size.
* ``task``: the weighted mean over the scenario x tasks present in the batch of each one's mean
  BCE. A sparse scenario with 15 exposures in a batch then weighs as much as one with 450:
  each of its exposures 30 times more. Measured on the synthetic benchmark (docs/TRAINING.md),
  that noise cost the sparse scenario 8 AUC points and the large ones nothing gained.

Absent scenario x tasks count neither in the numerator nor the denominator. All of it is tensor
arithmetic: no host synchronisation.
"""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mtfm_rec.data.batch import Batch
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.model.config import LOSS_AVERAGES, ModelConfig

_LN2 = math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable at both ends (and NaN-free gradients)."""
    x = x.clamp(max=-1e-12)
    near = torch.log(-torch.expm1(x.clamp(min=-_LN2)))
    far = torch.log1p(-torch.exp(x.clamp(max=-_LN2)))
    return torch.where(x > -_LN2, near, far)


def funnel_log_probs(raw: torch.Tensor, conditional: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(log p, log(1 - p))`` of each task's exposure-level probability from tower logits ``[n, T]``."""
    if not conditional:
        return F.logsigmoid(raw), F.logsigmoid(-raw)
    log_p = torch.cumsum(F.logsigmoid(raw), dim=-1)
    log_q = torch.cat([F.logsigmoid(-raw[:, :1]), log1mexp(log_p[:, 1:])], dim=-1)
    return log_p, log_q


class _Towers(nn.Module):
    """``num_tasks`` two-layer MLP towers evaluated as one batched matmul."""

    def __init__(self, num_tasks: int, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_tasks, in_dim, hidden))
        self.b1 = nn.Parameter(torch.zeros(num_tasks, hidden))
        self.w2 = nn.Parameter(torch.empty(num_tasks, hidden))
        self.b2 = nn.Parameter(torch.zeros(num_tasks))
        nn.init.uniform_(self.w1, -(in_dim**-0.5), in_dim**-0.5)
        nn.init.uniform_(self.w2, -(hidden**-0.5), hidden**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[n, num_tasks, in_dim]`` -> logits ``[n, num_tasks]``."""
        h = F.silu(torch.einsum("nti,tih->nth", x, self.w1) + self.b1)
        return (h * self.w2).sum(-1) + self.b2


class MMoEHeads(nn.Module):
    """Shared experts, a gate and a tower per scenario x task.

    Args:
        schema: scenarios and their tasks (in funnel order).
        config: ``d_model``, ``num_experts``, ``expert_dim``, ``tower_dim``, ``conditional_towers``.
    """

    def __init__(self, schema: DatasetSchema, config: ModelConfig) -> None:
        super().__init__()
        self.num_experts, self.expert_dim = config.num_experts, config.expert_dim
        self.conditional = config.conditional_towers
        self.norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.experts = nn.Linear(config.d_model, config.num_experts * config.expert_dim)
        self.scenario_names = [s.name for s in schema.scenarios]
        self.num_tasks = [len(s.tasks) for s in schema.scenarios]
        self.gates = nn.ModuleList(nn.Linear(config.d_model, n * config.num_experts) for n in self.num_tasks)
        self.towers = nn.ModuleList(_Towers(n, config.expert_dim, config.tower_dim) for n in self.num_tasks)

    def forward(self, x: torch.Tensor, rows: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Raw tower logits per scenario.

        Args:
            x: ``[N, d_model]`` last-layer tokens.
            rows: per scenario, the token row of each exposure (KJT order).
        Returns:
            scenario -> ``[n_s, num_tasks_s]`` raw tower logits (see :func:`funnel_log_probs`).
        """
        return {name: self.scenario_logits(i, x[rows[name]]) for i, name in enumerate(self.scenario_names)}

    def scenario_logits(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Raw tower logits ``[n, num_tasks]`` of scenario ``index`` for its inputs ``x [n, d_model]``."""
        n_tasks = self.num_tasks[index]
        h = self.norm(x)
        experts = F.silu(self.experts(h)).view(-1, self.num_experts, self.expert_dim)
        weights = torch.softmax(self.gates[index](h).view(-1, n_tasks, self.num_experts), dim=-1)
        return self.towers[index](torch.bmm(weights, experts))  # [n, T_s, expert_dim] -> [n, T_s]


def multi_task_loss(
    log_p: Dict[str, torch.Tensor],
    log_q: Dict[str, torch.Tensor],
    labels: Dict[str, torch.Tensor],
    label_mask: Dict[str, torch.Tensor],
    task_names: Dict[str, List[str]],
    task_weights: Dict[str, torch.Tensor],
    average: str = "exposure",
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Weighted mean of the masked BCE, per labelled exposure or per task (module docstring).

    ``task_weights``: per scenario a ``[num_tasks]`` tensor (see :func:`task_weight_vectors`);
    ``average``: one of :data:`LOSS_AVERAGES`.

    Returns ``(loss, {"<scenario>/<task>": mean BCE of that task in this batch (0 if absent)})``.
    """
    if average not in LOSS_AVERAGES:
        raise ValueError(f"loss average {average!r} unknown; choose one of {LOSS_AVERAGES}")
    total = None
    weight_sum = None
    parts: Dict[str, torch.Tensor] = {}
    for name, lp in log_p.items():
        y = labels[name].to(lp.dtype)
        m = label_mask[name].to(lp.dtype)
        bce = -(y * lp + (1.0 - y) * log_q[name]) * m
        count = m.sum(0)
        mean = bce.sum(0) / count.clamp(min=1.0)  # [T_s]
        for i, t in enumerate(task_names[name]):
            parts[f"{name}/{t}"] = mean[i]
        if average == "exposure":
            w = task_weights[name].to(lp.dtype)
            num, den = (w * bce.sum(0)).sum(), (w * count).sum()
        else:
            w = task_weights[name].to(lp.dtype) * (count > 0).to(lp.dtype)
            num, den = (w * mean).sum(), w.sum()
        total = num if total is None else total + num
        weight_sum = den if weight_sum is None else weight_sum + den
    assert total is not None and weight_sum is not None, "a schema has at least one scenario"
    return total / weight_sum.clamp(min=1e-12), parts


def task_weight_vectors(schema: DatasetSchema, weights: Dict[str, float]) -> Dict[str, torch.Tensor]:
    """``model.task_weights`` ("<scenario>/<task>" -> w, default 1) as per-scenario vectors.

    Raises:
        ValueError: a key names no scenario x task of the schema (a typo must not be ignored).
    """
    known = {f"{s.name}/{t}" for s in schema.scenarios for t in s.tasks}
    unknown = sorted(set(weights) - known)
    if unknown:
        raise ValueError(f"model.task_weights: unknown scenario/task {unknown}; known: {sorted(known)}")
    return {
        s.name: torch.tensor([float(weights.get(f"{s.name}/{t}", 1.0)) for t in s.tasks])
        for s in schema.scenarios
    }


class MultiTaskOutput(nn.Module):
    """Raw tower logits of every scenario x task -> ``(loss, out)``, the output every model of
    the framework returns (MTFM and the baselines alike, so the trainer, metrics and serving
    treat them the same).

    Args:
        schema: scenarios and their tasks (in funnel order).
        config: ``task_weights``, ``conditional_towers``, ``loss_average``.
    """

    def __init__(self, schema: DatasetSchema, config: ModelConfig) -> None:
        super().__init__()
        self.task_names = {s.name: list(s.tasks) for s in schema.scenarios}
        self.conditional = config.conditional_towers
        self.loss_average = config.loss_average
        for i, vec in enumerate(task_weight_vectors(schema, config.task_weights).values()):
            self.register_buffer(f"task_weight_{i}", vec, persistent=False)

    def task_weights(self) -> Dict[str, torch.Tensor]:
        return {name: getattr(self, f"task_weight_{i}") for i, name in enumerate(self.task_names)}

    def forward(
        self, raw: Dict[str, torch.Tensor], batch: Batch
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``raw``: scenario -> ``[n_s, num_tasks_s]`` tower logits (exposures in KJT order).

        Returns:
            ``(loss, out)``: ``out["<scenario>"]`` the probabilities, ``out["<scenario>/logits"]``
            their logits, ``out["loss/<scenario>/<task>"]`` the detached per-task mean BCE.
        """
        log_p: Dict[str, torch.Tensor] = {}
        log_q: Dict[str, torch.Tensor] = {}
        for name, z in raw.items():
            log_p[name], log_q[name] = funnel_log_probs(z.float(), self.conditional)
        loss, parts = multi_task_loss(
            log_p,
            log_q,
            batch.labels,
            batch.label_mask,
            self.task_names,
            self.task_weights(),
            self.loss_average,
        )
        out: Dict[str, torch.Tensor] = {}
        for name in raw:
            out[name] = log_p[name].exp()
            out[f"{name}/logits"] = log_p[name] - log_q[name]
        for key, value in parts.items():
            out[f"loss/{key}"] = value.detach()
        return loss, out
