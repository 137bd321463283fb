"""Multi-scenario user-level aggregation (paper 3.1, 3.3.1): raw contract -> aggregated shards.

One sample = one user x time window (``window = floor(ts / window_ticks)``). Per scenario the
window's exposures are aggregated per user, the scenario parts of the same user+window are joined
column-wise, and the result is merged with the shared behaviour sequences at user level:

* H: per history sequence, the last ``max_len`` actions with ``ts < window_start``;
* R: per real-time sequence, the most recent ``max_len`` actions with
  ``window_start - lookback <= ts < window_end`` (with their ts: the model masks the later ones);
* T: every exposure of the window, every scenario, with features, labels, ts.

Two streaming passes keep memory bounded by one partition:

1. every input file is read by record batches (:mod:`mtfm_rec.data.reader` validates and folds)
   and its rows are routed by a splitmix64 hash of ``user_id`` into per-partition Arrow IPC spill
   files, in file then row order;
2. ``num_workers`` processes each load one partition, sort it, window it and build its samples
   with vectorised numpy (merge-sorted searches over per-user sorted actions, no per-row Python),
   and write ``part-NNNNN.parquet``.

The output is written into a hidden temporary sibling of the output directory and renamed into
place when complete: shards, ``dataset.yaml``, ``_stats.json`` and, last, ``_SUCCESS`` holding a
content fingerprint of the inputs and of the config and the list of shards with their row
counts and sizes (:func:`mtfm_rec.data.sample_format.success_record`). An existing output is
replaced only when it carries such a marker; an output inside, equal to or above the raw root is
refused. :func:`ensure_aggregated` reuses a cached output whose fingerprint matches and whose
shards match the marker, and rebuilds it otherwise. CLI::

    python -m mtfm_rec.data.aggregate --raw ROOT --out DIR [window_seconds=3600 ...]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import fnmatch
import hashlib
import json
import logging
import multiprocessing as mp
import os
import posixpath
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import fsspec
import fsspec.implementations.local
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtfm_rec.data import sample_format as fmt
from mtfm_rec.data.config import AggregationConfig
from mtfm_rec.data.reader import (
    TS,
    TS_MAX,
    USER_ID,
    BadRows,
    DataContractError,
    RawDataset,
    exposure_columns,
    sequence_columns,
)
from mtfm_rec.data.schema import DatasetSchema, ScenarioSpec, SequenceSpec

# Without max_exposures_per_sample, a user-window with more exposures than this is refused: it
# would be one sample of that many T tokens, and a batch pads every sample to its longest one
# (the kernels are measured up to 8192 tokens, docs/KERNELS.md).
UNCHUNKED_EXPOSURE_LIMIT = 8192
# Config fields that change the output (num_workers / progress / read size do not).
_FINGERPRINT_FIELDS = (
    "window_seconds",
    "realtime_lookback_seconds",
    "max_exposures_per_sample",
    "num_partitions",
    "skip_bad_rows",
    "output_row_group_size",
)
_PERCENTILES = (50, 90, 99)
logger = logging.getLogger(__name__)


class AggregationError(ValueError):
    """An aggregation that must not run as asked: an unsafe output directory, a user-window too
    large for one sample, or inputs that changed while being read. The message names the path,
    the user and window, or the file, and the way out."""


# -------------------------------------------------------------------- hashing and helpers
def realtime_lookback_seconds(config: AggregationConfig, schema: DatasetSchema) -> int:
    """The R lookback: the config's, else the dataset's recommendation, else one window."""
    if config.realtime_lookback_seconds is not None:
        return config.realtime_lookback_seconds
    return int(schema.extra.get("recommended_realtime_lookback_seconds", config.window_seconds))


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


# -------------------------------------------------------------------- stats
def _percentiles(hist: np.ndarray) -> Dict[str, float]:
    """p50/p90/p99/max/mean (nearest rank) of a histogram ``hist[value] = count``."""
    n = int(hist.sum())
    if n == 0:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0.0}
    cum = np.cumsum(hist)
    out: Dict[str, float] = {}
    for q in _PERCENTILES:
        out[f"p{q}"] = int(np.searchsorted(cum, int(np.ceil(q / 100 * n))))
    out["max"] = int(np.nonzero(hist)[0][-1])
    out["mean"] = float((hist * np.arange(len(hist))).sum() / n)
    return out


def _add_hist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) < len(b):
        a, b = b, a
    out = a.copy()
    out[: len(b)] += b
    return out


@dataclass
class AggregationStats:
    """What an aggregation read and wrote (also ``_stats.json``)."""

    exposures_in: int = 0
    samples_out: int = 0
    exposures_per_scenario: Dict[str, int] = field(default_factory=dict)
    actions_per_sequence: Dict[str, int] = field(default_factory=dict)
    tokens_h: Dict[str, float] = field(default_factory=dict)
    tokens_r: Dict[str, float] = field(default_factory=dict)
    tokens_t: Dict[str, float] = field(default_factory=dict)
    bad_rows: int = 0
    bad_rows_detail: List[Dict[str, Any]] = field(default_factory=list)
    num_shards: int = 0
    seconds: float = 0.0  # wall time of the whole aggregation
    read_seconds: float = 0.0  # pass 1: read, validate, route
    build_seconds: float = 0.0  # pass 2: build and write the shards
    fingerprint: str = ""

    @property
    def compression_ratio(self) -> float:
        """Exposures per sample."""
        return self.exposures_in / self.samples_out if self.samples_out else 0.0

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["compression_ratio"] = self.compression_ratio
        return out

    @classmethod
    def from_dict(cls, raw: Dict[str, Any]) -> "AggregationStats":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    def report(self) -> str:
        def pct(d: Dict[str, float]) -> str:
            return " ".join(f"{k}={d.get(k, 0)}" for k in ("p50", "p90", "p99", "max"))

        lines = [
            f"exposures in:       {self.exposures_in}",
            f"samples out:        {self.samples_out}",
            f"compression ratio:  {self.compression_ratio:.2f} exposures/sample",
            f"tokens/sample H:    {pct(self.tokens_h)}",
            f"tokens/sample R:    {pct(self.tokens_r)}",
            f"tokens/sample T:    {pct(self.tokens_t)}",
        ]
        lines += [f"exposures[{k}]: {v}" for k, v in self.exposures_per_scenario.items()]
        lines += [f"actions[{k}]: {v}" for k, v in self.actions_per_sequence.items()]
        lines.append(f"bad rows:           {self.bad_rows}")
        lines += [
            f"  {d['file']}: column {d['column']!r}: {d['rule']}: {d['rows']}" for d in self.bad_rows_detail
        ]
        lines.append(
            f"shards: {self.num_shards}, {self.seconds:.1f} s "
            f"(read {self.read_seconds:.1f} s, build {self.build_seconds:.1f} s)"
        )
        return "\n".join(lines)


# -------------------------------------------------------------------- fingerprint
def fingerprint(dataset: RawDataset, config: AggregationConfig) -> Dict[str, Any]:
    """The inputs (names, sizes, content digests) + output-relevant config, and their sha256.

    See :meth:`RawDataset.fingerprint_entries` for what the digests cover.
    """
    body = {
        "format_version": fmt.FORMAT_VERSION,
        "inputs": [list(e) for e in dataset.fingerprint_entries()],
        "config": {k: getattr(config, k) for k in _FINGERPRINT_FIELDS},
    }
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return {"fingerprint": digest, **body}


def read_success(out: str) -> Optional[Dict[str, Any]]:
    """The ``_SUCCESS`` record of an aggregated dataset dir, or None if absent/not ours."""
    fs, path = fsspec.core.url_to_fs(out)
    record = fmt.read_marker(fs, path)
    return record if fmt.is_own_marker(record) else None


# -------------------------------------------------------------------- pass 1: route
def _spill_path(spill_dir: str, source: str, partition: int) -> str:
    return os.path.join(spill_dir, source, f"{partition:05d}.arrow")


class _Router:
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


def _load_spill(spill_dir: str, source: str, partition: int, columns: List[str]) -> Dict[str, np.ndarray]:
    path = _spill_path(spill_dir, source, partition)
    if not os.path.exists(path):
        return {c: np.zeros(0, np.int64) for c in columns}
    with pa.OSFile(path, "rb") as fh:
        table = pa.ipc.open_stream(fh).read_all()
    return {c: table.column(c).to_numpy() for c in columns}


# -------------------------------------------------------------------- pass 2: build samples
@dataclass
class _Task:
    spill_dir: str
    partition: int
    schema: Dict[str, Any]
    window_ticks: int
    lookback_ticks: int
    max_exposures_per_sample: Optional[int]
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
    """

    user: np.ndarray
    start: np.ndarray
    end: np.ndarray
    of_row: np.ndarray

    def __len__(self) -> int:
        return len(self.user)


