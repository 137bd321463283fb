"""User-level aggregation: parity with a naive reference, leakage rules, determinism, caching, CLI."""

from __future__ import annotations

import glob
import json
import os
import uuid
from collections import Counter
from typing import Any, Callable, Dict, List, Tuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtfm_rec.config import ConfigError
from mtfm_rec.data import aggregate as agg
from mtfm_rec.data import aggregate_partitions as parts
from mtfm_rec.data import sample_format as fmt
from mtfm_rec.data.batch import collate
from mtfm_rec.data.config import AggregationConfig
from mtfm_rec.data.errors import AggregationError
from mtfm_rec.data.reader import DataContractError, RawDataset
from mtfm_rec.data.schema import DatasetSchema

DAY = 86400
LOOKBACK = 3 * 3600


def config(**kw: Any) -> AggregationConfig:
    base = dict(num_partitions=3, num_workers=1, progress=False, realtime_lookback_seconds=LOOKBACK)
    base.update(kw)
    return AggregationConfig(**base)


def read_out(out: str) -> pa.Table:
    fs, path = fsspec.core.url_to_fs(out)
    tables = []
    for p in sorted(fs.glob(f"{path.rstrip('/')}/{fmt.SHARD_GLOB}")):
        with fs.open(p, "rb") as fh:
            tables.append(pq.read_table(fh))
    return pa.concat_tables(tables)


def raw_rows(root: str, kind: str, name: str) -> List[Dict[str, Any]]:
    """Rows of a raw folder in contract order (sorted files, then rows), as normalised dicts."""
    ds = RawDataset(root, skip_bad_rows=True)
    it = (
        ds.iter_scenario(ds.schema.scenario(name))
        if kind == "exp"
        else ds.iter_sequence(ds.schema.sequence(name))
    )
    rows: List[Dict[str, Any]] = []
    for _, batch in it:
        rows += batch.to_pylist()
    return rows


@pytest.fixture(scope="module")
def demo(
    tmp_path_factory: Any,
    raw_writer: Callable[..., str],
    demo_tables: Callable[..., Any],
    demo_schema: Dict[str, Any],
) -> Tuple[str, str, AggregationConfig]:
    tmp = tmp_path_factory.mktemp("agg")
    tables = demo_tables(seed=1)
    root = raw_writer(str(tmp / "raw"), demo_schema, tables["exposures"], tables["behaviors"])
    cfg = config()
    agg.aggregate(root, str(tmp / "out"), cfg)
    return root, str(tmp / "out"), cfg


