"""The training batch: TorchRec-``Pipelineable`` KeyedJaggedTensors plus the token layout.

A batch of ``B`` aggregated samples (user x window) becomes one jagged token sequence per
sample, laid out as in the paper's eq. 5, ``X = (H; R; T)``::

    sample 0                                 sample 1
    |-- H (all history seqs, by ts) --|-- R (all real-time seqs, by ts) --|-- T (scenario blocks) --|-- H ...
    ^ token_offsets[0]                                                     ^ token_offsets[1]

    token_kind   0 0 0 0 0 0 1 1 1 2 2 2 2 | 0 0 1 2 ...      (0 = H, 1 = R, 2 = T)
    token_group  which sequence / scenario each token belongs to (DatasetSchema.token_groups)
    token_ts     the action's or exposure's timestamp

Every index the model needs is computed here, on the CPU, by the loader workers, so the model
never synchronises with the host to learn a shape:

* ``sparse_features``: one KeyedJaggedTensor, keys ``DatasetSchema.sparse_feature_keys()``:
  ``seq/<q>/<f>`` (lengths = actions of sequence q per sample) and ``exp/<s>/<g>/<f>``
  (lengths = exposures of scenario s per sample). Values are folded ids.
* ``sequence_positions[q]``: for each value of sequence q's keys (KJT order: sample-major,
  then ascending ts), the flat token row it becomes.
* ``target_positions[s]``: for each exposure of scenario s (KJT order), its flat token row.
* ``target_rows``/``target_offsets``: the T tokens of every sample, sample-major, as a jagged
  layout of their own (the queries of target-attention layers).

Exposure-level tensors (``dense_features``, ``labels``, ``label_mask``, ``exposure_sample``) are
per scenario, in KJT order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from mtfm_rec.data import sample_format as fmt
from mtfm_rec.data.schema import DatasetSchema

TOKEN_HISTORY, TOKEN_REALTIME, TOKEN_TARGET = 0, 1, 2


@dataclass
class Batch(Pipelineable):
    """One training/eval batch. All tensors live on one device; ints are host-side constants."""

    sparse_features: KeyedJaggedTensor
    token_offsets: torch.Tensor  # [B+1] int64
    num_history: torch.Tensor  # [B] int64, L_H per sample
    num_realtime: torch.Tensor  # [B] int64, L_R per sample
    num_targets: torch.Tensor  # [B] int64, L_T per sample
    token_ts: torch.Tensor  # [N] int64
    token_kind: torch.Tensor  # [N] int8 (TOKEN_HISTORY / TOKEN_REALTIME / TOKEN_TARGET)
    token_group: torch.Tensor  # [N] int64, index into DatasetSchema.token_groups
    target_offsets: torch.Tensor  # [B+1] int64, jagged layout of the T tokens
    target_rows: torch.Tensor  # [total_T] int64, flat token row of each T token
    sequence_positions: Dict[str, torch.Tensor]  # seq -> [n_q] int64 token rows
    target_positions: Dict[str, torch.Tensor]  # scenario -> [n_s] int64 token rows
    exposure_sample: Dict[str, torch.Tensor]  # scenario -> [n_s] int64 sample index
    dense_features: Dict[str, torch.Tensor]  # scenario -> [n_s, n_dense] float32
    labels: Dict[str, torch.Tensor]  # scenario -> [n_s, n_tasks] float32 (0/1)
    label_mask: Dict[str, torch.Tensor]  # scenario -> [n_s, n_tasks] bool (label present)
    user_id: torch.Tensor  # [B] int64
    window_start: torch.Tensor  # [B] int64
    batch_size: int = 0
    num_tokens: int = 0  # N
    max_tokens: int = 0  # max_b N_b
    max_targets: int = 0  # max_b L_T,b

    # ---------------------------------------------------------------- Pipelineable
    def _map(self, fn: Callable[[object], object]) -> "Batch":
        values = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dict):
                value = {k: fn(v) for k, v in value.items()}
            elif isinstance(value, (torch.Tensor, KeyedJaggedTensor)):
                value = fn(value)
            values[f.name] = value
        return Batch(**values)

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device=device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        def record(t: object) -> object:
            t.record_stream(stream)  # type: ignore[attr-defined]
            return t

        self._map(record)

    def pin_memory(self) -> "Batch":
        return self._map(lambda t: t.pin_memory())


# -------------------------------------------------------------------- building a batch
def _list_column(table: pa.Table, name: str) -> Tuple[np.ndarray, np.ndarray]:
    """(lengths [B], flat values) of a list column; a null list counts as empty."""
    col = table.column(name)
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy().astype(np.int64)
    values = pc.list_flatten(col).to_numpy(zero_copy_only=False)
    return lengths, values


def _sample_of(lengths: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)


def _rank_within_sample(sample: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """For rows grouped by ascending sample, the row's rank inside its sample."""
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.arange(len(sample), dtype=np.int64) - starts[sample]


