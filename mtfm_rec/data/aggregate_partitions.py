"""The per-partition work of the aggregation (:mod:`mtfm_rec.data.aggregate` drives it).

Pass 1 routes every validated record batch by a splitmix64 hash of ``user_id``
(:func:`user_partition`) into per-partition Arrow IPC spill files, in file then row order
(:class:`SpillRouter`). Pass 2 builds one partition's shard (:func:`build_partition`, run in a
worker process): it loads the partition's spills, assigns every exposure to its sample (one user
x time window, split where a real-time sequence would overflow (:mod:`mtfm_rec.data.realtime_split`)
and by ``max_exposures_per_sample``), joins the scenarios' T parts column-wise and merges the
shared behaviour sequences as H and R at user level, with vectorised numpy (merge-sorted
searches over per-user sorted actions; Python steps only per sample of an overflowing window).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtfm_rec.data import sample_format as fmt
from mtfm_rec.data.errors import AggregationError
from mtfm_rec.data.reader import TS, USER_ID, exposure_columns, multi_hot_columns, sequence_columns
from mtfm_rec.data.realtime_split import open_samples, sample_slices
from mtfm_rec.data.schema import DatasetSchema, ScenarioSpec, SequenceSpec


# -------------------------------------------------------------------- hashing and helpers
def user_partition(user_id: np.ndarray, num_partitions: int) -> np.ndarray:
    """Deterministic partition of each user: splitmix64(user_id) mod ``num_partitions``."""
    with np.errstate(over="ignore"):
        z = user_id.astype(np.int64).view(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(num_partitions)).astype(np.int64)


def _count_before(a_user: np.ndarray, a_ts: np.ndarray, q_user: np.ndarray, q_ts: np.ndarray) -> np.ndarray:
    """For actions sorted by (user, ts), how many are lexicographically < each (q_user, q_ts).

    A merge sort of actions and queries (queries before equal actions) followed by a running
    count of actions: a vectorised searchsorted over per-user sorted runs, with no packing of
    (user, ts) into one integer that could overflow.
    """
    n, m = len(a_user), len(q_user)
    if m == 0:
        return np.zeros(0, np.int64)
    if n == 0:
        return np.zeros(m, np.int64)
    is_action = np.concatenate([np.ones(n, np.int8), np.zeros(m, np.int8)])
    order = np.lexsort((is_action, np.concatenate([a_ts, q_ts]), np.concatenate([a_user, q_user])))
    sorted_action = is_action[order].astype(np.int64)
    before = np.cumsum(sorted_action) - sorted_action
    out = np.empty(n + m, np.int64)
    out[order] = before
    return out[n:]


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + l)`` for every (s, l)."""
    total = int(lengths.sum())
    offsets = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) - np.repeat(offsets, lengths) + np.repeat(starts, lengths)


def _list_array(offsets: np.ndarray, values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=value_type))


# A spill column: numpy for the single values, an Arrow list array for a multi-hot feature's ids.
_SpillColumn = Union[np.ndarray, pa.Array]


def _take(values: _SpillColumn, perm: np.ndarray) -> _SpillColumn:
    return values.take(pa.array(perm)) if isinstance(values, pa.Array) else values[perm]


def _sample_lists(offsets: np.ndarray, values: _SpillColumn, value_type: pa.DataType) -> pa.Array:
    """A shard list column: per sample, its exposures' values (a multi-hot feature: its
    exposures' id lists, so ``list<list<int64>>``)."""
    if isinstance(values, pa.Array):
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)
    return _list_array(offsets, values, value_type)


# -------------------------------------------------------------------- pass 1: route
def _spill_path(spill_dir: str, source: str, partition: int) -> str:
    return os.path.join(spill_dir, source, f"{partition:05d}.arrow")


