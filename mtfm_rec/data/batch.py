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
* ``bag_features``: the multi-hot features, for the model's EmbeddingBagCollection: a second
  KeyedJaggedTensor, keys ``DatasetSchema.bag_feature_keys()`` (``bag/<s>/<g>/<f>``), whose
  batch is the batch's exposures of every scenario (scenario after scenario, each in KJT order:
  ``n = sum_s n_s`` bags per key, as an EBC needs one batch size for all its keys): a key's bag
  for an exposure of its own scenario holds that exposure's ids (length = ids of the exposure),
  its bags for the other scenarios' exposures are empty. Pooled, key ``bag/<s>/...`` gives
  ``[n, e]``, whose rows ``o_s .. o_s + n_s - 1`` are scenario s's exposures (``o_s``: the
  exposures of the scenarios before s). No key when the schema has no multi-hot feature.
* ``sequence_positions[q]``: for each value of sequence q's keys (KJT order: sample-major,
  then ascending ts), the flat token row it becomes.
* ``target_positions[s]``: for each exposure of scenario s (KJT order), its flat token row.
* ``target_rows``/``target_offsets``: the T tokens of every sample, sample-major, as a jagged
  layout of their own (the queries of target-attention layers).

Exposure-level tensors (``dense_features``, ``labels``, ``label_mask``, ``exposure_sample``,
``request_id``) are per scenario, in KJT order.

It stays one module, a little over 400 lines: the Batch and the one function that builds it
(:func:`collate`, with its phases) share every layout decision written above.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from mtfm_rec.data import sample_format as fmt
from mtfm_rec.data.schema import DatasetSchema, ScenarioSpec
from mtfm_rec.kernels.jagged import TokenKind

# what Batch._map applies its function to: every tensor-valued field, or value of a dict field
_Movable = Union[torch.Tensor, KeyedJaggedTensor]


def _empty_kjt() -> KeyedJaggedTensor:
    """The ``bag_features`` of a schema without multi-hot features: no key, no value."""
    return KeyedJaggedTensor(
        keys=[], values=torch.zeros(0, dtype=torch.int64), lengths=torch.zeros(0, dtype=torch.int32)
    )


@dataclass
class Batch(Pipelineable):
    """One training/eval batch. All tensors live on one device; ints are host-side constants."""

    sparse_features: KeyedJaggedTensor
    token_offsets: torch.Tensor  # [B+1] int64
    num_history: torch.Tensor  # [B] int64, L_H per sample
    num_realtime: torch.Tensor  # [B] int64, L_R per sample
    num_targets: torch.Tensor  # [B] int64, L_T per sample
    token_ts: torch.Tensor  # [N] int64
    token_kind: torch.Tensor  # [N] int8 (TokenKind values)
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
    # multi-hot features (module docstring); last, with a default, so that a Batch built by
    # hand without them stays valid
    bag_features: KeyedJaggedTensor = field(default_factory=_empty_kjt)
    # scenario -> [n_s] int64 raw request id of each exposure (KJT order), -1 where the raw row
    # had none: which exposures were served together (serving replay groups by it)
    request_id: Dict[str, torch.Tensor] = field(default_factory=dict)

    # ---------------------------------------------------------------- Pipelineable
    def _map(self, fn: Callable[[_Movable], _Movable]) -> "Batch":
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
        def record(t: _Movable) -> _Movable:
            t.record_stream(stream)
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


@dataclass
class _SparseParts:
    """The KeyedJaggedTensor being built: keys in order, with per-sample lengths and values."""

    keys: List[str] = field(default_factory=list)
    lengths: List[np.ndarray] = field(default_factory=list)
    values: List[np.ndarray] = field(default_factory=list)

    def add(self, key: str, lengths: np.ndarray, values: np.ndarray) -> None:
        self.keys.append(key)
        self.lengths.append(lengths)
        self.values.append(values)

    def build(self, stride: Optional[int] = None) -> KeyedJaggedTensor:
        return KeyedJaggedTensor(
            keys=self.keys,
            stride=stride,
            values=torch.from_numpy(np.concatenate(self.values).astype(np.int64))
            if self.values
            else torch.zeros(0, dtype=torch.int64),
            lengths=torch.from_numpy(np.concatenate(self.lengths).astype(np.int32))
            if self.lengths
            else torch.zeros(0, dtype=torch.int32),
        )