def _merge_sequences(
    parts: List[Tuple[np.ndarray, np.ndarray]], batch_size: int
) -> Tuple[np.ndarray, List[np.ndarray]]:
    """Merges several sequences per sample in time order.

    Args:
        parts: per sequence, (lengths [B], ts values in KJT order).
    Returns:
        (tokens per sample [B], per sequence the rank of each action inside its sample's merged
        block). Ties in ts keep sequence order, then position.
    """
    if not parts:
        return np.zeros(batch_size, np.int64), []
    samples = [_sample_of(lengths) for lengths, _ in parts]
    sample = np.concatenate(samples)
    ts = np.concatenate([ts for _, ts in parts]).astype(np.int64)
    seq_id = np.concatenate([np.full(len(s), i, np.int64) for i, s in enumerate(samples)])
    order = np.lexsort((np.arange(len(sample)), seq_id, ts, sample))
    counts = np.bincount(sample, minlength=batch_size).astype(np.int64)
    rank = np.empty(len(sample), np.int64)
    rank[order] = _rank_within_sample(sample[order], counts)
    splits = np.cumsum([len(s) for s in samples])[:-1]
    return counts, np.split(rank, splits)


def collate(
    table: pa.Table,
    schema: DatasetSchema,
    exposure_keep: Optional[Mapping[str, np.ndarray]] = None,
) -> Batch:
    """Builds a :class:`Batch` from aggregated-sample rows (see ``sample_format``).

    Args:
        table: ``B`` rows of an aggregated shard.
        schema: the dataset schema the shard was built with.
        exposure_keep: optional per scenario a bool mask over that scenario's flattened
            exposures (row-major, as ``pc.list_flatten`` gives them); dropped exposures vanish
            from the batch (used for train / valid / test splits).
    """
    b = table.num_rows
    keys: List[str] = []
    lengths_by_key: List[np.ndarray] = []
    values_by_key: List[np.ndarray] = []

    # ---- behaviour sequences: H and R blocks
    seq_lengths: Dict[str, np.ndarray] = {}
    seq_ts: Dict[str, np.ndarray] = {}
    for q in schema.ordered_sequences:
        lengths, ts = _list_column(table, fmt.seq_ts(q.name))
        seq_lengths[q.name], seq_ts[q.name] = lengths, ts.astype(np.int64)
        for f in q.features:
            keys.append(fmt.seq_feature(q.name, f))
            lengths_by_key.append(lengths)
            values_by_key.append(_list_column(table, fmt.seq_feature(q.name, f))[1])
    hist = schema.history_sequences
    real = schema.realtime_sequences
    n_hist, hist_rank = _merge_sequences([(seq_lengths[q.name], seq_ts[q.name]) for q in hist], b)
    n_real, real_rank = _merge_sequences([(seq_lengths[q.name], seq_ts[q.name]) for q in real], b)

    # ---- exposures: T blocks, scenario after scenario
    exp_lengths: Dict[str, np.ndarray] = {}
    exp_ts: Dict[str, np.ndarray] = {}
    exp_keep: Dict[str, Optional[np.ndarray]] = {}
    for s in schema.scenarios:
        lengths, ts = _list_column(table, fmt.exp_ts(s.name))
        keep = None if exposure_keep is None else exposure_keep.get(s.name)
        if keep is not None:
            keep = np.asarray(keep, dtype=bool)
            lengths = np.bincount(_sample_of(lengths)[keep], minlength=b).astype(np.int64)
            ts = ts[keep]
        exp_lengths[s.name], exp_ts[s.name], exp_keep[s.name] = lengths, ts.astype(np.int64), keep
    n_targets = np.zeros(b, np.int64)
    for s in schema.scenarios:
        n_targets += exp_lengths[s.name]

    n_tokens = n_hist + n_real + n_targets
    token_offsets = np.concatenate([[0], np.cumsum(n_tokens)]).astype(np.int64)
    total = int(token_offsets[-1])
    token_ts = np.zeros(total, np.int64)
    token_kind = np.zeros(total, np.int8)
    token_group = np.zeros(total, np.int64)

    sequence_positions: Dict[str, torch.Tensor] = {}
    for block, base, ranks, kind in (
        (hist, token_offsets[:-1], hist_rank, TOKEN_HISTORY),
        (real, token_offsets[:-1] + n_hist, real_rank, TOKEN_REALTIME),
    ):
        for q, rank in zip(block, ranks):
            pos = base[_sample_of(seq_lengths[q.name])] + rank
            token_ts[pos] = seq_ts[q.name]
            token_kind[pos] = kind
            token_group[pos] = schema.sequence_group(q.name)
            sequence_positions[q.name] = torch.from_numpy(pos)

    target_positions: Dict[str, torch.Tensor] = {}
    exposure_sample: Dict[str, torch.Tensor] = {}
    dense_features: Dict[str, torch.Tensor] = {}
    labels: Dict[str, torch.Tensor] = {}
    label_mask: Dict[str, torch.Tensor] = {}
    block_start = token_offsets[:-1] + n_hist + n_real
    for s in schema.scenarios:
        lengths, keep = exp_lengths[s.name], exp_keep[s.name]
        sample = _sample_of(lengths)
        pos = block_start[sample] + _rank_within_sample(sample, lengths)
        block_start = block_start + lengths
        token_ts[pos] = exp_ts[s.name]
        token_kind[pos] = TOKEN_TARGET
        token_group[pos] = schema.scenario_group(s.name)
        target_positions[s.name] = torch.from_numpy(pos)
        exposure_sample[s.name] = torch.from_numpy(sample)

        def flat(name: str) -> np.ndarray:
            values = _list_column(table, name)[1]
            return values if keep is None else values[keep]

        for g, c, _ in s.categorical():
            keys.append(fmt.exp_feature(s.name, g, c))
            lengths_by_key.append(lengths)
            values_by_key.append(flat(fmt.exp_feature(s.name, g, c)))
        dense = [flat(fmt.exp_dense(s.name, c)).astype(np.float32) for c in s.dense_features]
        dense_features[s.name] = torch.from_numpy(
            np.stack(dense, axis=1) if dense else np.zeros((len(sample), 0), np.float32)
        )
        raw_labels = np.stack([flat(fmt.exp_label(s.name, t)) for t in s.tasks], axis=1)
        labels[s.name] = torch.from_numpy(np.clip(raw_labels, 0, 1).astype(np.float32))
        label_mask[s.name] = torch.from_numpy(raw_labels != fmt.MISSING_LABEL)

    sparse = KeyedJaggedTensor(
        keys=keys,
        values=torch.from_numpy(np.concatenate(values_by_key).astype(np.int64))
        if values_by_key
        else torch.zeros(0, dtype=torch.int64),
        lengths=torch.from_numpy(np.concatenate(lengths_by_key).astype(np.int32))
        if lengths_by_key
        else torch.zeros(0, dtype=torch.int32),
    )
    target_offsets = np.concatenate([[0], np.cumsum(n_targets)]).astype(np.int64)
    target_rows = np.repeat(token_offsets[:-1] + n_hist + n_real, n_targets) + _rank_within_sample(
        _sample_of(n_targets), n_targets
    )
    return Batch(
        sparse_features=sparse,
        token_offsets=torch.from_numpy(token_offsets),
        num_history=torch.from_numpy(n_hist),
        num_realtime=torch.from_numpy(n_real),
        num_targets=torch.from_numpy(n_targets),
        token_ts=torch.from_numpy(token_ts),
        token_kind=torch.from_numpy(token_kind),
        token_group=torch.from_numpy(token_group),
        target_offsets=torch.from_numpy(target_offsets),
        target_rows=torch.from_numpy(target_rows.astype(np.int64)),
        sequence_positions=sequence_positions,
        target_positions=target_positions,
        exposure_sample=exposure_sample,
        dense_features=dense_features,
        labels=labels,
        label_mask=label_mask,
        user_id=torch.from_numpy(table.column(fmt.USER_ID).to_numpy().astype(np.int64)),
        window_start=torch.from_numpy(table.column(fmt.WINDOW_START).to_numpy().astype(np.int64)),
        batch_size=b,
        num_tokens=total,
        max_tokens=int(n_tokens.max()) if b else 0,
        max_targets=int(n_targets.max()) if b else 0,
    )