class SpillRouter:
    """Appends rows to per-partition Arrow IPC spill files, preserving arrival order."""

    def __init__(self, spill_dir: str, source: str, num_partitions: int) -> None:
        os.makedirs(os.path.join(spill_dir, source), exist_ok=True)
        self.spill_dir, self.source, self.p = spill_dir, source, num_partitions
        self.writers: Dict[int, Tuple[Any, Any]] = {}  # partition -> (file, IPC writer)

    def add(self, batch: pa.RecordBatch) -> None:
        part = user_partition(batch.column(USER_ID).to_numpy(), self.p)
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(self.p + 1))
        routed = batch.take(pa.array(order))
        for k in range(self.p):
            lo, hi = int(bounds[k]), int(bounds[k + 1])
            if hi > lo:
                self._writer(k, batch.schema).write_batch(routed.slice(lo, hi - lo))

    def _writer(self, k: int, schema: pa.Schema) -> Any:
        if k not in self.writers:
            sink = pa.OSFile(_spill_path(self.spill_dir, self.source, k), "wb")
            self.writers[k] = (sink, pa.ipc.new_stream(sink, schema))
        return self.writers[k][1]

    def close(self) -> None:
        for sink, writer in self.writers.values():
            writer.close()
            sink.close()


def _load_spill(
    spill_dir: str, source: str, partition: int, columns: List[str], list_columns: Sequence[str] = ()
) -> Dict[str, _SpillColumn]:
    """One partition's spill of ``source``: numpy columns, but ``list_columns`` (multi-hot ids,
    ``list<int64>``) as one Arrow list array each."""
    path = _spill_path(spill_dir, source, partition)
    if not os.path.exists(path):
        empty: Dict[str, _SpillColumn] = {c: np.zeros(0, np.int64) for c in columns}
        empty.update({c: pa.array([], pa.list_(pa.int64())) for c in list_columns})
        return empty
    with pa.OSFile(path, "rb") as fh:
        table = pa.ipc.open_stream(fh).read_all()
    return {
        c: table.column(c).combine_chunks() if c in list_columns else table.column(c).to_numpy()
        for c in columns
    }


# -------------------------------------------------------------------- pass 2: build samples
@dataclass
class PartitionTask:
    """What a worker process needs to build one partition's shard (picklable: plain fields)."""

    spill_dir: str
    partition: int
    schema: Dict[str, Any]
    window_ticks: int
    lookback_ticks: int
    max_exposures_per_sample: Optional[int]
    realtime_split_keep: float
    row_group_size: int
    out_path: str
    exposure_limit: Optional[int] = None  # refuse bigger user-windows (unchunked runs)


def _value_type(arrow: pa.Schema, name: str) -> pa.DataType:
    return arrow.field(name).type.value_type


@dataclass
class _Samples:
    """The samples of one partition, in (user, window, chunk) order.

    Attributes:
        user: [n] the user of each sample.
        start: [n] its window start (dataset ticks).
        end: [n] its window end (exclusive).
        of_row: [rows] the sample of each exposure row, rows in the order the scenarios'
            spills are concatenated (scenario, then file and row order).
        realtime: per real-time sequence name, ([n] first, [n] end) of the sample's R slice,
            indices into that sequence's actions sorted by (user, ts).
    """

    user: np.ndarray
    start: np.ndarray
    end: np.ndarray
    of_row: np.ndarray
    realtime: Dict[str, Tuple[np.ndarray, np.ndarray]]

    def __len__(self) -> int:
        return len(self.user)


@dataclass
class _Actions:
    """One sequence's actions in a partition: its spill columns and their (user, ts) order."""

    columns: Dict[str, _SpillColumn]
    perm: np.ndarray  # stable: ts ties keep file then row order
    user: np.ndarray  # sorted by (user, ts)
    ts: np.ndarray


def _load_actions(task: PartitionTask, q: SequenceSpec) -> _Actions:
    cols = _load_spill(task.spill_dir, f"seq/{q.name}", task.partition, sequence_columns(q))
    a_user, a_ts = cols[USER_ID].astype(np.int64), cols[TS].astype(np.int64)
    perm = np.lexsort((a_ts, a_user))
    return _Actions(cols, perm, a_user[perm], a_ts[perm])


