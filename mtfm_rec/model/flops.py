"""Analytic FLOP count of an MTFM forward and training step, per batch: the numerator of MFU.

Conventions (the usual ones of MFU, e.g. PaLM appendix B):

* a multiply-add is 2 FLOPs; only matmul-shaped work is counted: every ``nn.Linear`` (bias adds
  left out), the MMoE mixture ``bmm``, the towers, and attention's ``Q K^T`` and ``A V``.
  Norms, activations, the mask, gathers and the loss are left out (a few % at most), and an
  embedding lookup is 0 FLOPs;
* a training step is 3 x the forward (backward = 2 x forward: the gradients of the inputs and
  of the weights), whatever the implementation actually recomputes;
* attention is counted *useful*: only the (query, key) pairs the dynamic mask lets through
  (``mask.py``: a query sees ``prefix_len`` keys, plus itself if it is a T token), 2 x H x D
  FLOPs for ``q.k`` and 2 x H x D for ``a v`` per pair. The ``*_padded`` figures are what a
  padded implementation (the ``prefix`` path, the kernel ``reference``) computes: every query
  row of ``[B, max_q]`` against every key of ``[B, max_tokens]``.

Per layer, for N tokens of which T are targets (d = d_model, D = head dim, H query heads,
G key-value heads)::

    full:    f1 2 N d (2HD + 2GD)  + f2 2 N HD d  + attention 4 HD x pairs(all N queries)
    target:  f1 2 N d 2GD + 2 T d 2HD + f2 2 T HD d + attention 4 HD x pairs(T queries)

The token counts are shapes (host ints even on a GPU); the visible pairs read the batch's
``token_ts`` / ``token_kind`` values, so :func:`model_flops` is meant for a batch still on the
host (the trainer counts each batch as the loader hands it out, before it is copied).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

from mtfm_rec.data.batch import Batch
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.kernels.jagged import KeySet, QuerySet, visible_prefix
from mtfm_rec.model.config import ModelConfig

TRAIN_STEP_FACTOR = 3  # forward + backward (2 x forward)


@dataclass(frozen=True)
class LayerFlops:
    """Forward FLOPs of one attention layer."""

    kind: str  # "full" | "target"
    projections: int  # f1 (U, Q, K, V rows computed) and f2
    attention: int  # Q K^T and A V over the visible (query, key) pairs
    attention_padded: int  # the same over padded [max_q, max_tokens] blocks


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs of one batch by part; :attr:`train_step` is 3 x :attr:`forward`."""

    tokenizer: int  # the per-sequence and per-scenario MLPs (eq. 3, 4)
    layers: Tuple[LayerFlops, ...]  # bottom-up, ModelConfig.layer_kinds
    heads: int  # experts, gates, mixture, towers
    visible_pairs: Tuple[int, int]  # (query, key) pairs of a (full, target) layer

    @property
    def projections(self) -> int:
        return sum(layer.projections for layer in self.layers)

    @property
    def attention(self) -> int:
        return sum(layer.attention for layer in self.layers)

    @property
    def attention_padded(self) -> int:
        return sum(layer.attention_padded for layer in self.layers)

    @property
    def forward(self) -> int:
        return self.tokenizer + self.projections + self.attention + self.heads

    @property
    def forward_padded(self) -> int:
        return self.forward - self.attention + self.attention_padded

    @property
    def train_step(self) -> int:
        return TRAIN_STEP_FACTOR * self.forward

    def by_part(self) -> Dict[str, int]:
        """Forward FLOPs as ``{"tokenizer", "<kind>/projections", "<kind>/attention",
        "<kind>/attention_padded", "heads"}`` (layers of one kind summed)."""
        out = {"tokenizer": self.tokenizer}
        for layer in self.layers:
            for part in ("projections", "attention", "attention_padded"):
                key = f"{layer.kind}/{part}"
                out[key] = out.get(key, 0) + getattr(layer, part)
        out["heads"] = self.heads
        return out


def _mlp(rows: int, dims: Sequence[int]) -> int:
    """FLOPs of ``tokenizer.mlp``: Linear layers ``dims[0] -> dims[1] -> ...`` on ``rows`` rows."""
    return sum(2 * rows * a * b for a, b in zip(dims[:-1], dims[1:]))


def tokenizer_flops(config: ModelConfig, schema: DatasetSchema, batch: Batch) -> int:
    """The MLPs of ``HeterogeneousTokenizer``: one row per action / exposure of the batch, and
    the time encoding's projection (one row per token) when it is on. (The bag pooling's adds,
    like the embedding lookups, are not matmul FLOPs and are not counted.)"""
    e, d, hidden = config.embedding_dim, config.d_model, list(config.tokenizer_hidden)
    total = 0
    if config.use_sequences:
        if config.time_frequencies > 0:
            total += _mlp(int(batch.token_ts.shape[0]), [2 * config.time_frequencies, d])
        for q in schema.ordered_sequences:
            rows = int(batch.sequence_positions[q.name].shape[0])
            total += _mlp(rows, [len(q.features) * e, *hidden, d])
    for s in schema.scenarios:
        rows = int(batch.target_positions[s.name].shape[0])
        # each multi-hot feature is one more pooled e-wide field of the MLP's input (eq. 4)
        fields = len(s.categorical()) + len(s.multi_hot())
        total += _mlp(rows, [fields * e + len(s.dense_features), *hidden, d])
    return total