@dataclass
class _Sequences:
    """The behaviour sequences of a batch, merged per sample into its H and R blocks."""

    lengths: Dict[str, np.ndarray]  # sequence -> [B] actions per sample
    ts: Dict[str, np.ndarray]  # sequence -> action ts (int64), KJT order
    n_hist: np.ndarray  # [B] L_H
    n_real: np.ndarray  # [B] L_R
    hist_rank: List[np.ndarray]  # per history sequence, each action's rank in its H block
    real_rank: List[np.ndarray]  # per real-time sequence, each action's rank in its R block


@dataclass
class _Exposures:
    """The exposures of a batch per scenario, after ``exposure_keep``."""

    lengths: Dict[str, np.ndarray]  # scenario -> [B] exposures per sample
    ts: Dict[str, np.ndarray]  # scenario -> exposure ts (int64), KJT order
    keep: Dict[str, Optional[np.ndarray]]  # scenario -> bool mask over its flat exposures, or None
    n_targets: np.ndarray  # [B] L_T, all scenarios
    request_id: Dict[str, np.ndarray] = field(default_factory=dict)  # scenario -> int64, -1 if none


@dataclass
class _Tokens:
    """The flat token arrays of a batch, sample-major: each sample's H, then R, then T rows."""

    offsets: np.ndarray  # [B+1] int64
    ts: np.ndarray  # [N] int64
    kind: np.ndarray  # [N] int8
    group: np.ndarray  # [N] int64

    @classmethod
    def allocate(cls, n_tokens: np.ndarray) -> "_Tokens":
        offsets = np.concatenate([[0], np.cumsum(n_tokens)]).astype(np.int64)
        total = int(offsets[-1])
        return cls(offsets, np.zeros(total, np.int64), np.zeros(total, np.int8), np.zeros(total, np.int64))

    def put(self, pos: np.ndarray, ts: np.ndarray, kind: int, group: int) -> None:
        self.ts[pos] = ts
        self.kind[pos] = kind
        self.group[pos] = group


def _read_sequences(table: pa.Table, schema: DatasetSchema, sparse: _SparseParts) -> _Sequences:
    """Reads every behaviour sequence (its features go to ``sparse``, sequence-major) and merges
    the history ones into H and the real-time ones into R, each in time order per sample."""
    b = table.num_rows
    lengths_of: Dict[str, np.ndarray] = {}
    ts_of: Dict[str, np.ndarray] = {}
    for q in schema.ordered_sequences:
        lengths, ts = _list_column(table, fmt.seq_ts(q.name))
        lengths_of[q.name], ts_of[q.name] = lengths, ts.astype(np.int64)
        for f in q.features:
            key = fmt.seq_feature(q.name, f)
            sparse.add(key, lengths, _list_column(table, key)[1])
    hist = [(lengths_of[q.name], ts_of[q.name]) for q in schema.history_sequences]
    real = [(lengths_of[q.name], ts_of[q.name]) for q in schema.realtime_sequences]
    n_hist, hist_rank = _merge_sequences(hist, b)
    n_real, real_rank = _merge_sequences(real, b)
    return _Sequences(lengths_of, ts_of, n_hist, n_real, hist_rank, real_rank)