def _assign_samples(exposure_spills: List[Dict[str, np.ndarray]], task: _Task) -> _Samples:
    """Maps every exposure row to its sample: a distinct (user, window) of any scenario.

    Inside a window rows are in ts order (ties: scenario, then file and row order), so a window
    with more than ``max_exposures_per_sample`` exposures splits into consecutive chunks.

    Raises:
        AggregationError: a user-window above ``task.exposure_limit`` (unchunked runs).
    """
    window_ticks = task.window_ticks
    users = np.concatenate([c[USER_ID] for c in exposure_spills]).astype(np.int64)
    ts_all = np.concatenate([c[TS] for c in exposure_spills]).astype(np.int64)
    windows = np.floor_divide(ts_all, window_ticks)
    order = np.lexsort((ts_all, windows, users))
    sorted_user, sorted_window = users[order], windows[order]
    opens_sample = np.ones(len(sorted_user), dtype=bool)
    opens_sample[1:] = (sorted_user[1:] != sorted_user[:-1]) | (sorted_window[1:] != sorted_window[:-1])
    if task.exposure_limit is not None:
        _check_window_sizes(
            opens_sample, sorted_user, sorted_window * window_ticks, window_ticks, task.exposure_limit
        )
    if task.max_exposures_per_sample:
        rows = np.arange(len(sorted_user))
        rank = rows - np.maximum.accumulate(np.where(opens_sample, rows, 0))
        opens_sample |= rank % task.max_exposures_per_sample == 0
    of_row = np.empty(len(sorted_user), np.int64)
    of_row[order] = np.cumsum(opens_sample) - 1
    start = sorted_window[opens_sample] * window_ticks
    return _Samples(user=sorted_user[opens_sample], start=start, end=start + window_ticks, of_row=of_row)


