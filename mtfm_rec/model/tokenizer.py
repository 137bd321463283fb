"""Heterogeneous tokenization (paper 3.2.1, eq. 3-5): embeddings -> one flat token tensor.

The categorical lookups happen outside, in the top-level model's TorchRec
``EmbeddingCollection`` (see :func:`make_embedding_collection`) and, for multi-hot features, its
``EmbeddingBagCollection`` (:func:`make_embedding_bag_collection`), so that TorchRec can shard
them; this module gets their outputs (``Dict[key, JaggedTensor]`` and a ``KeyedTensor`` of pooled
bags) and does the dense part::

    seq/<q>/<f> embeddings  --concat over f-->  MLP_q   --> [n_q, d] --scatter to sequence_positions[q]--+
    exp/<s>/<g>/<f> embeddings                                                                            |
      + pooled bag/<s>/<g>/<f> + dense(s) -->   MLP_s   --> [n_s, d] --scatter to target_positions[s]----+
                                                                                                          v
                                       X(0) = (H; R; T) per sample, flat [N, d_model] (eq. 5)

A multi-hot feature (a list of ids per exposure) enters eq. 4 as one more ``e``-wide field: the
sum or the mean (dataset.yaml's ``pooling``) of its ids' rows.

The Batch already laid the rows out (H merged by ts, then R merged by ts, then T by scenario),
so all groups are written by a single ``index_copy`` of the concatenated MLP outputs. One MLP per
sequence and one per scenario, built from the schema: a new scenario is a dataset.yaml entry.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedTensor

from mtfm_rec.data.batch import Batch
from mtfm_rec.data.schema import DatasetSchema, mangled_table_name
from mtfm_rec.model.config import ModelConfig
from mtfm_rec.model.time_features import period_ticks, time_angles


def make_embedding_collection(
    schema: DatasetSchema, config: ModelConfig, device: torch.device | None = None
) -> EmbeddingCollection:
    """The tables of ``schema.embedding_tables()``: one per KJT key unless dataset.yaml shares
    a table between keys (``shared_embeddings``), sized by the declared vocabulary + 1."""
    tables = [
        EmbeddingConfig(
            name=mangled_table_name(name),
            embedding_dim=config.embedding_dim,
            num_embeddings=rows,
            feature_names=keys,
        )
        for name, (rows, keys) in schema.embedding_tables().items()
    ]
    return EmbeddingCollection(tables=tables, device=device)


_POOLING_TYPES = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def make_embedding_bag_collection(
    schema: DatasetSchema, config: ModelConfig, device: torch.device | None = None
) -> Optional[EmbeddingBagCollection]:
    """The tables of ``schema.embedding_bag_tables()``: one per multi-hot feature, sized by the
    declared vocabulary + 1, pooled as dataset.yaml says (sum or mean); None when the schema
    declares no multi-hot feature (the model then has no EmbeddingBagCollection at all)."""
    if not schema.has_bag_features:
        return None
    tables = [
        EmbeddingBagConfig(
            name=mangled_table_name(name),
            embedding_dim=config.embedding_dim,
            num_embeddings=rows,
            feature_names=keys,
            pooling=_POOLING_TYPES[pooling],
        )
        for name, (rows, pooling, keys) in schema.embedding_bag_tables().items()
    ]
    return EmbeddingBagCollection(tables=tables, device=device)


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Sequential:
    """Linear -> SiLU -> ... -> Linear (no activation on the output)."""
    layers: List[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.SiLU()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


def compress_dense(x: torch.Tensor) -> torch.Tensor:
    """``sign(x) * log1p(|x|)``: raw dense features come at any scale (counts, prices, ...)."""
    return torch.sign(x) * torch.log1p(x.abs())


class TimeEncoding(nn.Module):
    """Each token's own time as sinusoids, projected to ``d_model`` (added to ``X(0)``).

    Features ``sin(2 pi t / P_i)``, ``cos(2 pi t / P_i)`` of the token's timestamp ``t`` for
    periods ``P_i`` geometric from ``min_period_s`` to ``max_period_s`` (rounded to whole ticks;
    the phase ``t mod P_i`` is taken in int64, so it is exact however large the epoch timestamps
    are). A dot product of two tokens' features is a sum of ``cos(2 pi (t_1 - t_2) / P_i)``: a
    function of how far apart they are, which the attention can learn to use (recent actions
    against old ones). Each token's encoding depends on its own time only: a later action or
    exposure never changes an earlier token's input (a reference point shared by the sample, such
    as its latest token, would let a future click move every score). The projection starts at
    zero, so a new model starts as the one without it.

    Args:
        num_frequencies: how many periods.
        d_model: token width.
        ticks_per_second: the dataset's time unit (``DatasetSchema.ticks_per_second``).
    """

    def __init__(
        self,
        num_frequencies: int,
        d_model: int,
        ticks_per_second: int,
        min_period_s: float = 60.0,
        max_period_s: float = 30 * 86400.0,
    ) -> None:
        super().__init__()
        self.periods: torch.Tensor  # [F] int64 ticks
        periods = period_ticks(num_frequencies, min_period_s, max_period_s, ticks_per_second)
        self.register_buffer("periods", periods, persistent=False)
        self.proj = nn.Linear(2 * num_frequencies, d_model, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, token_ts: torch.Tensor) -> torch.Tensor:
        """``[N, d_model]`` for the tokens' int64 timestamps ``token_ts [N]``."""
        angle = time_angles(token_ts, self.periods)
        features = torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1).to(self.proj.weight.dtype)
        return self.proj(features)


