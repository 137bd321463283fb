"""Multi-scenario user-level aggregation (paper 3.1, 3.3.1): raw contract -> aggregated shards.

One sample = one user x time window (``window = floor(ts / window_ticks)``). Per scenario the
window's exposures are aggregated per user, the scenario parts of the same user+window are joined
column-wise, and the result is merged with the shared behaviour sequences at user level:

* H: per history sequence, the last ``max_len`` actions with ``ts < window_start``;
* R: per real-time sequence, actions from ``window_start - lookback`` on, before the sample's
  last exposure, at most ``max_len``: a busy window is split into samples so that each exposure
  sees (strictly earlier ts; the model masks the later ones) its most recent actions, decided by
  the past alone (:mod:`mtfm_rec.data.realtime_split`);
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

This module is the driver: the two passes in order, the fingerprint, the cache, the CLI and the
run's :class:`AggregationStats` (a little over 400 lines with them: the statistics stay beside
the merge of the partitions' results that fills them). The routing and the building of one
partition are in :mod:`mtfm_rec.data.aggregate_partitions`, the output directory's checks and
its atomic replacement in :mod:`mtfm_rec.data.aggregate_output`.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import logging
import multiprocessing as mp
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import fsspec
import numpy as np
import pyarrow.parquet as pq

from mtfm_rec.data import sample_format as fmt
from mtfm_rec.data.aggregate_output import check_replaceable, output_location, publish
from mtfm_rec.data.aggregate_partitions import PartitionTask, SpillRouter, build_partition
from mtfm_rec.data.config import ENGINES, AggregationConfig
from mtfm_rec.data.errors import AggregationError
from mtfm_rec.data.reader import TS_MAX, BadRows, DataContractError, RawDataset
from mtfm_rec.data.schema import DatasetSchema

# Without max_exposures_per_sample, a user-window with more exposures than this is refused: it
# would be one sample of that many T tokens, and a batch pads every sample to its longest one
# (the kernels are measured up to 8192 tokens, docs/KERNELS.md).
UNCHUNKED_EXPOSURE_LIMIT = 8192
# Config fields that change the output (num_workers / progress / read size do not, nor the engine
# and its Spark settings: both engines write the same bytes, tests/data/test_aggregate_spark.py).
_FINGERPRINT_FIELDS = (
    "window_seconds",
    "realtime_lookback_seconds",
    "max_exposures_per_sample",
    "realtime_split_keep",
    "num_partitions",
    "skip_bad_rows",
    "output_row_group_size",
)
_PERCENTILES = (50, 90, 99)
logger = logging.getLogger(__name__)


# -------------------------------------------------------------------- the R lookback
def realtime_lookback_seconds(config: AggregationConfig, schema: DatasetSchema) -> int:
    """The R lookback: the config's, else the dataset's recommendation, else one window."""
    if config.realtime_lookback_seconds is not None:
        return config.realtime_lookback_seconds
    return int(schema.extra.get("recommended_realtime_lookback_seconds", config.window_seconds))


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


# -------------------------------------------------------------------- driver
def _progress(iterable: Any, total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="part", file=sys.stderr, leave=False)


def aggregate(raw: str, out: str, config: AggregationConfig) -> AggregationStats:
    """Aggregates the raw dataset at ``raw`` into shards under ``out`` (path or fsspec URL).

    The output is built in a temporary sibling of ``out`` and moved into place when complete,
    so a failed run leaves ``out`` as it was. ``config.engine == "spark"`` builds the same
    output with Apache Spark (:func:`mtfm_rec.data.aggregate_spark.aggregate_spark`).

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
    config.validate()  # fields may have been set after construction
    if config.engine == "spark":
        return _aggregate_with_spark(raw, out, config)
    t0 = time.perf_counter()
    out_fs, out_path = output_location(raw, out)
    check_replaceable(out_fs, out_path, out)
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
        publish(out_fs, out_path, out, shards, texts)
    return stats


def _aggregate_with_spark(raw: str, out: str, config: AggregationConfig) -> AggregationStats:
    """The Spark engine, imported on use: only it needs pyspark (and Java)."""
    try:
        from mtfm_rec.data.aggregate_spark import aggregate_spark
    except ImportError as exc:
        raise AggregationError(
            f"aggregation.engine=spark needs pyspark ({exc}): pip install pyspark==4.3.0 "
            "(and a Java 17+ runtime), or use engine=local"
        ) from exc
    return aggregate_spark(raw, out, config, master=config.spark_master, spark_conf=config.spark_conf)


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
        router = SpillRouter(spill_dir, source, config.num_partitions)
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


def _tasks(schema: DatasetSchema, config: AggregationConfig, tmp: str) -> List[PartitionTask]:
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
        PartitionTask(
            spill_dir=os.path.join(tmp, "spill"),
            partition=k,
            schema=schema.to_dict(),
            window_ticks=window_ticks,
            lookback_ticks=lookback_ticks,
            max_exposures_per_sample=chunk,
            realtime_split_keep=config.realtime_split_keep,
            row_group_size=config.output_row_group_size,
            out_path=os.path.join(shard_dir, fmt.shard_name(k)),
            exposure_limit=UNCHUNKED_EXPOSURE_LIMIT if chunk is None else None,
        )
        for k in range(config.num_partitions)
    ]


def _build(tasks: List[PartitionTask], config: AggregationConfig) -> List[Dict[str, Any]]:
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
    parser.add_argument("--engine", choices=ENGINES, help="local (default) or spark: the same output")
    parser.add_argument(
        "--master",
        help="--engine spark: Spark master (yarn, k8s://..., local[8]); default: spark-submit's or local[*]",
    )
    parser.add_argument(
        "--conf",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="--engine spark: a spark.* setting (repeatable)",
    )
    parser.add_argument("overrides", nargs="*", help="AggregationConfig fields, e.g. window_seconds=3600")
    args = parser.parse_args(argv)
    fields = apply_overrides({}, args.overrides)
    if args.engine is not None:
        fields["engine"] = args.engine
    if args.master is not None:
        fields["spark_master"] = args.master
    for item in args.conf:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--conf {item!r}: expected KEY=VALUE")
        fields.setdefault("spark_conf", {})[key] = value
    config = from_dict(AggregationConfig, fields, "aggregation")
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
