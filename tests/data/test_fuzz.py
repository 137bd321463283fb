"""Fuzzed reader and aggregation (issue 9): a small valid raw dataset, mutated thousands of times.

Every mutated dataset (see tests/data/raw_mutations.py: columns dropped, retyped, nulled, set
out of range or non-finite; files truncated, flipped, deleted, added; dataset.yaml keys renamed,
deleted, retyped, written twice, garbage and non-UTF-8 bytes) is read as the aggregation reads
it, and a subset is aggregated. Each run either

* succeeds, and then what it produced holds the contract (folded ids in range, finite dense
  values, labels in {-1, 0, 1} in funnel order, ts in the safe range; every input row either
  read or counted as skipped; an aggregated output the loader accepts), or
* raises one of the documented errors (``DataContractError``, ``SchemaError``,
  ``ConfigError``) naming a file of the dataset, and leaves no output that reads as complete:
  a new output folder does not exist, an earlier one is untouched.

Never another exception type, and never a hang (each run has a deadline). Examples are
derandomised, so CI runs the same ones every time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections import Counter
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from raw_mutations import Base, Mutation, apply, materialise, mutations

from mtfm_rec.config_parsing import ConfigError, from_dict
from mtfm_rec.data import aggregate as agg
from mtfm_rec.data import sample_format as fmt
from mtfm_rec.data.config import AggregationConfig
from mtfm_rec.data.errors import AggregationError
from mtfm_rec.data.reader import (
    TS_MAX,
    TS_MIN,
    DataContractError,
    RawDataset,
    exposure_columns,
    sequence_columns,
)
from mtfm_rec.data.schema import DatasetSchema, ScenarioSpec, SchemaError, SequenceSpec
from mtfm_rec.data.sharded_dataset import ShardedBatchDataset

DOCUMENTED = (DataContractError, SchemaError, ConfigError)
DEADLINE_S = 30  # per run; a normal one takes well under a second
FUZZ = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


class Hang(BaseException):
    """A run past its deadline (a BaseException, so no ``except Exception`` swallows it)."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def outcome(run: Callable[[], Any], root: str) -> Tuple[Any, Optional[Exception]]:
    """(result, None) or (None, the documented error); anything else propagates (a failure)."""
    try:
        with deadline(DEADLINE_S):
            return run(), None
    except DOCUMENTED as exc:
        assert type(exc) in DOCUMENTED, f"{type(exc).__name__} is a subclass, not a documented error"
        assert root in str(exc), f"the error names no file of the dataset: {exc}"
        return None, exc


# -------------------------------------------------------------------- the dataset
AGG = dict(
    num_partitions=2, num_workers=1, progress=False, window_seconds=86400, realtime_lookback_seconds=None
)


@pytest.fixture(scope="module")
def base(demo_tables: Callable[..., Any], demo_schema: Dict[str, Any]) -> Base:
    """The demo schema with documented extras and a shared table, on a few dozen rows per file."""
    schema = dict(demo_schema)
    schema["recommended_realtime_lookback_seconds"] = 3600
    schema["x_note"] = "fuzz"
    schema["shared_embeddings"] = {"items": ["seq/orders/item_id", "seq/clicks_rt/item_id"]}
    tables = demo_tables(seed=5, n_users=6, n_exposures=60, n_actions=60, days=3)
    return Base.build(schema, tables)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: Any, base: Base) -> Dict[str, str]:
    """A scratch folder, the base dataset on disk and its aggregation (as a cache entry)."""
    top = str(tmp_path_factory.mktemp("fuzz"))
    raw = os.path.join(top, "base")
    materialise(base.files, raw)
    cache = os.path.join(top, "base-cache")
    out = agg.ensure_aggregated(raw, cache, AggregationConfig(**AGG))
    return {"top": top, "raw": raw, "cache": cache, "out": out}


@contextlib.contextmanager
def mutated(base: Base, muts: List[Mutation], workdir: Dict[str, str]) -> Iterator[str]:
    """A fresh folder holding ``raw/`` (the mutated dataset); removed afterwards."""
    folder = tempfile.mkdtemp(dir=workdir["top"])
    try:
        materialise(apply(base, muts), os.path.join(folder, "raw"))
        yield folder
    finally:
        shutil.rmtree(folder)