def assert_matches_reference(root: str, out: str, window: int, lookback: int) -> int:
    """Checks every sample of ``out`` against a per-sample Python reference of the rules in
    sample_format; returns the number of samples."""
    schema = DatasetSchema.load(root)
    table = read_out(out)
    assert table.schema == fmt.arrow_schema(schema)
    samples = table.to_pylist()
    keys = [(s["user_id"], s["window_start"]) for s in samples]
    assert len(set(keys)) == len(keys)
    # Expected samples: distinct (user, window) over all scenarios' exposures.
    exp_rows = {s.name: raw_rows(root, "exp", s.name) for s in schema.scenarios}
    expected_keys = {(r["user_id"], r["ts"] // window * window) for rows in exp_rows.values() for r in rows}
    assert set(keys) == expected_keys
    seq_rows = {q.name: raw_rows(root, "seq", q.name) for q in schema.sequences}
    for s in samples:
        user, start, end = s["user_id"], s["window_start"], s["window_end"]
        assert end - start == window
        for sc in schema.scenarios:
            mine = [r for r in exp_rows[sc.name] if r["user_id"] == user and start <= r["ts"] < end]
            mine.sort(key=lambda r: r["ts"])  # stable: ties keep file then row order
            assert s[fmt.exp_ts(sc.name)] == [r["ts"] for r in mine]
            for g, c, _ in sc.categorical():
                assert s[fmt.exp_feature(sc.name, g, c)] == [r[f"{g}/{c}"] for r in mine]
            for c in sc.dense_features:
                assert s[fmt.exp_dense(sc.name, c)] == [r[f"dense/{c}"] for r in mine]
            for t in sc.tasks:
                assert s[fmt.exp_label(sc.name, t)] == [r[f"label/{t}"] for r in mine]
            assert s[fmt.exp_request_id(sc.name)] == [r["request_id"] for r in mine]
            assert s[fmt.exp_split(sc.name)] == [r["split"] for r in mine]
        for q in schema.sequences:
            acts = sorted((r for r in seq_rows[q.name] if r["user_id"] == user), key=lambda r: r["ts"])
            if q.is_history:
                kept = [r for r in acts if r["ts"] < start][-q.max_len :]
            else:
                kept = [r for r in acts if start - lookback <= r["ts"] < end][-q.max_len :]
            assert s[fmt.seq_ts(q.name)] == [r["ts"] for r in kept]
            for f in q.features:
                assert s[fmt.seq_feature(q.name, f)] == [r[f] for r in kept]
    return len(samples)


def test_output_matches_naive_reference(demo: Tuple[str, str, AggregationConfig]) -> None:
    root, out, _ = demo
    assert assert_matches_reference(root, out, DAY, LOOKBACK) > 0


_TINY = {
    "name": "tiny",
    "time_unit": "s",
    "sequences": [
        {"name": "h", "kind": "history", "max_len": 3, "features": {"a": 4}},
        {"name": "r", "kind": "realtime", "max_len": 2, "features": {"a": 4}},
    ],
    "scenarios": [
        {"name": "x", "item_features": {"i": 3}, "tasks": ["click"]},
        {"name": "y", "user_features": {"u": 2}, "dense_features": ["d"], "tasks": ["c", "o"]},
    ],
}


@st.composite
def tiny_tables(draw: Any) -> Dict[str, Dict[str, List[Dict[str, List[Any]]]]]:
    """Few users, timestamps around 0 (negative too) on a coarse grid so ties and boundaries
    (ts == window_start, == window_end - 1) are common; empty files allowed."""
    users = st.integers(0, 3)
    ts = st.integers(-4, 8).map(lambda v: v * 5)

    def files(row: Any) -> Any:
        return st.lists(st.lists(row, max_size=8), min_size=1, max_size=3)

    def cols(rows: List[Tuple[Any, ...]], names: List[str]) -> Dict[str, List[Any]]:
        return {n: [r[i] for r in rows] for i, n in enumerate(names)}

    label = st.one_of(st.none(), st.integers(0, 1))
    ident = st.one_of(st.none(), st.integers(-5, 9))
    x = draw(files(st.tuples(users, ts, ident, label)))
    row = st.tuples(users, ts, ident, st.floats(-2, 2, width=32), label, label)
    y = draw(files(row.filter(lambda r: not (r[4] == 0 and r[5] == 1))))  # funnel: o = 1 needs c != 0
    h = draw(files(st.tuples(users, ts, ident)))
    r = draw(files(st.tuples(users, ts, ident)))
    return {
        "exposures": {
            "x": [cols(f, ["user_id", "ts", "i", "click"]) for f in x],
            "y": [cols(f, ["user_id", "ts", "u", "d", "c", "o"]) for f in y],
        },
        "behaviors": {
            "h": [cols(f, ["user_id", "ts", "a"]) for f in h],
            "r": [cols(f, ["user_id", "ts", "a"]) for f in r],
        },
    }


def _typed(table: Dict[str, List[Any]]) -> pa.Table:
    return pa.table({k: pa.array(v, type=pa.float64() if k == "d" else pa.int64()) for k, v in table.items()})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tables=tiny_tables(), window=st.sampled_from([7, 10, 20]), lookback=st.sampled_from([0, 5, 12]))
def test_random_small_datasets_match_reference(
    raw_writer: Callable[..., str], tables: Dict[str, Any], window: int, lookback: int
) -> None:
    root = f"memory://mtfm-hyp-{uuid.uuid4().hex}"
    try:
        exposures = {k: [_typed(t) for t in v] for k, v in tables["exposures"].items()}
        behaviors = {k: [_typed(t) for t in v] for k, v in tables["behaviors"].items()}
        raw = raw_writer(f"{root}/raw", _TINY, exposures, behaviors)
        cfg = config(num_partitions=2, window_seconds=window, realtime_lookback_seconds=lookback)
        stats = agg.aggregate(raw, f"{root}/out", cfg)
        n = assert_matches_reference(raw, f"{root}/out", window, lookback)
        assert stats.samples_out == n
        assert stats.exposures_in == sum(len(t["ts"]) for v in tables["exposures"].values() for t in v)
    finally:
        fsspec.filesystem("memory").rm(root[len("memory://") :], recursive=True)


def test_no_history_at_or_after_window_start_and_realtime_in_bounds(
    demo: Tuple[str, str, AggregationConfig],
) -> None:
    root, out, _ = demo
    schema = DatasetSchema.load(root)
    table = read_out(out).to_pylist()
    seen_h = seen_r = 0
    for s in table:
        for q in schema.sequences:
            ts = s[fmt.seq_ts(q.name)]
            assert ts == sorted(ts) and len(ts) <= q.max_len
            for f in q.features:
                assert len(s[fmt.seq_feature(q.name, f)]) == len(ts)
            if q.is_history:
                assert all(t < s["window_start"] for t in ts)
                seen_h += len(ts)
            else:
                assert all(s["window_start"] - LOOKBACK <= t < s["window_end"] for t in ts)
                seen_r += len(ts)
    assert seen_h > 0 and seen_r > 0  # the checks above were not vacuous


def test_every_exposure_lands_in_exactly_one_sample(demo: Tuple[str, str, AggregationConfig]) -> None:
    root, out, _ = demo
    schema = DatasetSchema.load(root)
    table = read_out(out)
    stats = json.loads(open(os.path.join(out, fmt.STATS_FILE)).read())
    total = 0
    for sc in schema.scenarios:
        cols = (
            [("ts", fmt.exp_ts(sc.name))]
            + [(f"{g}/{c}", fmt.exp_feature(sc.name, g, c)) for g, c, _ in sc.categorical()]
            + [(f"label/{t}", fmt.exp_label(sc.name, t)) for t in sc.tasks]
        )
        cols += [(f"dense/{c}", fmt.exp_dense(sc.name, c)) for c in sc.dense_features]
        lengths = pa.compute.list_value_length(table.column(fmt.exp_ts(sc.name))).to_numpy()
        users = np.repeat(table.column("user_id").to_numpy(), lengths)
        flat = [table.column(dst).combine_chunks().flatten().to_pylist() for _, dst in cols]
        got = Counter(zip(users.tolist(), *flat))
        want = Counter(
            tuple([r["user_id"]] + [r[src] for src, _ in cols]) for r in raw_rows(root, "exp", sc.name)
        )
        assert got == want
        total += sum(want.values())
        assert stats["exposures_per_scenario"][sc.name] == sum(want.values())
    assert stats["exposures_in"] == total
    assert stats["samples_out"] == table.num_rows
    assert stats["compression_ratio"] == pytest.approx(total / table.num_rows)


def test_deterministic_and_independent_of_worker_count(
    demo: Tuple[str, str, AggregationConfig], tmp_path: Any
) -> None:
    root, out, _ = demo
    agg.aggregate(root, str(tmp_path / "again"), config(num_workers=2))
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "part-*.parquet")))
    assert names == [fmt.shard_name(k) for k in range(3)]
    for name in names:
        a = open(os.path.join(out, name), "rb").read()
        b = open(os.path.join(tmp_path / "again", name), "rb").read()
        assert a == b, name


