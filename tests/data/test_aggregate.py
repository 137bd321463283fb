"""User-level aggregation: parity with a naive reference, leakage rules, determinism, caching, CLI."""

from __future__ import annotations

import glob
import json
import os
import uuid
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Tuple

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


def actions_by_user(root: str, schema: DatasetSchema) -> Dict[str, Dict[int, List[Dict[str, Any]]]]:
    """Per sequence, each user's actions in ts order (ties: file then row order, as raw_rows)."""
    out: Dict[str, Dict[int, List[Dict[str, Any]]]] = {}
    for q in schema.sequences:
        by_user = out.setdefault(q.name, {})
        for r in raw_rows(root, "seq", q.name):
            by_user.setdefault(r["user_id"], []).append(r)
        for rows in by_user.values():
            rows.sort(key=lambda r: r["ts"])  # stable
    return out


def _keep(max_len: int, fraction: float) -> int:
    return max(1, min(max_len, int(fraction * max_len)))


def expected_samples(
    root: str, window: int, lookback: int, keep: float = 0.5, chunk: Optional[int] = None
) -> List[Dict[str, Any]]:
    """Every sample the aggregation must write, from a per-exposure Python simulation of the
    rules in sample_format and mtfm_rec.data.realtime_split (no numpy, no shared code)."""
    schema = DatasetSchema.load(root)
    exp_rows = {s.name: raw_rows(root, "exp", s.name) for s in schema.scenarios}
    by_user = actions_by_user(root, schema)
    events: Dict[Tuple[int, int], List[Tuple[int, int, int]]] = {}
    for si, sc in enumerate(schema.scenarios):
        for idx, r in enumerate(exp_rows[sc.name]):
            events.setdefault((r["user_id"], r["ts"] // window * window), []).append((r["ts"], si, idx))
    out = []
    for (user, start), evs in sorted(events.items()):
        acts = {q.name: by_user[q.name].get(user, []) for q in schema.sequences}
        history = {
            q.name: [r for r in acts[q.name] if r["ts"] < start][-q.max_len :] for q in schema.sequences
        }
        realtime = [q for q in schema.sequences if not q.is_history]
        recent = {q.name: [r for r in acts[q.name] if r["ts"] >= start - lookback] for q in realtime}
        samples: List[Dict[str, Any]] = []
        slice_start: Dict[str, int] = {}
        for ts, si, idx in sorted(evs):
            before = {q.name: sum(r["ts"] < ts for r in recent[q.name]) for q in realtime}
            over = [q for q in realtime if samples and before[q.name] - slice_start[q.name] > q.max_len]
            if not samples:
                slice_start = {q.name: max(0, before[q.name] - q.max_len) for q in realtime}
            for q in over:
                slice_start[q.name] = max(0, before[q.name] - _keep(q.max_len, keep))
            if not samples or over or (chunk and len(samples[-1]["events"]) == chunk):
                samples.append({"events": [], "slice_start": dict(slice_start)})
            samples[-1]["events"].append((ts, si, idx))
            samples[-1]["before"] = before
        for sample in samples:
            row: Dict[str, Any] = {"user_id": user, "window_start": start, "window_end": start + window}
            for si, sc in enumerate(schema.scenarios):
                mine = [exp_rows[sc.name][idx] for _, s_i, idx in sample["events"] if s_i == si]
                row[fmt.exp_ts(sc.name)] = [r["ts"] for r in mine]
                for g, c, _ in sc.categorical():
                    row[fmt.exp_feature(sc.name, g, c)] = [r[f"{g}/{c}"] for r in mine]
                for c in sc.dense_features:
                    row[fmt.exp_dense(sc.name, c)] = [r[f"dense/{c}"] for r in mine]
                for t in sc.tasks:
                    row[fmt.exp_label(sc.name, t)] = [r[f"label/{t}"] for r in mine]
                row[fmt.exp_request_id(sc.name)] = [r["request_id"] for r in mine]
                row[fmt.exp_split(sc.name)] = [r["split"] for r in mine]
            for q in schema.sequences:
                if q.is_history:
                    kept = history[q.name]
                else:
                    kept = recent[q.name][sample["slice_start"][q.name] : sample["before"][q.name]]
                row[fmt.seq_ts(q.name)] = [r["ts"] for r in kept]
                for f in q.features:
                    row[fmt.seq_feature(q.name, f)] = [r[f] for r in kept]
            out.append(row)
    return out


def _canonical(rows: List[Dict[str, Any]]) -> List[str]:
    return sorted(json.dumps(r, sort_keys=True) for r in rows)


def assert_matches_reference(
    root: str, out: str, window: int, lookback: int, keep: float = 0.5, chunk: Optional[int] = None
) -> int:
    """Checks ``out`` sample for sample against :func:`expected_samples`; returns the count."""
    schema = DatasetSchema.load(root)
    table = read_out(out)
    assert table.schema == fmt.arrow_schema(schema)
    actual = _canonical(table.to_pylist())
    expected = _canonical(expected_samples(root, window, lookback, keep, chunk))
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a == e
    return len(actual)


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


def visible_contexts(samples: List[Dict[str, Any]], schema: DatasetSchema) -> Counter:
    """Per exposure (scenario, user, ts, request id), what its T token sees: each H sequence and
    the real-time actions with a strictly smaller ts (the dynamic mask), as a multiset."""
    seen: Counter = Counter()
    for sample in samples:
        h = tuple(tuple(sample[fmt.seq_ts(q.name)]) for q in schema.sequences if q.is_history)
        for sc in schema.scenarios:
            for ts, rid in zip(sample[fmt.exp_ts(sc.name)], sample[fmt.exp_request_id(sc.name)]):
                r = tuple(
                    tuple(
                        (t, i)
                        for t, i in zip(sample[fmt.seq_ts(q.name)], sample[fmt.seq_feature(q.name, f)])
                        if t < ts
                    )
                    for q in schema.sequences
                    if not q.is_history
                    for f in list(q.features)[:1]
                )
                seen[(sc.name, sample["user_id"], ts, rid, h, r)] += 1
    return seen


def test_busy_windows_split_into_time_ordered_chunks(
    demo: Tuple[str, str, AggregationConfig], tmp_path: Any
) -> None:
    root, whole_out, _ = demo
    schema = DatasetSchema.load(root)
    chunked_out = str(tmp_path / "chunked")
    agg.aggregate(root, chunked_out, config(max_exposures_per_sample=2))
    assert_matches_reference(root, chunked_out, DAY, LOOKBACK, chunk=2)
    whole, chunked = read_out(whole_out).to_pylist(), read_out(chunked_out).to_pylist()
    assert len(chunked) > len(whole)  # the demo data has busier windows than 2 exposures
    for sample in chunked:
        assert 1 <= sum(len(sample[fmt.exp_ts(s.name)]) for s in schema.scenarios) <= 2
    # chunking by exposure count never changes what an exposure sees
    assert visible_contexts(chunked, schema) == visible_contexts(whole, schema)


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


@pytest.mark.parametrize("keep", [0.5, 1.0])
def test_each_exposure_sees_its_most_recent_realtime_actions(
    demo: Tuple[str, str, AggregationConfig], tmp_path: Any, keep: float
) -> None:
    """Between keep * max_len and max_len of the exposure's latest actions before it (all of them
    where it has fewer), never an older one in place of a newer one; keep=1: exactly the last
    max_len, as serving gives."""
    root, _, _ = demo
    schema = DatasetSchema.load(root)
    out = str(tmp_path / "out")
    agg.aggregate(root, out, config(realtime_split_keep=keep))
    actions = actions_by_user(root, schema)
    checked = truncated = 0
    for sample in read_out(out).to_pylist():
        for q in schema.sequences:
            if q.is_history:
                continue
            kept = sample[fmt.seq_ts(q.name)]
            for sc in schema.scenarios:
                for ts in sample[fmt.exp_ts(sc.name)]:
                    lo = sample["window_start"] - LOOKBACK
                    user_acts = actions[q.name].get(sample["user_id"], [])
                    ideal = [r["ts"] for r in user_acts if lo <= r["ts"] < ts][-q.max_len :]
                    seen = [t for t in kept if t < ts]
                    assert seen == ideal[len(ideal) - len(seen) :], (sample["user_id"], ts)  # a suffix
                    floor = min(len(ideal), q.max_len if keep == 1.0 else int(keep * q.max_len))
                    assert floor <= len(seen) <= q.max_len
                    checked += 1
                    truncated += len(seen) < len(ideal)
    assert checked > 0
    assert (truncated == 0) if keep == 1.0 else (truncated > 0)  # the demo's busy windows overflow


def test_later_actions_and_exposures_never_change_what_an_exposure_sees(
    raw_writer: Callable[..., str],
    demo_tables: Callable[..., Any],
    demo_schema: Dict[str, Any],
    tmp_path: Any,
) -> None:
    """The same data cut at a time C: every exposure before C sees exactly the same H and R."""
    tables = demo_tables(seed=1)
    all_ts = np.concatenate([t["ts"].to_numpy() for files in tables["exposures"].values() for t in files])
    cut = int(np.median(all_ts))

    def before(files: List[pa.Table]) -> List[pa.Table]:
        return [t.filter(pa.compute.less(t["ts"], cut)) for t in files]

    full = raw_writer(str(tmp_path / "full"), demo_schema, tables["exposures"], tables["behaviors"])
    past = raw_writer(
        str(tmp_path / "past"),
        demo_schema,
        {k: before(v) for k, v in tables["exposures"].items()},
        {k: before(v) for k, v in tables["behaviors"].items()},
    )
    schema = DatasetSchema.load(full)
    for root in (full, past):
        agg.aggregate(root, f"{root}-out", config())
    seen_full = visible_contexts(read_out(f"{full}-out").to_pylist(), schema)
    seen_past = visible_contexts(read_out(f"{past}-out").to_pylist(), schema)
    assert sum(seen_past.values()) > 0
    assert seen_past == Counter({k: n for k, n in seen_full.items() if k[2] < cut})


@pytest.mark.parametrize("keep", [0.0, -0.5, 1.5])
def test_realtime_split_keep_outside_its_range_is_refused_by_name(keep: float) -> None:
    with pytest.raises(ValueError, match=r"aggregation\.realtime_split_keep must be in \(0, 1\], got"):
        AggregationConfig(realtime_split_keep=keep)


def test_the_smallest_keep_still_moves_forward() -> None:
    """A fraction so small that it keeps less than one action keeps one: every restart sees the
    action just before it, and each new action in a busy window opens at most one sample."""
    from mtfm_rec.data.realtime_split import keep_counts, split_for_realtime

    assert keep_counts([2, 128], 1e-9) == [1, 1] and keep_counts([128], 1.0) == [128]
    counts = np.arange(10, dtype=np.int64)  # one window, one new action before each exposure
    opens = np.zeros(10, dtype=bool)
    opens[0] = True
    out, (starts,) = split_for_realtime(opens, [counts], [np.zeros(10, np.int64)], [2], 1e-9)
    assert out.tolist() == [True, False, False, True, False, True, False, True, False, True]
    assert starts.tolist() == [0, 0, 0, 2, 2, 4, 4, 6, 6, 8]
    assert all(0 < c - s <= 2 for c, s in zip(counts[1:], starts[1:]))