def _exposure_column_names(scenario: ScenarioSpec) -> Dict[str, str]:
    """Spill column -> shard list column of one scenario's T part."""
    names = {
        TS: fmt.exp_ts(scenario.name),
        "request_id": fmt.exp_request_id(scenario.name),
        "split": fmt.exp_split(scenario.name),
    }
    names.update({f"{g}/{c}": fmt.exp_feature(scenario.name, g, c) for g, c, _ in scenario.categorical()})
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
            columns[dst] = _list_array(offsets, cols[src][perm], _value_type(arrow, dst))
    return n_t, exposures


def _sequence_slices(
    seq: SequenceSpec, a_user: np.ndarray, a_ts: np.ndarray, samples: _Samples, lookback_ticks: int
) -> Tuple[np.ndarray, np.ndarray]:
    """Per sample, (first action, number of actions) of ``seq`` among its actions sorted by
    (user, ts): H keeps the last ``max_len`` before the window start, R the last ``max_len`` in
    ``[start - lookback, end)``."""
    if seq.is_history:
        end = _count_before(a_user, a_ts, samples.user, samples.start)
        lo = np.searchsorted(a_user, samples.user, side="left")
    else:
        both = _count_before(
            a_user,
            a_ts,
            np.concatenate([samples.user, samples.user]),
            np.concatenate([samples.start - lookback_ticks, samples.end]),
        )
        lo, end = both[: len(samples)], both[len(samples) :]
    start = np.maximum(lo, end - seq.max_len)
    return start, np.maximum(end - start, 0)


