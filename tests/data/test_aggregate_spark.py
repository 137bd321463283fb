"""The Spark aggregation engine against the local one: the same samples, shards, markers, stats
and errors (mtfm_rec.data.aggregate_spark)."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from typing import Any, Dict, Iterator, List, Optional, Tuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

pytest.importorskip("pyspark", reason="the Spark engine needs pyspark (pip install pyspark)")
if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
    pytest.skip("the Spark engine needs Java 17+ (no `java` on PATH, no JAVA_HOME)", allow_module_level=True)

from pyspark.sql import SparkSession  # noqa: E402
from raw_mutations import overstate_row_count  # noqa: E402

from mtfm_rec.data import aggregate as agg  # noqa: E402
from mtfm_rec.data import aggregate_partitions as parts  # noqa: E402
from mtfm_rec.data import sample_format as fmt  # noqa: E402
from mtfm_rec.data import synthetic  # noqa: E402
from mtfm_rec.data.aggregate_spark import aggregate_spark, with_user_partition  # noqa: E402
from mtfm_rec.data.config import AggregationConfig  # noqa: E402
from mtfm_rec.data.errors import AggregationError  # noqa: E402
from mtfm_rec.data.reader import DataContractError  # noqa: E402

TIMING_KEYS = ("seconds", "read_seconds", "build_seconds")


@pytest.fixture(scope="module", autouse=True)
def spark() -> Iterator[SparkSession]:
    """One small session for the module; aggregate_spark uses the active one."""
    session = (
        SparkSession.builder.master("local[2]")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.default.parallelism", "2")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def config(**kw: Any) -> AggregationConfig:
    base: Dict[str, Any] = dict(num_partitions=3, num_workers=1, progress=False)
    base.update(kw)
    return AggregationConfig(**base)


def _freeze(value: Any) -> Any:
    return tuple(_freeze(v) for v in value) if isinstance(value, list) else value


def samples(out: str) -> Counter:
    """Every sample of an output (user, window, every T/H/R list in order), as a multiset."""
    rows = []
    for name in sorted(os.listdir(out)):
        if name.startswith("part-"):
            rows += pq.read_table(os.path.join(out, name)).to_pylist()
    return Counter(tuple(sorted((k, _freeze(v)) for k, v in row.items())) for row in rows)


def assert_same_output(local: str, spark_out: str) -> None:
    """Same sample set; and, stronger, the same files: shards byte for byte, markers, stats."""
    want = samples(local)
    assert sum(want.values()) > 0 and samples(spark_out) == want
    names = sorted(os.listdir(local))
    assert sorted(os.listdir(spark_out)) == names
    for name in names:
        a, b = (open(os.path.join(d, name), "rb").read() for d in (local, spark_out))
        if name == fmt.STATS_FILE:
            a_stats, b_stats = json.loads(a), json.loads(b)
            for key in TIMING_KEYS:
                a_stats.pop(key), b_stats.pop(key)
            assert a_stats == b_stats
        else:
            assert a == b, name


def both(root: str, tmp: Any, cfg: AggregationConfig) -> Tuple[agg.AggregationStats, agg.AggregationStats]:
    local = agg.aggregate(root, str(tmp / "local"), cfg)
    spark_stats = aggregate_spark(root, str(tmp / "spark"), cfg)
    assert_same_output(str(tmp / "local"), str(tmp / "spark"))
    return local, spark_stats


def write_raw(root: str, schema: Dict[str, Any], files: Dict[str, Dict[str, pa.Table]]) -> str:
    """A raw dataset whose files have the given names (``files["exposures/x"]["a b.parquet"]``)."""
    os.makedirs(root)
    with open(os.path.join(root, "dataset.yaml"), "w") as fh:
        yaml.safe_dump(schema, fh, sort_keys=False)
    for folder, tables in files.items():
        os.makedirs(os.path.join(root, folder))
        for name, table in tables.items():
            pq.write_table(table, os.path.join(root, folder, name), row_group_size=3)
    return root


# -------------------------------------------------------------------- the hand-made case
EDGE_SCHEMA: Dict[str, Any] = {
    "name": "edge",
    "time_unit": "s",
    "sequences": [
        {"name": "h", "kind": "history", "max_len": 3, "features": {"a": 4}},
        {"name": "r", "kind": "realtime", "max_len": 2, "features": {"a": 4}},
    ],
    "scenarios": [
        {
            "name": "x",
            "user_features": {"u": 3},
            "item_features": {"i": 5, "tags": {"size": 4, "pooling": "sum"}},
            "dense_features": ["d"],
            "tasks": ["click", "order"],
        },
        {"name": "y", "item_features": {"i": 3}, "tasks": ["click"]},
    ],
}


def _ints(values: List[Optional[int]], t: Optional[pa.DataType] = None) -> pa.Array:
    return pa.array(values, type=t or pa.int64())


def _replace(table: pa.Table, **columns: pa.Array) -> pa.Table:
    """``table`` with some columns replaced (same position)."""
    return pa.table({n: columns.get(n, table.column(n)) for n in table.column_names})


def edge_files() -> Dict[str, Dict[str, pa.Table]]:
    """ts ties within and across files and scenarios, negative ts and window bounds, nulls,
    out-of-range ids, multi-hot lists (null id, null list, empty list), request ids in one file
    only, uint64 and int32 columns, a busy user-window, and file names whose URI encoding sorts
    differently ("a b" < "a!" but "a%20b" > "a!") or holds glob characters."""
    tags = pa.list_(pa.int64())
    x1 = pa.table(  # "a b.parquet": sorts first
        {
            "user_id": _ints([1, 1, 1, 1, 2, 2, -5]),
            "ts": _ints([0, 0, 3, 9, -1, 10, 5]),
            "request_id": _ints([7, 7, None, 8, 1, 2, 3]),
            "u": _ints([0, 5, None, -1, 2, 2, 1]),
            "i": _ints([4, 9, -7, None, 0, 1, 2]),
            "tags": pa.array([[1, 2], [None, 7], None, [], [-1], [3, 3, 3], [0]], tags),
            "d": pa.array([0.5, None, -0.0, 1e30, 2.0, 3.0, 4.0], pa.float64()),
            "click": _ints([1, 0, None, 1, 1, 0, 1]),
            "order": _ints([1, 0, 1, None, 0, 0, 1]),
        }
    )
    x2 = pa.table(  # "a!.parquet": no request_id, uint64 / int32 columns
        {
            "user_id": _ints([1, 1, 2, -5], pa.int32()),
            "ts": _ints([0, 3, -1, 5]),
            "u": _ints([1, 2, 0, 2], pa.uint64()),
            "i": _ints([2**63 - 1, 3, 4, 0], pa.uint64()),
            "tags": pa.array([[2], [], None, [9]], pa.list_(pa.int32())),
            "d": _ints([1, 2, 3, 4], pa.int32()),
            "click": _ints([1, 1, 0, None], pa.int8()),
            "order": _ints([0, 1, 0, None], pa.int8()),
        }
    )
    y = pa.table(
        {
            "user_id": _ints([1, 1, 3, 2]),
            "ts": _ints([0, 3, 20, -1]),
            "i": _ints([5, None, -4, 1]),
            "click": _ints([0, None, 1, 1]),
            "split": _ints([0, None, 2, 1]),
        }
    )

    def actions(users: List[int], ts: List[int], a: List[Optional[int]]) -> pa.Table:
        return pa.table({"user_id": _ints(users), "ts": _ints(ts), "a": _ints(a)})

    h = {
        "0.parquet": actions([1, 1, 1, 2, -5, 1], [-20, -3, -3, -15, -1, 0], [1, None, 7, 2, 3, -1]),
        "1.parquet": actions([1, 1, 2], [-3, -30, -12], [2, 3, 0]),
    }
    r = {
        "0.parquet": actions([1, 1, 1, 2, 2], [-6, -5, 1, -1, 9], [0, 1, 2, 3, None]),
        "1.parquet": actions([1, 1, -5], [-5, 4, 0], [5, 6, 7]),
    }
    return {
        "exposures/x": {"a b.parquet": x1, "a!.parquet": x2},
        "exposures/y": {"b[1]+c.parquet": y},
        "behaviors/h": h,
        "behaviors/r": r,
    }


@pytest.mark.parametrize("chunk, ansi", [(None, "true"), (2, "true"), (2, "false")])
def test_edge_cases_give_the_local_engines_output(
    spark: SparkSession, tmp_path: Any, chunk: Optional[int], ansi: str
) -> None:
    root = write_raw(str(tmp_path / "raw"), EDGE_SCHEMA, edge_files())
    # 8 shards for 4 users: empty shards too
    cfg = config(
        num_partitions=8, window_seconds=10, realtime_lookback_seconds=5, max_exposures_per_sample=chunk
    )
    before = spark.conf.get("spark.sql.ansi.enabled")
    spark.conf.set("spark.sql.ansi.enabled", ansi)  # overflow-free either way: the same output
    try:
        local, spark_stats = both(root, tmp_path, cfg)
    finally:
        spark.conf.set("spark.sql.ansi.enabled", before or "true")
    assert local.tokens_h["max"] > 0 and local.tokens_r["max"] > 0
    assert spark_stats.samples_out == local.samples_out
    if chunk:  # the busy user-window (user 1, window [0, 10): 8 exposures) was split
        assert local.tokens_t["max"] == chunk
    else:  # and split by its real-time sequence: r (max_len 2) has 3 actions before ts 3
        assert local.tokens_t["max"] == 4


def test_a_synthetic_dataset_gives_the_local_engines_output(tmp_path: Any) -> None:
    root = str(tmp_path / "raw")
    synthetic.generate(root, num_users=25, num_days=3, history_days=3, seed=0)
    local, _ = both(root, tmp_path, config(window_seconds=86400, realtime_lookback_seconds=3600))
    assert local.tokens_h["max"] > 0 and local.tokens_r["max"] > 0


def test_bad_rows_are_skipped_and_counted_like_the_local_engine(tmp_path: Any) -> None:
    files = edge_files()
    # row 0: order 1 after click 0 (funnel); row 1: ts out of range and a label 3 (counted once,
    # under its first rule, ts); row 2: a NaN dense value; row 3: a null user_id
    files["exposures/x"]["a b.parquet"] = _replace(
        files["exposures/x"]["a b.parquet"],
        user_id=_ints([1, 1, 1, None, 2, 2, -5]),
        ts=_ints([0, 2**62, 3, 9, -1, 10, 5]),
        click=_ints([0, 3, None, 1, 1, 0, 1]),
        d=pa.array([0.5, None, float("nan"), 1e30, 2.0, 3.0, 4.0]),
    )
    y = files["exposures/y"]["b[1]+c.parquet"]
    files["exposures/y"]["b[1]+c.parquet"] = _replace(y, split=_ints([0, 5, 2, 1]))  # split 5
    files["behaviors/h"]["1.parquet"] = pa.table(
        {"user_id": _ints([1, 1, 2]), "ts": _ints([-3, -30, -12]), "a": _ints([2, 2**64 - 1, 0], pa.uint64())}
    )
    root = write_raw(str(tmp_path / "raw"), EDGE_SCHEMA, files)
    local, spark_stats = both(root, tmp_path, config(window_seconds=10, skip_bad_rows=True))
    assert local.bad_rows == 6 and spark_stats.bad_rows_detail == local.bad_rows_detail


def _errors(root: str, tmp: Any) -> Tuple[Exception, Exception]:
    errors = []
    for engine, run in (("local", agg.aggregate), ("spark", aggregate_spark)):
        with pytest.raises(DataContractError) as info:
            run(root, str(tmp / engine), config())
        assert not os.path.exists(tmp / engine)
        errors.append(info.value)
    return errors[0], errors[1]


@pytest.mark.parametrize(
    "case, want",
    [
        ("missing column", r"x/a b.parquet: column 'click': missing column$"),
        ("label", r"x/a!.parquet: column 'order': label outside \{0, 1\} \(row 2; 1 such row"),
        ("row before structural", r"x/a b.parquet: column 'click': label outside \{0, 1\} \(row 1;"),
        ("corrupt", r"x/a!.parquet: not a readable Parquet file \("),
        ("footer overstates rows", r"x/a!.parquet: not a readable Parquet file \(read 4 rows of the 5 its"),
    ],
)
def test_bad_input_raises_the_local_engines_error(tmp_path: Any, case: str, want: str) -> None:
    files = edge_files()
    x1, x2 = files["exposures/x"]["a b.parquet"], files["exposures/x"]["a!.parquet"]
    if case == "missing column":
        files["exposures/x"]["a b.parquet"] = x1.drop_columns(["click"])
    elif case == "label":  # in the second file, in the local reader's order
        files["exposures/x"]["a!.parquet"] = _replace(x2, order=_ints([0, 1, 2, None], pa.int8()))
    elif case == "row before structural":  # a row error in the first file comes first
        files["exposures/x"]["a b.parquet"] = _replace(x1, click=_ints([1, 2, None, 1, 1, 0, 1]))
        files["exposures/x"]["a!.parquet"] = _replace(x2, u=pa.array(["a", "b", "c", "d"]))
    root = write_raw(str(tmp_path / "raw"), EDGE_SCHEMA, files)
    if case == "corrupt":  # a data page of the second file, its footer intact
        path = os.path.join(root, "exposures/x/a!.parquet")
        data = bytearray(open(path, "rb").read())
        data[8:40] = b"\xff" * 32
        open(path, "wb").write(bytes(data))
    if case == "footer overstates rows":  # Spark reads the row groups' 4 rows, without an error
        path = os.path.join(root, "exposures/x/a!.parquet")
        data = open(path, "rb").read()
        open(path, "wb").write(overstate_row_count(data))
    local, spark_error = _errors(root, tmp_path)
    assert str(spark_error) == str(local)
    assert isinstance(spark_error, DataContractError) and spark_error.path.startswith(root)
    assert re.search(want, str(spark_error)), str(spark_error)


def test_a_window_too_big_for_one_sample_is_refused_like_the_local_engine(tmp_path: Any) -> None:
    n = agg.UNCHUNKED_EXPOSURE_LIMIT + 1
    schema = {"name": "busy", "time_unit": "s", "sequences": [], "scenarios": [EDGE_SCHEMA["scenarios"][1]]}
    table = pa.table({"user_id": _ints([7] * n + [8]), "ts": _ints(list(range(n)) + [0])})
    table = table.append_column("i", _ints([0] * (n + 1))).append_column("click", _ints([0] * (n + 1)))
    root = write_raw(str(tmp_path / "raw"), schema, {"exposures/y": {"0.parquet": table}})
    messages = []
    for engine, run in (("local", agg.aggregate), ("spark", aggregate_spark)):
        with pytest.raises(AggregationError, match=rf"user 7, window \[0, 86400\).*{n} exposures") as info:
            run(root, str(tmp_path / engine), config())
        messages.append(str(info.value))
    assert messages[0] == messages[1]


def test_the_shard_expression_is_the_local_splitmix64(spark: SparkSession) -> None:
    ids = [0, 1, -1, 7919, -3, 2**62, -(2**62), 2**63 - 1, -(2**63), 123456789012345]
    ids += np.random.default_rng(0).integers(-(2**63), 2**63 - 1, 40).tolist()
    frame = spark.createDataFrame([(i,) for i in ids], "user_id long")
    for p in (1, 3, 8, 1000):
        got = [r["k"] for r in with_user_partition(frame, "user_id", p, "k").collect()]
        assert got == parts.user_partition(np.array(ids, np.int64), p).tolist()


def test_memory_urls_are_refused_before_spark_runs(memory_root: str) -> None:
    schema = {"name": "m", "time_unit": "s", "sequences": [], "scenarios": [EDGE_SCHEMA["scenarios"][1]]}
    fs = fsspec.filesystem("memory")
    base = memory_root[len("memory://") :]
    fs.makedirs(f"{base}/raw/exposures/y", exist_ok=True)
    with fs.open(f"{base}/raw/dataset.yaml", "w") as fh:
        fh.write(yaml.safe_dump(schema))
    with fs.open(f"{base}/raw/exposures/y/0.parquet", "wb") as fh:
        pq.write_table(pa.table({"user_id": [1], "ts": [0], "i": [0], "click": [1]}), fh)
    with pytest.raises(AggregationError, match="memory://.*Spark cannot read"):
        aggregate_spark(f"{memory_root}/raw", f"{memory_root}/out", config())