def _assign_samples(
    exposure_spills: List[Dict[str, np.ndarray]],
    task: PartitionTask,
    realtime: Dict[str, Tuple[SequenceSpec, _Actions]],
) -> _Samples:
    """Maps every exposure row to its sample: a distinct (user, window) of any scenario, split
    where a real-time sequence would overflow (:mod:`mtfm_rec.data.realtime_split`) and every
    ``max_exposures_per_sample`` exposures.

    Inside a window rows are in ts order (ties: scenario, then file and row order).

    Raises:
        AggregationError: a sample above ``task.exposure_limit`` (unchunked runs).
    """
    window_ticks = task.window_ticks
    users = np.concatenate([c[USER_ID] for c in exposure_spills]).astype(np.int64)
    ts_all = np.concatenate([c[TS] for c in exposure_spills]).astype(np.int64)
    windows = np.floor_divide(ts_all, window_ticks)
    order = np.lexsort((ts_all, windows, users))
    sorted_user, sorted_window, sorted_ts = users[order], windows[order], ts_all[order]
    opens_window = np.ones(len(sorted_user), dtype=bool)
    opens_window[1:] = (sorted_user[1:] != sorted_user[:-1]) | (sorted_window[1:] != sorted_window[:-1])
    counts, lows, max_lens = [], [], []
    lookback_start = sorted_window * window_ticks - task.lookback_ticks
    for q, acts in realtime.values():
        counts.append(_count_before(acts.user, acts.ts, sorted_user, sorted_ts))
        lows.append(_count_before(acts.user, acts.ts, sorted_user, lookback_start))
        max_lens.append(q.max_len)
    opens_sample, slice_starts = open_samples(
        opens_window, counts, lows, max_lens, task.realtime_split_keep, task.max_exposures_per_sample
    )
    if task.exposure_limit is not None:  # set only without max_exposures_per_sample
        _check_window_sizes(
            opens_sample, sorted_user, sorted_window * window_ticks, window_ticks, task.exposure_limit
        )
    of_row = np.empty(len(sorted_user), np.int64)
    of_row[order] = np.cumsum(opens_sample) - 1
    slices = dict(zip(realtime, sample_slices(opens_sample, slice_starts, counts)))
    firsts = np.flatnonzero(opens_sample)
    start = sorted_window[firsts] * window_ticks
    return _Samples(
        user=sorted_user[firsts], start=start, end=start + window_ticks, of_row=of_row, realtime=slices
    )


def _exposure_column_names(scenario: ScenarioSpec) -> Dict[str, str]:
    """Spill column -> shard list column of one scenario's T part."""
    names = {
        TS: fmt.exp_ts(scenario.name),
        "request_id": fmt.exp_request_id(scenario.name),
        "split": fmt.exp_split(scenario.name),
    }
    names.update({f"{g}/{c}": fmt.exp_feature(scenario.name, g, c) for g, c, _ in scenario.categorical()})
    names.update({f"{g}/{c}": fmt.exp_feature(scenario.name, g, c) for g, c, _, _ in scenario.multi_hot()})
    names.update({f"dense/{c}": fmt.exp_dense(scenario.name, c) for c in scenario.dense_features})
    names.update({f"label/{t}": fmt.exp_label(scenario.name, t) for t in scenario.tasks})
    return names


def _target_columns(
    schema: DatasetSchema,
    arrow: pa.Schema,
    exposure_spills: List[Dict[str, np.ndarray]],
    samples: _Samples,
    columns: Dict[str, pa.Array],
) -> Tuple[np.ndarray, Dict[str, int]]:
    """T: adds each scenario's part to ``columns``, joined column-wise on the sample index.

    Returns:
        (T tokens per sample, exposures read per scenario).
    """
    n_samples = len(samples)
    n_t = np.zeros(n_samples, np.int64)
    exposures: Dict[str, int] = {}
    base = 0
    for s, cols in zip(schema.scenarios, exposure_spills):
        n = len(cols[USER_ID])
        row_sample = samples.of_row[base : base + n]
        base += n
        perm = np.lexsort((cols[TS], row_sample))  # stable: ts ties keep file then row order
        counts = np.bincount(row_sample, minlength=n_samples)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        n_t += counts
        exposures[s.name] = n
        for src, dst in _exposure_column_names(s).items():
            columns[dst] = _sample_lists(offsets, _take(cols[src], perm), _value_type(arrow, dst))
    return n_t, exposures