def _sequence_columns(
    task: _Task, schema: DatasetSchema, samples: _Samples, columns: Dict[str, pa.Array]
) -> Tuple[np.ndarray, np.ndarray, Dict[str, int]]:
    """H and R: adds each shared sequence to ``columns``, merged with the samples at user level.

    Returns:
        (H tokens per sample, R tokens per sample, actions read per sequence).
    """
    n_h = np.zeros(len(samples), np.int64)
    n_r = np.zeros(len(samples), np.int64)
    actions: Dict[str, int] = {}
    for q in schema.sequences:
        cols = _load_spill(task.spill_dir, f"seq/{q.name}", task.partition, sequence_columns(q))
        a_user, a_ts = cols[USER_ID].astype(np.int64), cols[TS].astype(np.int64)
        actions[q.name] = len(a_user)
        perm = np.lexsort((a_ts, a_user))  # stable: ts ties keep file then row order
        start, lengths = _sequence_slices(q, a_user[perm], a_ts[perm], samples, task.lookback_ticks)
        (n_h if q.is_history else n_r)[:] += lengths
        take = perm[_ranges(start, lengths)]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        columns[fmt.seq_ts(q.name)] = _list_array(offsets, cols[TS][take], pa.int64())
        for f in q.features:
            columns[fmt.seq_feature(q.name, f)] = _list_array(offsets, cols[f][take], pa.int64())
    return n_h, n_r, actions