def test_users_are_hash_partitioned(demo: Tuple[str, str, AggregationConfig]) -> None:
    _, out, _ = demo
    for k in range(3):
        users = pq.read_table(os.path.join(out, fmt.shard_name(k))).column("user_id").to_numpy()
        assert (parts.user_partition(users, 3) == k).all()


def test_user_partition_is_splitmix64() -> None:
    def splitmix(x: int) -> int:
        m = (1 << 64) - 1
        z = (x + 0x9E3779B97F4A7C15) & m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)

    ids = np.array([0, 1, -1, 12345, 2**62, -(2**63)], np.int64)
    want = [splitmix(int(i) & ((1 << 64) - 1)) % 7 for i in ids]
    assert parts.user_partition(ids, 7).tolist() == want


def test_count_before_matches_bruteforce() -> None:
    rng = np.random.default_rng(0)
    a_user = rng.integers(0, 5, 300)
    a_ts = rng.integers(0, 20, 300)
    order = np.lexsort((a_ts, a_user))
    a_user, a_ts = a_user[order], a_ts[order]
    q_user, q_ts = rng.integers(-1, 6, 100), rng.integers(-1, 22, 100)
    got = parts._count_before(a_user, a_ts, q_user, q_ts)
    want = [int(((a_user < u) | ((a_user == u) & (a_ts < t))).sum()) for u, t in zip(q_user, q_ts)]
    assert got.tolist() == want