def test_the_base_dataset_is_valid_and_mutations_reproduce(base: Base, workdir: Dict[str, str]) -> None:
    rows = read_and_check(workdir["raw"], skip_bad_rows=False, batch_rows=7)
    written = [pq.read_metadata(os.path.join(workdir["raw"], f)).num_rows for f in base.parquet_files]
    assert sum(rows.values()) == sum(written) > 0
    one = [Mutation("set", ("exposures/hp/part-0.parquet", "click"), ((0,), 2))]
    assert apply(base, one) == apply(base, one) != base.files  # deterministic, and a change


# -------------------------------------------------------------------- what a success must hold
def check_exposures(spec: ScenarioSpec, batch: pa.RecordBatch) -> None:
    col = {name: batch.column(name).to_numpy(zero_copy_only=False) for name in batch.schema.names}
    assert batch.schema.names == exposure_columns(spec)
    assert all(batch.column(c).null_count == 0 for c in batch.schema.names)
    assert ((col["ts"] >= TS_MIN) & (col["ts"] < TS_MAX)).all()
    assert np.isin(col["split"], [-1, 0, 1, 2]).all()
    for group, column, size in spec.categorical():
        ids = col[f"{group}/{column}"]
        assert ids.dtype == np.int64 and ((ids >= 0) & (ids <= size)).all(), column
    for column in spec.dense_features:
        assert col[f"dense/{column}"].dtype == np.float32 and np.isfinite(col[f"dense/{column}"]).all()
    earlier_zero = np.zeros(batch.num_rows, bool)
    for task in spec.tasks:
        labels = col[f"label/{task}"]
        assert np.isin(labels, [-1, 0, 1]).all(), task
        assert not (earlier_zero & (labels == 1)).any(), f"funnel broken at {task}"
        earlier_zero |= labels == 0


def check_actions(spec: SequenceSpec, batch: pa.RecordBatch) -> None:
    assert batch.schema.names == sequence_columns(spec)
    ts = batch.column("ts").to_numpy()
    assert ((ts >= TS_MIN) & (ts < TS_MAX)).all()
    for feature, size in spec.features.items():
        ids = batch.column(feature).to_numpy()
        assert ((ids >= 0) & (ids <= size)).all(), feature


def read_and_check(root: str, skip_bad_rows: bool, batch_rows: int) -> Counter:
    """Reads every scenario and sequence as the aggregation does; checks each batch and that
    every input row was read or counted as skipped. Returns rows read per file."""
    ds = RawDataset(root, skip_bad_rows=skip_bad_rows, batch_rows=batch_rows)
    ds.fingerprint_entries()
    rows: Counter = Counter()
    for spec in ds.schema.scenarios:
        for path, batch in ds.iter_scenario(spec):
            check_exposures(spec, batch)
            rows[path] += batch.num_rows
    for seq in ds.schema.sequences:
        for path, batch in ds.iter_sequence(seq):
            check_actions(seq, batch)
            rows[path] += batch.num_rows
    skipped: Counter = Counter()
    for (path, _, _), n in ds.bad_rows.counts.items():
        skipped[path] += n
    assert skip_bad_rows or not skipped
    for path in ds.all_files():
        assert rows[path] + skipped[path] == pq.read_metadata(path).num_rows, path
    return rows


def accepted(out: str) -> int:
    """Samples of an aggregated folder the loader accepts as complete (raises otherwise)."""
    return ShardedBatchDataset(out, batch_size=4, split="all", rank=0, world_size=1).num_samples


def snapshot(root: str) -> Dict[str, bytes]:
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


# -------------------------------------------------------------------- the fuzz tests
@settings(max_examples=3000, **FUZZ)
@given(data=st.data(), skip_bad_rows=st.booleans(), batch_rows=st.sampled_from([7, 65536]))
def test_reading_a_mutated_dataset_succeeds_or_raises_a_documented_error(
    base: Base, workdir: Dict[str, str], data: Any, skip_bad_rows: bool, batch_rows: int
) -> None:
    muts = data.draw(mutations(base), label="mutations")
    with mutated(base, muts, workdir) as folder:
        root = os.path.join(folder, "raw")
        outcome(lambda: read_and_check(root, skip_bad_rows, batch_rows), root)