def _read_exposures(
    table: pa.Table, schema: DatasetSchema, exposure_keep: Optional[Mapping[str, np.ndarray]]
) -> _Exposures:
    """Reads every scenario's exposure lengths and ts, dropping those ``exposure_keep`` masks out
    (the split): a dropped exposure is no T token and no row of any exposure tensor."""
    b = table.num_rows
    exposures = _Exposures(lengths={}, ts={}, keep={}, n_targets=np.zeros(b, np.int64))
    for s in schema.scenarios:
        lengths, ts = _list_column(table, fmt.exp_ts(s.name))
        request_id = _list_column(table, fmt.exp_request_id(s.name))[1]
        keep = None if exposure_keep is None else exposure_keep.get(s.name)
        if keep is not None:
            keep = np.asarray(keep, dtype=bool)
            lengths = np.bincount(_sample_of(lengths)[keep], minlength=b).astype(np.int64)
            ts, request_id = ts[keep], request_id[keep]
        exposures.lengths[s.name], exposures.ts[s.name] = lengths, ts.astype(np.int64)
        exposures.request_id[s.name] = request_id.astype(np.int64)
        exposures.keep[s.name] = keep
    for s in schema.scenarios:
        exposures.n_targets += exposures.lengths[s.name]
    return exposures


def _place_sequences(schema: DatasetSchema, seqs: _Sequences, tokens: _Tokens) -> Dict[str, torch.Tensor]:
    """Writes every action into its sample's H or R block; returns each sequence's token rows."""
    positions: Dict[str, torch.Tensor] = {}
    for block, base, ranks, kind in (
        (schema.history_sequences, tokens.offsets[:-1], seqs.hist_rank, TokenKind.HISTORY),
        (schema.realtime_sequences, tokens.offsets[:-1] + seqs.n_hist, seqs.real_rank, TokenKind.REALTIME),
    ):
        for q, rank in zip(block, ranks):
            pos = base[_sample_of(seqs.lengths[q.name])] + rank
            tokens.put(pos, seqs.ts[q.name], kind, schema.sequence_group(q.name))
            positions[q.name] = torch.from_numpy(pos)
    return positions