def build_partition(task: _Task) -> Dict[str, Any]:
    """Builds and writes one shard; returns its token-count histograms and sizes."""
    schema = DatasetSchema.from_dict(task.schema)
    arrow = fmt.arrow_schema(schema)
    exposure_spills = [
        _load_spill(task.spill_dir, f"exp/{s.name}", task.partition, exposure_columns(s))
        for s in schema.scenarios
    ]
    samples = _assign_samples(exposure_spills, task)
    columns: Dict[str, pa.Array] = {
        fmt.USER_ID: pa.array(samples.user, pa.int64()),
        fmt.WINDOW_START: pa.array(samples.start, pa.int64()),
        fmt.WINDOW_END: pa.array(samples.end, pa.int64()),
    }
    n_t, exposures = _target_columns(schema, arrow, exposure_spills, samples, columns)
    n_h, n_r, actions = _sequence_columns(task, schema, samples, columns)
    table = pa.Table.from_arrays([columns[name] for name in arrow.names], schema=arrow)
    pq.write_table(table, task.out_path, row_group_size=max(1, task.row_group_size))
    return {
        "partition": task.partition,
        "samples": len(samples),
        "exposures": exposures,
        "actions": actions,
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


# -------------------------------------------------------------------- driver
def _progress(iterable: Any, total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="part", file=sys.stderr, leave=False)


def aggregate(raw: str, out: str, config: AggregationConfig) -> AggregationStats:
    """Aggregates the raw dataset at ``raw`` into shards under ``out`` (path or fsspec URL).

    The output is built in a temporary sibling of ``out`` and moved into place when complete,
    so a failed run leaves ``out`` as it was.

    Args:
        raw: raw-contract dataset root.
        out: output dataset directory: new, empty, or an earlier output of this function
            (its ``_SUCCESS`` says so), which is then replaced.
        config: the aggregation config.

    Returns:
        The statistics (also written to ``out/_stats.json``).

    Raises:
        DataContractError: the raw data breaks the contract (see mtfm_rec.data.reader).
        AggregationError: ``out`` overlaps ``raw`` or holds foreign files; a user-window has
            more than UNCHUNKED_EXPOSURE_LIMIT exposures without max_exposures_per_sample; the
            inputs changed while being read.
    """
    t0 = time.perf_counter()
    config.validate()  # fields may have been set after construction
    out_fs, out_path = _output_location(raw, out)
    _check_replaceable(out_fs, out_path, out)
    ds = RawDataset(raw, skip_bad_rows=config.skip_bad_rows, batch_rows=config.read_batch_rows)
    schema = ds.schema
    fp = fingerprint(ds, config)
    with tempfile.TemporaryDirectory(prefix="mtfm_agg_") as tmp:
        _route(ds, config, os.path.join(tmp, "spill"))
        _check_unchanged(ds, config, fp)
        t_read = time.perf_counter() - t0
        tasks = _tasks(schema, config, tmp)
        results = _build(tasks, config)
        stats = _merge_stats(results, schema, ds.bad_rows, fp["fingerprint"], len(tasks))
        stats.seconds = time.perf_counter() - t0
        stats.read_seconds = t_read
        stats.build_seconds = stats.seconds - t_read
        shards = [(t.out_path, fmt.shard_name(t.partition)) for t in tasks]
        entries = [
            fmt.shard_entry(name, pq.read_metadata(src).num_rows, os.path.getsize(src))
            for src, name in shards
        ]
        texts = {
            fmt.SCHEMA_FILE: schema.to_yaml(),
            fmt.STATS_FILE: json.dumps(stats.to_dict(), indent=2),
            fmt.SUCCESS_FILE: json.dumps(fmt.success_record(entries, **fp), indent=2),  # last
        }
        _publish(out_fs, out_path, out, shards, texts)
    return stats


def _route(ds: RawDataset, config: AggregationConfig, spill_dir: str) -> None:
    """Pass 1: streams and validates every input file, routing rows by user hash."""
    schema = ds.schema
    sources = [(f"exp/{s.name}", ds.iter_scenario(s)) for s in schema.scenarios]
    sources += [(f"seq/{q.name}", ds.iter_sequence(q)) for q in schema.sequences]
    bar = None
    if config.progress:
        from tqdm import tqdm

        bar = tqdm(desc="aggregate: read", unit="row", unit_scale=True, file=sys.stderr, leave=False)
    for source, batches in sources:
        router = _Router(spill_dir, source, config.num_partitions)
        try:
            for _, batch in batches:
                router.add(batch)
                if bar is not None:
                    bar.update(batch.num_rows)
        finally:
            router.close()
    if bar is not None:
        bar.close()


def _check_unchanged(ds: RawDataset, config: AggregationConfig, fp: Dict[str, Any]) -> None:
    """Refuses inputs that changed while pass 1 read them: the marker would lie."""
    now = fingerprint(ds, config)
    if now["fingerprint"] == fp["fingerprint"]:
        return
    changed = sorted({e[0] for e in now["inputs"]} ^ {e[0] for e in fp["inputs"]}) or [
        a[0] for a, b in zip(fp["inputs"], now["inputs"]) if a != b
    ]
    raise AggregationError(
        f"{ds.root}: input file(s) {changed[:5]} changed during the aggregation; run it again "
        "once the raw data is no longer being written"
    )


def _tasks(schema: DatasetSchema, config: AggregationConfig, tmp: str) -> List[_Task]:
    shard_dir = os.path.join(tmp, "shards")
    os.makedirs(shard_dir)
    tps = schema.ticks_per_second
    chunk = config.max_exposures_per_sample
    window_ticks, lookback_ticks = (
        config.window_seconds * tps,
        realtime_lookback_seconds(config, schema) * tps,
    )
    if window_ticks + lookback_ticks > TS_MAX:
        raise AggregationError(
            f"window_seconds={config.window_seconds} plus the real-time lookback of "
            f"{lookback_ticks // tps} s is more than 2**62 ticks ({schema.time_unit}): window "
            "arithmetic would overflow int64"
        )
    return [
        _Task(
            spill_dir=os.path.join(tmp, "spill"),
            partition=k,
            schema=schema.to_dict(),
            window_ticks=window_ticks,
            lookback_ticks=lookback_ticks,
            max_exposures_per_sample=chunk,
            row_group_size=config.output_row_group_size,
            out_path=os.path.join(shard_dir, fmt.shard_name(k)),
            exposure_limit=UNCHUNKED_EXPOSURE_LIMIT if chunk is None else None,
        )
        for k in range(config.num_partitions)
    ]


def _build(tasks: List[_Task], config: AggregationConfig) -> List[Dict[str, Any]]:
    """Pass 2: one shard per partition, in parallel."""
    p = len(tasks)
    results: List[Dict[str, Any]] = []
    if config.num_workers <= 1 or p == 1:
        for task in _progress(tasks, p, "aggregate: build", config.progress):
            results.append(build_partition(task))
        return results
    # fork by default on Linux: no re-import of __main__ (scripts need no main guard)
    # and fast start; the workers use neither CUDA nor the parent's threads.
    method = config.start_method or ("fork" if sys.platform == "linux" else "spawn")
    ctx = mp.get_context(method)
    with cf.ProcessPoolExecutor(max_workers=min(config.num_workers, p), mp_context=ctx) as pool:
        futures = [pool.submit(build_partition, t) for t in tasks]
        for fut in _progress(cf.as_completed(futures), p, "aggregate: build", config.progress):
            results.append(fut.result())
    return results


# -------------------------------------------------------------------- the output directory
def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, fsspec.implementations.local.LocalFileSystem)