def _history_slices(acts: _Actions, samples: _Samples, max_len: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per sample, (first action, number of actions) of a history sequence among its actions
    sorted by (user, ts): the last ``max_len`` before the window start."""
    end = _count_before(acts.user, acts.ts, samples.user, samples.start)
    lo = np.searchsorted(acts.user, samples.user, side="left")
    start = np.maximum(lo, end - max_len)
    return start, np.maximum(end - start, 0)


def _sequence_columns(
    schema: DatasetSchema, samples: _Samples, actions: Dict[str, _Actions], columns: Dict[str, pa.Array]
) -> Tuple[np.ndarray, np.ndarray, Dict[str, int]]:
    """H and R: adds each shared sequence to ``columns``, merged with the samples at user level.

    Returns:
        (H tokens per sample, R tokens per sample, actions read per sequence).
    """
    n_h = np.zeros(len(samples), np.int64)
    n_r = np.zeros(len(samples), np.int64)
    read: Dict[str, int] = {}
    for q in schema.sequences:
        acts = actions[q.name]
        read[q.name] = len(acts.user)
        if q.is_history:
            start, lengths = _history_slices(acts, samples, q.max_len)
        else:
            start, end = samples.realtime[q.name]
            lengths = np.maximum(end - start, 0)
        (n_h if q.is_history else n_r)[:] += lengths
        take = acts.perm[_ranges(start, lengths)]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        columns[fmt.seq_ts(q.name)] = _list_array(offsets, acts.columns[TS][take], pa.int64())
        for f in q.features:
            columns[fmt.seq_feature(q.name, f)] = _list_array(offsets, acts.columns[f][take], pa.int64())
    return n_h, n_r, read


def build_partition(task: PartitionTask) -> Dict[str, Any]:
    """Builds and writes one shard; returns its token-count histograms and sizes."""
    schema = DatasetSchema.from_dict(task.schema)
    arrow = fmt.arrow_schema(schema)
    exposure_spills = [
        _load_spill(
            task.spill_dir, f"exp/{s.name}", task.partition, exposure_columns(s), multi_hot_columns(s)
        )
        for s in schema.scenarios
    ]
    actions = {q.name: _load_actions(task, q) for q in schema.sequences}
    realtime = {q.name: (q, actions[q.name]) for q in schema.sequences if not q.is_history}
    samples = _assign_samples(exposure_spills, task, realtime)
    columns: Dict[str, pa.Array] = {
        fmt.USER_ID: pa.array(samples.user, pa.int64()),
        fmt.WINDOW_START: pa.array(samples.start, pa.int64()),
        fmt.WINDOW_END: pa.array(samples.end, pa.int64()),
    }
    n_t, exposures = _target_columns(schema, arrow, exposure_spills, samples, columns)
    n_h, n_r, read = _sequence_columns(schema, samples, actions, columns)
    table = pa.Table.from_arrays([columns[name] for name in arrow.names], schema=arrow)
    pq.write_table(table, task.out_path, row_group_size=max(1, task.row_group_size))
    return {
        "partition": task.partition,
        "samples": len(samples),
        "exposures": exposures,
        "actions": read,
        "hist_h": np.bincount(n_h),
        "hist_r": np.bincount(n_r),
        "hist_t": np.bincount(n_t),
    }


def _check_window_sizes(
    opens_sample: np.ndarray, users: np.ndarray, starts: np.ndarray, window_ticks: int, limit: int
) -> None:
    """Raises AggregationError when a user-window (runs starting where ``opens_sample``) exceeds
    ``limit``."""
    first = np.flatnonzero(opens_sample)
    sizes = np.diff(np.append(first, len(opens_sample)))
    if not len(sizes) or int(sizes.max()) <= limit:
        return
    i = int(np.argmax(sizes))
    n, row = int(sizes[i]), int(first[i])
    raise AggregationError(
        f"user {int(users[row])}, window [{int(starts[row])}, {int(starts[row]) + window_ticks}) (dataset "
        f"ticks): {n} exposures in one sample, above {limit} allowed without "
        f"max_exposures_per_sample ({int((sizes > limit).sum())} such window(s) in this "
        f"partition); set max_exposures_per_sample (e.g. max_exposures_per_sample=1024) to split "
        f"busy windows into time-ordered samples, or max_exposures_per_sample={n} or more to "
        "keep them whole"
    )