def _place_targets(
    schema: DatasetSchema, exposures: _Exposures, tokens: _Tokens, target_start: np.ndarray
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Writes every exposure into its sample's T block (``target_start``: its first row), one
    scenario after the other; returns per scenario (token rows, sample index) of its exposures."""
    positions: Dict[str, torch.Tensor] = {}
    samples: Dict[str, torch.Tensor] = {}
    block_start = target_start
    for s in schema.scenarios:
        lengths = exposures.lengths[s.name]
        sample = _sample_of(lengths)
        pos = block_start[sample] + _rank_within_sample(sample, lengths)
        block_start = block_start + lengths  # a new array: target_start stays as it was
        tokens.put(pos, exposures.ts[s.name], TokenKind.TARGET, schema.scenario_group(s.name))
        positions[s.name] = torch.from_numpy(pos)
        samples[s.name] = torch.from_numpy(sample)
    return positions, samples


def _exposure_features(
    table: pa.Table, scenario: ScenarioSpec, exposures: _Exposures, sparse: _SparseParts
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adds one scenario's categorical features to ``sparse``; returns its dense features,
    its 0/1 labels and which labels are present (a missing label counts as 0, masked out)."""
    lengths, keep = exposures.lengths[scenario.name], exposures.keep[scenario.name]

    def flat(name: str) -> np.ndarray:
        values = _list_column(table, name)[1]
        return values if keep is None else values[keep]

    for g, c, _ in scenario.categorical():
        key = fmt.exp_feature(scenario.name, g, c)
        sparse.add(key, lengths, flat(key))
    dense = [flat(fmt.exp_dense(scenario.name, c)).astype(np.float32) for c in scenario.dense_features]
    n = int(lengths.sum())
    dense_features = torch.from_numpy(np.stack(dense, axis=1) if dense else np.zeros((n, 0), np.float32))
    raw_labels = np.stack([flat(fmt.exp_label(scenario.name, t)) for t in scenario.tasks], axis=1)
    labels = torch.from_numpy(np.clip(raw_labels, 0, 1).astype(np.float32))
    return dense_features, labels, torch.from_numpy(raw_labels != fmt.MISSING_LABEL)


def _exposure_tensors(
    table: pa.Table, schema: DatasetSchema, exposures: _Exposures, sparse: _SparseParts
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """:func:`_exposure_features` of every scenario, in schema order (the KJT's key order):
    per scenario its dense features, labels and label mask."""
    dense_features: Dict[str, torch.Tensor] = {}
    labels: Dict[str, torch.Tensor] = {}
    label_mask: Dict[str, torch.Tensor] = {}
    for s in schema.scenarios:
        dense_features[s.name], labels[s.name], label_mask[s.name] = _exposure_features(
            table, s, exposures, sparse
        )
    return dense_features, labels, label_mask


def _bag_features(table: pa.Table, schema: DatasetSchema, exposures: _Exposures) -> KeyedJaggedTensor:
    """The ``bag_features`` KJT (module docstring): per multi-hot key one bag per exposure of the
    batch, every scenario's, the other scenarios' bags empty."""
    counts = [int(exposures.lengths[s.name].sum()) for s in schema.scenarios]
    total = sum(counts)
    bags = _SparseParts()
    start = 0
    for s, n in zip(schema.scenarios, counts):
        keep = exposures.keep[s.name]
        for g, c, _, _ in s.multi_hot():
            per_exposure = pc.list_flatten(table.column(fmt.exp_feature(s.name, g, c)))  # row-major
            if keep is not None:
                per_exposure = per_exposure.filter(pa.array(keep))
            lengths = np.zeros(total, np.int64)
            lengths[start : start + n] = pc.fill_null(pc.list_value_length(per_exposure), 0).to_numpy()
            ids = pc.list_flatten(per_exposure).to_numpy(zero_copy_only=False)
            bags.add(f"bag/{s.name}/{g}/{c}", lengths, ids)
        start += n
    if not bags.keys:
        return _empty_kjt()
    return bags.build(stride=total)


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

    The phases: read the sequences (merged into H and R per sample) and the exposures (T,
    scenario after scenario), lay out the flat token rows, write every action and exposure into
    its row, then build the exposure-level tensors and the KJT, whose keys are sequence features
    first, then each scenario's categorical features; last, the multi-hot features' KJT.
    """
    b = table.num_rows
    sparse = _SparseParts()
    seqs = _read_sequences(table, schema, sparse)
    exposures = _read_exposures(table, schema, exposure_keep)
    n_hist, n_real, n_targets = seqs.n_hist, seqs.n_real, exposures.n_targets
    n_tokens = n_hist + n_real + n_targets
    tokens = _Tokens.allocate(n_tokens)
    sequence_positions = _place_sequences(schema, seqs, tokens)
    target_start = tokens.offsets[:-1] + n_hist + n_real
    target_positions, exposure_sample = _place_targets(schema, exposures, tokens, target_start)
    dense_features, labels, label_mask = _exposure_tensors(table, schema, exposures, sparse)
    target_offsets = np.concatenate([[0], np.cumsum(n_targets)]).astype(np.int64)
    target_rows = np.repeat(target_start, n_targets) + _rank_within_sample(_sample_of(n_targets), n_targets)
    return Batch(
        sparse_features=sparse.build(),
        token_offsets=torch.from_numpy(tokens.offsets),
        num_history=torch.from_numpy(n_hist),
        num_realtime=torch.from_numpy(n_real),
        num_targets=torch.from_numpy(n_targets),
        token_ts=torch.from_numpy(tokens.ts),
        token_kind=torch.from_numpy(tokens.kind),
        token_group=torch.from_numpy(tokens.group),
        target_offsets=torch.from_numpy(target_offsets),
        target_rows=torch.from_numpy(target_rows.astype(np.int64)),
        sequence_positions=sequence_positions,
        target_positions=target_positions,
        exposure_sample=exposure_sample,
        dense_features=dense_features,
        labels=labels,
        label_mask=label_mask,
        user_id=torch.from_numpy(table.column(fmt.USER_ID).to_numpy().astype(np.int64)),
        request_id={name: torch.from_numpy(ids) for name, ids in exposures.request_id.items()},
        window_start=torch.from_numpy(table.column(fmt.WINDOW_START).to_numpy().astype(np.int64)),
        batch_size=b,
        num_tokens=int(tokens.offsets[-1]),
        max_tokens=int(n_tokens.max()) if b else 0,
        max_targets=int(n_targets.max()) if b else 0,
        bag_features=_bag_features(table, schema, exposures),
    )