def test_markers_and_stats(demo: Tuple[str, str, AggregationConfig]) -> None:
    root, out, cfg = demo
    success = agg.read_success(out)
    assert success is not None
    ds = RawDataset(root)
    shards = success.pop("shards")
    assert success == {"producer": fmt.PRODUCER, **agg.fingerprint(ds, cfg)}
    assert [e[0] for e in success["inputs"]][0] == "dataset.yaml"
    # the shard list: every shard, with the row count and size it was written with
    assert [e["name"] for e in shards] == [fmt.shard_name(k) for k in range(cfg.num_partitions)]
    for e in shards:
        path = os.path.join(out, e["name"])
        assert (e["rows"], e["bytes"]) == (pq.read_metadata(path).num_rows, os.path.getsize(path))
    assert sum(e["rows"] for e in shards) == read_out(out).num_rows
    assert DatasetSchema.load(out).to_dict() == ds.schema.to_dict()
    stats = json.loads(open(os.path.join(out, fmt.STATS_FILE)).read())
    assert stats["tokens_h"]["max"] <= 6 and stats["tokens_r"]["max"] <= 4
    assert stats["tokens_t"]["p50"] <= stats["tokens_t"]["p90"] <= stats["tokens_t"]["max"]


def test_fingerprint_ignores_workers_but_not_window(demo: Tuple[str, str, AggregationConfig]) -> None:
    root, _, cfg = demo
    ds = RawDataset(root)
    fp = agg.fingerprint(ds, cfg)["fingerprint"]
    assert agg.fingerprint(ds, config(num_workers=2, progress=True))["fingerprint"] == fp
    assert agg.fingerprint(ds, config(window_seconds=3600))["fingerprint"] != fp