def _resolve(url: str) -> Tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, normalised path): local paths absolute with symlinks and ``..`` resolved."""
    fs, path = fsspec.core.url_to_fs(url)
    if _is_local(fs):
        return fs, os.path.realpath(path)
    return fs, posixpath.normpath(path.rstrip("/") or "/")


def _within(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def _output_location(raw: str, out: str) -> Tuple[fsspec.AbstractFileSystem, str]:
    """The output's (filesystem, path); refuses an output equal to, inside or above ``raw``."""
    raw_fs, raw_path = _resolve(raw)
    out_fs, out_path = _resolve(out)
    if type(raw_fs) is type(out_fs) and (_within(out_path, raw_path) or _within(raw_path, out_path)):
        how = (
            "the same directory as"
            if out_path == raw_path
            else "inside"
            if _within(out_path, raw_path)
            else "a parent of"
        )
        raise AggregationError(
            f"output directory {out} (--out) is {how} the raw dataset {raw} (--raw): writing "
            "it would overwrite or delete raw files; choose an output outside the raw dataset"
        )
    parent = posixpath.dirname(out_path)
    if not parent or parent == out_path:
        raise AggregationError(f"output directory {out} (--out): needs a parent directory")
    return out_fs, out_path


def _check_replaceable(fs: fsspec.AbstractFileSystem, path: str, out: str) -> None:
    """Refuses an existing ``path`` unless it is empty or an output of ours with only our files."""
    if not fs.exists(path):
        return
    if not fs.isdir(path):
        raise AggregationError(f"output directory {out} (--out): exists and is not a directory")
    names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    if not names:
        return
    if not fmt.is_own_marker(fmt.read_marker(fs, path)):
        raise AggregationError(
            f"output directory {out} (--out): not empty ({len(names)} entries, e.g. {names[:3]}) "
            f"and no {fmt.SUCCESS_FILE} of mtfm_rec in it; refusing to delete or overwrite it: "
            "pass a new or empty directory, or an earlier aggregation output"
        )
    foreign = [n for n in names if not any(fnmatch.fnmatch(n, g) for g in fmt.OWN_FILE_GLOBS)]
    if foreign:
        raise AggregationError(
            f"output directory {out} (--out): an earlier aggregation output, but it also holds "
            f"{foreign[:5]}, which an aggregation does not write; refusing to delete them: "
            "move them away or pass another directory"
        )


def _publish(
    fs: fsspec.AbstractFileSystem,
    out_path: str,
    out: str,
    shards: List[Tuple[str, str]],
    texts: Dict[str, str],
) -> None:
    """Writes the shards (local path, name) and then ``texts`` (name -> content, in order) into
    a hidden sibling of ``out_path``, then moves it into place."""
    parent, name = posixpath.split(out_path)
    stage = posixpath.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
    fs.makedirs(parent, exist_ok=True)
    fs.makedirs(stage, exist_ok=False)
    try:
        for src, dst in shards:
            fs.put_file(src, posixpath.join(stage, dst))
        for dst, text in texts.items():
            with fs.open(posixpath.join(stage, dst), "w") as fh:
                fh.write(text)
        _check_replaceable(fs, out_path, out)  # again: it may have changed during the build
        _swap(fs, stage, out_path)
    finally:
        if fs.exists(stage):
            fs.rm(stage, recursive=True)