class HeterogeneousTokenizer(nn.Module):
    """Per-sequence (eq. 3) and per-scenario (eq. 4) MLP tokenizers writing one ``[N, d]`` tensor.

    Args:
        schema: the dataset schema (sequences, scenarios and their features).
        config: ``embedding_dim``, ``d_model``, ``tokenizer_hidden``, ``use_sequences``,
            ``time_frequencies`` (:class:`TimeEncoding`, off at 0).
    """

    def __init__(self, schema: DatasetSchema, config: ModelConfig) -> None:
        super().__init__()
        e, d, hidden = config.embedding_dim, config.d_model, config.tokenizer_hidden
        self.use_sequences = config.use_sequences
        self.sequence_names = [q.name for q in schema.ordered_sequences] if config.use_sequences else []
        self.sequence_keys = [
            [f"seq/{q.name}/{f}" for f in q.features]
            for q in schema.ordered_sequences
            if config.use_sequences
        ]
        self.sequence_mlps = nn.ModuleList(mlp(len(k) * e, hidden, d) for k in self.sequence_keys)
        self.scenario_names = [s.name for s in schema.scenarios]
        self.scenario_keys = [
            [f"exp/{s.name}/{g}/{c}" for g, c, _ in s.categorical()] for s in schema.scenarios
        ]
        self.scenario_bag_keys = [
            [f"bag/{s.name}/{g}/{c}" for g, c, _, _ in s.multi_hot()] for s in schema.scenarios
        ]
        self.scenario_mlps = nn.ModuleList(
            mlp((len(keys) + len(bags)) * e + len(s.dense_features), hidden, d)
            for keys, bags, s in zip(self.scenario_keys, self.scenario_bag_keys, schema.scenarios)
        )
        self.d_model = d
        self.time = (
            TimeEncoding(config.time_frequencies, d, schema.ticks_per_second)
            if config.time_frequencies > 0 and config.use_sequences
            else None
        )

    def forward(
        self,
        embeddings: Dict[str, JaggedTensor],
        batch: Batch,
        num_tokens: int,
        target_positions: Dict[str, torch.Tensor],
        bag_embeddings: Optional[KeyedTensor] = None,
    ) -> torch.Tensor:
        """Builds ``X(0)``.

        Args:
            embeddings: the EmbeddingCollection output on ``batch.sparse_features``.
            batch: gives dense features and the token rows of sequence actions.
            num_tokens: rows of the output (``batch.num_tokens``, or the T count for the
                feature-only baseline).
            target_positions: per scenario, the output row of each exposure (KJT order).
            bag_embeddings: the EmbeddingBagCollection output on ``batch.bag_features``; needed
                when the schema has multi-hot features, ignored otherwise.
        Returns:
            ``[num_tokens, d_model]`` tokens; H and R rows are left zero when sequences are off.
        """
        rows: List[torch.Tensor] = []
        positions: List[torch.Tensor] = []
        for name, keys, net in zip(self.sequence_names, self.sequence_keys, self.sequence_mlps):
            feats = torch.cat([embeddings[k].values() for k in keys], dim=-1)
            rows.append(net(feats))
            positions.append(batch.sequence_positions[name])
        pooled = self._pooled_bags(bag_embeddings, batch)
        for name, keys, net in zip(self.scenario_names, self.scenario_keys, self.scenario_mlps):
            # Dense columns last (possibly zero of them: keeps the shape for feature-less scenarios).
            parts = [embeddings[k].values() for k in keys] + pooled.get(name, [])
            parts.append(compress_dense(batch.dense_features[name]))
            rows.append(net(torch.cat(parts, dim=-1)))
            positions.append(target_positions[name])
        values = torch.cat(rows, dim=0)
        out = values.new_zeros(num_tokens, self.d_model)
        out = out.index_copy(0, torch.cat(positions), values)
        if self.time is not None:
            out = out + self.time(batch.token_ts)
        return out

    def _pooled_bags(
        self, bag_embeddings: Optional[KeyedTensor], batch: Batch
    ) -> Dict[str, List[torch.Tensor]]:
        """Per scenario, the ``[n_s, e]`` pooled rows of each of its multi-hot features.

        A bag key's pooled ``[n, e]`` covers every scenario's exposures, scenario after
        scenario (``Batch.bag_features``): scenario s's rows are its slice.
        """
        if not any(self.scenario_bag_keys):
            return {}
        if bag_embeddings is None:
            raise ValueError(
                "the schema declares multi-hot features "
                f"{[k for keys in self.scenario_bag_keys for k in keys]}: pass the "
                "EmbeddingBagCollection output on batch.bag_features as bag_embeddings"
            )
        pooled = bag_embeddings.to_dict()
        out: Dict[str, List[torch.Tensor]] = {}
        start = 0
        for name, keys in zip(self.scenario_names, self.scenario_bag_keys):
            n = batch.exposure_sample[name].shape[0]  # a host-side size: no sync
            out[name] = [pooled[k][start : start + n] for k in keys]
            start += n
        return out