def heads_flops(config: ModelConfig, schema: DatasetSchema, batch: Batch) -> int:
    """``MMoEHeads`` on each exposure's T token: experts, gate, mixture and the two tower layers."""
    d, experts, expert_dim, tower = config.d_model, config.num_experts, config.expert_dim, config.tower_dim
    total = 0
    for s in schema.scenarios:
        n, tasks = int(batch.target_positions[s.name].shape[0]), len(s.tasks)
        total += 2 * n * d * experts * expert_dim  # experts
        total += 2 * n * d * tasks * experts  # gate
        total += 2 * n * tasks * experts * expert_dim  # mixture bmm
        total += 2 * n * tasks * (expert_dim * tower + tower)  # tower layer 1, output dot
    return total


def visible_pairs(batch: Batch, use_sequences: bool = True) -> Tuple[int, int]:
    """(query, key) pairs the dynamic mask lets through in a full and in a target layer.

    A query sees ``prefix_len`` keys of its sample (``kernels.jagged.visible_prefix``) and itself if it is
    a T token; a target layer's queries are the T tokens, whose prefix is the same as in a full
    layer. Without sequences (the feature-only baseline) every T token sees only itself.
    Reads ``token_ts`` / ``token_kind`` values: a host sync if the batch is on a GPU.
    """
    n, t = batch.num_tokens, int(batch.target_rows.shape[0])
    if not use_sequences or n == 0:
        return t, t
    keys = KeySet.create(batch.token_offsets, batch.token_kind, batch.token_ts, batch.max_tokens)
    # a full layer's queries are the key rows themselves; visible_prefix reads their ts and layout
    # only (the T tokens' own key is the "+ t" below)
    no_self = keys.pad_index.new_full((n,), -1)
    queries = QuerySet(keys.offsets, keys.ts, no_self, keys.max_len, keys.pad_index)
    prefix = visible_prefix(queries, keys)
    return int(prefix.sum()) + t, int(prefix[batch.target_rows].sum()) + t


def layer_flops(
    kind: str,
    config: ModelConfig,
    num_tokens: int,
    num_targets: int,
    pairs: int,
    padded_pairs: int,
) -> LayerFlops:
    """Forward FLOPs of one ``"full"`` / ``"target"`` layer (module docstring)."""
    d, h, g, hd = config.d_model, config.num_heads, config.num_kv_heads, config.resolved_head_dim
    channels = 2 * config.time_bias_pairs  # TimeBias: appended to q and k
    projected = channels if config.time_bias_source == "query" else 0  # "group": a table row, no matmul
    uq, kv, f2 = 2 * d * (2 * h * hd + h * projected), 2 * d * 2 * g * hd, 2 * h * hd * d  # per row
    if kind == "full":
        projections = num_tokens * (uq + kv + f2)
    elif kind == "target":
        projections = num_tokens * kv + num_targets * (uq + f2)
    else:
        raise ValueError(f"unknown attention layer kind {kind!r}; expected 'full' or 'target'")
    # "segment" (mtfm_rec.model.segment_norm) attends to values of twice the width: one half per segment
    value_width = 2 * hd if config.attention_normalisation == "segment" else hd
    per_pair = 2 * h * (hd + channels + value_width)  # q.k and a v, every query head
    return LayerFlops(kind, projections, per_pair * pairs, per_pair * padded_pairs)


def model_flops(
    config: ModelConfig,
    schema: DatasetSchema,
    batch: Batch,
    pairs: Optional[Tuple[int, int]] = None,
) -> FlopCount:
    """Forward FLOPs of ``MTFM(schema, config)`` on ``batch``, by part.

    Args:
        config: the ``model:`` section.
        schema: the dataset schema the model was built for.
        batch: the batch (on the host: :func:`visible_pairs` reads values).
        pairs: ``visible_pairs(batch, config.use_sequences)`` if already known.
    """
    t = int(batch.target_rows.shape[0])
    if config.use_sequences:
        n, max_tokens = batch.num_tokens, batch.max_tokens
    else:  # the feature-only model's tokens are the T tokens alone
        n, max_tokens = t, batch.max_targets
    full_pairs, target_pairs = pairs if pairs is not None else visible_pairs(batch, config.use_sequences)
    padded = {
        "full": (full_pairs, batch.batch_size * max_tokens * max_tokens),
        "target": (target_pairs, batch.batch_size * batch.max_targets * max_tokens),
    }
    layers = tuple(layer_flops(kind, config, n, t, *padded[kind]) for kind in config.layer_kinds)
    return FlopCount(
        tokenizer=tokenizer_flops(config, schema, batch),
        layers=layers,
        heads=heads_flops(config, schema, batch),
        visible_pairs=(full_pairs, target_pairs),
    )