def test_ensure_aggregated_caches_by_fingerprint(
    raw_writer: Callable[..., str],
    demo_tables: Callable[..., Any],
    demo_schema: Dict[str, Any],
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tables = demo_tables(seed=2, n_users=3, n_exposures=40, n_actions=40)
    root = raw_writer(str(tmp_path / "raw"), demo_schema, tables["exposures"], tables["behaviors"])
    calls: List[str] = []
    real = agg.aggregate
    monkeypatch.setattr(agg, "aggregate", lambda r, o, c: calls.append(o) or real(r, o, c))
    cache = str(tmp_path / "cache")
    first = agg.ensure_aggregated(root, cache, config())
    assert agg.ensure_aggregated(root, cache, config(num_workers=2)) == first
    assert len(calls) == 1
    hourly = agg.ensure_aggregated(root, cache, config(window_seconds=3600))
    assert hourly != first and len(calls) == 2
    # A changed input file (size/mtime) re-aggregates into a new dir.
    raw_writer(root, demo_schema, {"food": [tables["exposures"]["food"][0].slice(1)]})
    changed = agg.ensure_aggregated(root, cache, config())
    assert changed != first and len(calls) == 3
    assert read_out(changed).num_rows > 0


def test_memory_url_end_to_end(
    raw_writer: Callable[..., str],
    demo_tables: Callable[..., Any],
    demo_schema: Dict[str, Any],
    memory_root: str,
) -> None:
    tables = demo_tables(seed=3, n_users=4, n_exposures=60, n_actions=60)
    root = raw_writer(f"{memory_root}/raw", demo_schema, tables["exposures"], tables["behaviors"])
    out = f"{memory_root}/out"
    stats = agg.aggregate(root, out, config())
    table = read_out(out)
    assert table.num_rows == stats.samples_out > 0
    assert agg.read_success(out) is not None
    assert stats.exposures_in == 60 + 30


def test_collate_accepts_a_shard(demo: Tuple[str, str, AggregationConfig]) -> None:
    root, out, _ = demo
    schema = DatasetSchema.load(out)
    table = pq.read_table(os.path.join(out, fmt.shard_name(0))).slice(0, 5)
    batch = collate(table, schema)
    assert batch.batch_size == 5
    want_t = sum(
        np.asarray(pa.compute.list_value_length(table.column(fmt.exp_ts(s.name)))) for s in schema.scenarios
    )
    assert batch.num_targets.tolist() == list(want_t)
    assert int(batch.token_offsets[-1]) == batch.num_tokens


def test_millisecond_time_unit_scales_windows(
    raw_writer: Callable[..., str], demo_schema: Dict[str, Any], tmp_path: Any
) -> None:
    schema = dict(demo_schema, time_unit="ms", sequences=[])
    exp = {
        "hp": [
            {
                "user_id": [1, 1, 1],
                "ts": [0, 3_599_999, 3_600_000],
                "city": [0] * 3,
                "shop": [0] * 3,
                "dist": [0] * 3,
                "price": [0.0] * 3,
                "click": [0] * 3,
                "order": [0] * 3,
            }
        ],
        "food": [{"user_id": [2], "ts": [-1], "shop": [0], "click": [1]}],
    }
    root = raw_writer(str(tmp_path / "raw"), schema, exp)
    agg.aggregate(root, str(tmp_path / "out"), config(window_seconds=3600))
    got = {
        (r["user_id"], r["window_start"], r["window_end"])
        for r in read_out(str(tmp_path / "out")).to_pylist()
    }
    assert got == {(1, 0, 3_600_000), (1, 3_600_000, 7_200_000), (2, -3_600_000, 0)}  # floor


def test_bad_rows_fail_or_are_reported(
    raw_writer: Callable[..., str],
    demo_tables: Callable[..., Any],
    demo_schema: Dict[str, Any],
    tmp_path: Any,
) -> None:
    tables = demo_tables(seed=4, n_users=3, n_exposures=30, n_actions=30)
    bad = tables["exposures"]["food"][1]
    bad = bad.set_column(bad.schema.get_field_index("click"), "click", pa.array([3] * bad.num_rows))
    tables["exposures"]["food"][1] = bad
    root = raw_writer(str(tmp_path / "raw"), demo_schema, tables["exposures"], tables["behaviors"])
    with pytest.raises(DataContractError, match=r"food/part-1.parquet: column 'click': label outside"):
        agg.aggregate(root, str(tmp_path / "strict"), config())
    assert not os.path.exists(tmp_path / "strict" / fmt.SUCCESS_FILE)
    stats = agg.aggregate(root, str(tmp_path / "skip"), config(skip_bad_rows=True))
    assert stats.bad_rows == bad.num_rows
    assert stats.exposures_per_scenario["food"] == 15 - bad.num_rows
    assert stats.bad_rows_detail[0]["column"] == "click"


def test_cli_parses_overrides_and_prints_stats(
    demo: Tuple[str, str, AggregationConfig], tmp_path: Any, capsys: pytest.CaptureFixture
) -> None:
    root, _, _ = demo
    out = str(tmp_path / "cli")
    stats = agg.main(["--raw", root, "--out", out, "window_seconds=3600", "num_workers=1", "progress=false"])
    printed = capsys.readouterr().out
    assert f"samples out:        {stats.samples_out}" in printed
    assert "tokens/sample H:" in printed and "compression ratio:" in printed
    assert agg.read_success(out)["config"]["window_seconds"] == 3600
    with pytest.raises(ConfigError, match="unknown key"):
        agg.main(["--raw", root, "--out", out, "window_second=3600"])


def test_realtime_lookback_defaults_to_the_dataset_recommendation() -> None:
    from mtfm_rec.data.aggregate import realtime_lookback_seconds
    from mtfm_rec.data.config import AggregationConfig
    from mtfm_rec.data.schema import DatasetSchema

    raw = {"scenarios": [{"name": "s", "item_features": {"i": 3}, "tasks": ["click"]}]}
    plain = DatasetSchema.from_dict(raw)
    recommended = DatasetSchema.from_dict(dict(raw, recommended_realtime_lookback_seconds=0))
    assert realtime_lookback_seconds(AggregationConfig(window_seconds=3600), plain) == 3600
    assert realtime_lookback_seconds(AggregationConfig(), recommended) == 0
    assert realtime_lookback_seconds(AggregationConfig(realtime_lookback_seconds=60), recommended) == 60


def test_busy_windows_split_into_time_ordered_chunks(
    demo: Tuple[str, str, AggregationConfig], tmp_path: Any
) -> None:
    root, whole_out, _ = demo
    schema = DatasetSchema.load(root)
    chunked_out = str(tmp_path / "chunked")
    agg.aggregate(root, chunked_out, config(max_exposures_per_sample=2))
    whole, chunked = read_out(whole_out).to_pylist(), read_out(chunked_out).to_pylist()

    def exposures(sample: Dict[str, Any]) -> List[Tuple[int, str, int]]:
        return sorted(
            (ts, s.name, rid)
            for s in schema.scenarios
            for ts, rid in zip(sample[fmt.exp_ts(s.name)], sample[fmt.exp_request_id(s.name)])
        )

    by_window: Dict[Tuple[int, int], List[Dict[str, Any]]] = {}
    for sample in chunked:
        assert 1 <= len(exposures(sample)) <= 2
        by_window.setdefault((sample["user_id"], sample["window_start"]), []).append(sample)
    assert len(chunked) > len(whole)  # the demo data has busier windows than 2 exposures
    for sample in whole:
        chunks = by_window.pop((sample["user_id"], sample["window_start"]))
        # the chunks partition the window's exposures, earliest first, and share its H and R
        assert sorted(sum((exposures(c) for c in chunks), [])) == exposures(sample)
        for earlier, later in zip(chunks, chunks[1:]):
            assert max(e[0] for e in exposures(earlier)) <= min(e[0] for e in exposures(later))
        for c in chunks:
            for q in schema.sequences:
                assert c[fmt.seq_ts(q.name)] == sample[fmt.seq_ts(q.name)]
    assert not by_window


@pytest.mark.parametrize("workers", [1, 2])
def test_a_window_too_big_for_one_sample_is_refused_with_the_fix(
    raw_writer: Callable[..., str], tmp_path: Any, workers: int
) -> None:
    n = agg.UNCHUNKED_EXPOSURE_LIMIT + 1
    schema = {
        "name": "busy",
        "time_unit": "s",
        "sequences": [],
        "scenarios": [{"name": "x", "item_features": {"i": 3}, "tasks": ["click"]}],
    }
    rows = {"user_id": [7] * n + [8], "ts": list(range(n)) + [0], "i": [0] * (n + 1), "click": [0] * (n + 1)}
    root = raw_writer(str(tmp_path / "raw"), schema, {"x": [rows]})
    out = str(tmp_path / "out")
    cfg = dict(num_partitions=2, num_workers=workers, window_seconds=DAY)
    with pytest.raises(
        AggregationError,
        match=rf"user 7, window \[0, 86400\) \(dataset ticks\): {n} exposures in one sample, above "
        rf"{n - 1} allowed without max_exposures_per_sample .*max_exposures_per_sample={n} or more",
    ):
        agg.aggregate(root, out, config(**cfg))
    assert not os.path.exists(out) and sorted(os.listdir(tmp_path)) == ["raw"]
    # the fixes the message names: split busy windows, or keep them whole on purpose
    chunked = agg.aggregate(root, out, config(max_exposures_per_sample=1024, **cfg))
    assert chunked.samples_out == -(-n // 1024) + 1 and chunked.tokens_t["max"] == 1024
    whole = agg.aggregate(root, out, config(max_exposures_per_sample=n, **cfg))
    assert whole.samples_out == 2 and whole.tokens_t["max"] == n