def _swap(fs: fsspec.AbstractFileSystem, stage: str, out_path: str) -> None:
    """Moves the complete ``stage`` to ``out_path``, replacing what is there (checked: ours)."""
    if _is_local(fs):
        # Two renames: at every moment ``out_path`` is the old output, absent, or the new one;
        # a crash in between leaves both, as hidden siblings (.<name>.old-*, .<name>.tmp-*).
        old = f"{stage.rsplit('.tmp-', 1)[0]}.old-{uuid.uuid4().hex[:12]}"
        if not os.path.isdir(out_path):
            os.rename(stage, out_path)
            return
        os.rename(out_path, old)
        try:
            os.rename(stage, out_path)
        except OSError:
            os.rename(old, out_path)  # put the previous output back
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    # Object stores have no directory rename: remove the old files but its marker, move the new
    # files in, the new marker last (it overwrites the old one). Meanwhile the old marker's
    # shard list does not match, which the loader and ensure_aggregated detect.
    if fs.exists(out_path):
        for p in fs.ls(out_path, detail=False):
            if posixpath.basename(p.rstrip("/")) != fmt.SUCCESS_FILE:
                fs.rm(p, recursive=True)
    else:
        fs.makedirs(out_path, exist_ok=True)
    files = sorted(fs.ls(stage, detail=False), key=lambda p: posixpath.basename(p) == fmt.SUCCESS_FILE)
    for p in files:
        fs.mv(p, posixpath.join(out_path, posixpath.basename(p)))


def _merge_stats(
    results: List[Dict[str, Any]], schema: DatasetSchema, bad: BadRows, fp: str, shards: int
) -> AggregationStats:
    hists = {k: np.zeros(1, np.int64) for k in ("hist_h", "hist_r", "hist_t")}
    stats = AggregationStats(
        exposures_per_scenario={s.name: 0 for s in schema.scenarios},
        actions_per_sequence={q.name: 0 for q in schema.sequences},
        num_shards=shards,
        fingerprint=fp,
    )
    for r in results:
        stats.samples_out += int(r["samples"])
        for k, v in r["exposures"].items():
            stats.exposures_per_scenario[k] += int(v)
        for k, v in r["actions"].items():
            stats.actions_per_sequence[k] += int(v)
        for k in hists:
            hists[k] = _add_hist(hists[k], r[k])
    stats.exposures_in = sum(stats.exposures_per_scenario.values())
    stats.tokens_h = _percentiles(hists["hist_h"])
    stats.tokens_r = _percentiles(hists["hist_r"])
    stats.tokens_t = _percentiles(hists["hist_t"])
    stats.bad_rows = bad.total
    stats.bad_rows_detail = bad.to_list()
    return stats


def ensure_aggregated(raw: str, cache_dir: str, config: AggregationConfig) -> str:
    """Returns an aggregated dataset dir for ``raw``, aggregating only if inputs/config changed.

    The dir is ``<cache_dir>/<dataset name>-<fingerprint[:16]>``; it is reused when its
    ``_SUCCESS`` carries the same fingerprint and its shards match the marker's shard list
    (names, byte sizes, row counts, readable footers); otherwise it is rebuilt (atomically).
    """
    ds = RawDataset(raw, skip_bad_rows=config.skip_bad_rows)
    fp = fingerprint(ds, config)["fingerprint"]
    out = f"{cache_dir.rstrip('/')}/{ds.schema.name}-{fp[:16]}"
    record = read_success(out)
    if record is not None and record.get("fingerprint") == fp and "shards" in record:
        fs, path = fsspec.core.url_to_fs(out)
        _, problems = fmt.check_shards(fs, path, record)
        if not problems:
            return out
        logger.warning("aggregation cache %s is damaged, rebuilding it: %s", out, "; ".join(problems[:5]))
    aggregate(raw, out, config)
    return out


def main(argv: Optional[Sequence[str]] = None) -> AggregationStats:
    from mtfm_rec.config_parsing import apply_overrides, from_dict

    parser = argparse.ArgumentParser(
        prog="python -m mtfm_rec.data.aggregate",
        description="Multi-scenario user-level aggregation of a raw-contract dataset.",
    )
    parser.add_argument("--raw", required=True, help="raw dataset root (path or fsspec URL)")
    parser.add_argument("--out", required=True, help="output dataset directory")
    parser.add_argument("overrides", nargs="*", help="AggregationConfig fields, e.g. window_seconds=3600")
    args = parser.parse_args(argv)
    config = from_dict(AggregationConfig, apply_overrides({}, args.overrides), "aggregation")
    stats = aggregate(args.raw, args.out, config)
    print(stats.report())
    return stats


if __name__ == "__main__":
    from mtfm_rec.config_parsing import ConfigError
    from mtfm_rec.data.schema import SchemaError

    try:
        main()
    except (DataContractError, SchemaError, ConfigError, AggregationError) as exc:
        sys.exit(f"error: {exc}")  # the message names file, column and rule: no traceback