@settings(max_examples=1000, **FUZZ)
@given(
    data=st.data(),
    skip_bad_rows=st.booleans(),
    chunk=st.sampled_from([None, 3]),
    into=st.sampled_from(["new", "earlier output", "cache"]),
)
def test_aggregating_a_mutated_dataset_is_complete_or_leaves_no_complete_output(
    base: Base, workdir: Dict[str, str], data: Any, skip_bad_rows: bool, chunk: Optional[int], into: str
) -> None:
    muts = data.draw(mutations(base), label="mutations")
    config = AggregationConfig(**dict(AGG, skip_bad_rows=skip_bad_rows, max_exposures_per_sample=chunk))
    with mutated(base, muts, workdir) as folder:
        root = os.path.join(folder, "raw")
        # "earlier output": aggregate() over a complete output; "cache": ensure_aggregated over a
        # cache holding the base dataset's aggregation.
        target = os.path.join(folder, "cache" if into == "cache" else "out")
        if into != "new":
            shutil.copytree(workdir["cache"] if into == "cache" else workdir["out"], target)
        before = snapshot(target)
        if into == "cache":
            out, error = outcome(lambda: agg.ensure_aggregated(root, target, config), root)
        else:
            out, error = target, outcome(lambda: agg.aggregate(root, target, config), root)[1]
        if error is None:
            check_complete(out, read_and_check(root, skip_bad_rows, 65536), root)
        else:  # nothing new, nothing half-written: an earlier output is exactly as it was
            assert os.path.exists(target) == (into != "new")
            assert snapshot(target) == before
            assert not [n for n in os.listdir(folder) if n.startswith(".")], "a staging folder was left"


def check_complete(out: str, rows_read: Counter, root: str) -> None:
    """A successful aggregation: the loader accepts ``out`` and it holds every exposure read."""
    record = agg.read_success(out)
    assert record is not None
    fs, path = fsspec.core.url_to_fs(out)
    assert fmt.check_shards(fs, path, record)[1] == []
    exposures_read = sum(n for f, n in rows_read.items() if f.startswith(f"{root}/exposures/"))
    tables = [pq.read_table(os.path.join(out, e["name"])) for e in record["shards"]]
    schema = DatasetSchema.load(out)
    exposures_out = sum(
        int(pc.sum(pc.list_value_length(t.column(fmt.exp_ts(s.name)))).as_py() or 0)
        for t in tables
        for s in schema.scenarios
    )
    assert exposures_out == exposures_read
    assert accepted(out) == sum(t.num_rows for t in tables) == sum(e["rows"] for e in record["shards"])


# -------------------------------------------------------------------- config values the fuzz found
@pytest.mark.parametrize(
    "override",
    [
        {"window_seconds": 0},
        {"num_partitions": 0},
        {"max_exposures_per_sample": 0},
        {"read_batch_rows": 0},
        {"window_seconds": 10**30},
        {"realtime_lookback_seconds": 10**30},
    ],
)
def test_an_invalid_aggregation_config_is_a_config_error(
    workdir: Dict[str, str], tmp_path: Any, override: Dict[str, Any]
) -> None:
    (key,) = override
    with pytest.raises(ConfigError, match=rf"aggregation\.{key} must be"):
        from_dict(AggregationConfig, dict(AGG, **override), "aggregation")
    assert not (tmp_path / "out").exists()


def test_window_plus_a_dataset_lookback_beyond_2_62_ticks_is_refused(base: Base, tmp_path: Any) -> None:
    """The lookback may come from dataset.yaml (in ticks of its unit): the sum is checked too."""
    schema = dict(base.schema)
    schema["time_unit"] = "ms"
    schema["recommended_realtime_lookback_seconds"] = 2**62 // 1000
    files = dict(base.files, **{"dataset.yaml": yaml.safe_dump(schema).encode()})
    raw = str(tmp_path / "raw")
    materialise(files, raw)
    with pytest.raises(AggregationError, match=r"more than 2\*\*62 ticks \(ms\)"):
        agg.aggregate(raw, str(tmp_path / "out"), AggregationConfig(**AGG))
    assert not (tmp_path / "out").exists()
