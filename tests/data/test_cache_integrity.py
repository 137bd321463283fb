"""Nothing lost, nothing stale: where aggregation may write, content fingerprints, shard checks.

* ``aggregate`` builds in a temporary sibling and renames it into place; it replaces only an
  earlier output of its own and never touches the raw dataset.
* The input fingerprint follows the content (not the modification time).
* The loader and ``ensure_aggregated`` check the shards against the ``_SUCCESS`` shard list.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, Callable, Dict, List, Tuple

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from raw_mutations import overstate_row_count

from mtfm_rec.data import aggregate as agg
from mtfm_rec.data import sample_format as fmt
from mtfm_rec.data.config import AggregationConfig
from mtfm_rec.data.errors import AggregationError, LoaderError
from mtfm_rec.data.reader import DataContractError, RawDataset
from mtfm_rec.data.sharded_dataset import ShardedBatchDataset


def config(**kw: Any) -> AggregationConfig:
    base = dict(num_partitions=3, num_workers=1, progress=False, realtime_lookback_seconds=3600)
    base.update(kw)
    return AggregationConfig(**base)


def snapshot(root: str) -> Dict[str, bytes]:
    """Every file under a local ``root`` (relative path -> bytes)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            path = os.path.join(d, f)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


@pytest.fixture
def small_raw(
    raw_writer: Callable[..., str],
    demo_tables: Callable[..., Any],
    demo_schema: Dict[str, Any],
    tmp_path: Any,
) -> Tuple[str, Dict[str, Any]]:
    tables = demo_tables(seed=5, n_users=4, n_exposures=40, n_actions=40)
    root = raw_writer(str(tmp_path / "raw"), demo_schema, tables["exposures"], tables["behaviors"])
    return root, tables


# -------------------------------------------------------------------- where --out may be
@pytest.mark.parametrize("where", ["exposures/food", "", ".."])
def test_out_overlapping_raw_is_refused_and_raw_untouched(
    small_raw: Tuple[str, Dict[str, Any]], where: str
) -> None:
    root, _ = small_raw
    before = snapshot(root)
    out = os.path.join(root, where) if where else root
    how = {"exposures/food": "inside", "": "the same directory as", "..": "a parent of"}[where]
    with pytest.raises(AggregationError, match=f"{out}.* is {how} the raw dataset {root}"):
        agg.aggregate(root, out, config())
    assert snapshot(root) == before  # raw part-*.parquet and dataset.yaml intact


def test_out_overlap_is_found_through_symlinks_and_dots(
    small_raw: Tuple[str, Dict[str, Any]], tmp_path: Any
) -> None:
    root, _ = small_raw
    os.symlink(root, tmp_path / "link")
    before = snapshot(root)
    for out in (str(tmp_path / "link" / "exposures" / "hp"), f"{tmp_path}/other/../raw/behaviors"):
        with pytest.raises(AggregationError, match="inside the raw dataset"):
            agg.aggregate(root, out, config())
    assert snapshot(root) == before


@pytest.mark.parametrize("marker", [None, b"", b"test\n"])
def test_foreign_non_empty_out_is_refused_and_kept(
    small_raw: Tuple[str, Dict[str, Any]], tmp_path: Any, marker: Any
) -> None:
    root, _ = small_raw
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "part-00000.parquet").write_bytes(b"somebody else's shard")
    if marker is not None:  # an empty _SUCCESS, as Spark writes it, is not ours
        (out / fmt.SUCCESS_FILE).write_bytes(marker)
    before = snapshot(str(out))
    with pytest.raises(AggregationError, match=f"{out} \\(--out\\): not empty .*no _SUCCESS of mtfm_rec"):
        agg.aggregate(root, str(out), config())
    assert snapshot(str(out)) == before
    assert sorted(os.listdir(tmp_path)) == ["raw", "theirs"]  # no staging left behind


def test_own_output_is_replaced_but_not_with_foreign_files_in_it(
    small_raw: Tuple[str, Dict[str, Any]], tmp_path: Any
) -> None:
    root, _ = small_raw
    out = str(tmp_path / "out")
    agg.aggregate(root, out, config(num_partitions=3))
    agg.aggregate(root, out, config(num_partitions=2))  # replaces: no shard of the first run left
    assert sorted(os.listdir(out)) == sorted(
        [fmt.shard_name(0), fmt.shard_name(1), fmt.SCHEMA_FILE, fmt.STATS_FILE, fmt.SUCCESS_FILE]
    )
    assert agg.read_success(out)["config"]["num_partitions"] == 2
    assert sorted(os.listdir(tmp_path)) == ["out", "raw"]
    with open(os.path.join(out, "notes.md"), "w") as fh:
        fh.write("mine")
    before = snapshot(out)
    with pytest.raises(AggregationError, match=r"also holds \['notes.md'\]"):
        agg.aggregate(root, out, config())
    assert snapshot(out) == before


def test_failed_run_leaves_the_previous_output_intact(
    raw_writer: Callable[..., str],
    demo_schema: Dict[str, Any],
    small_raw: Tuple[str, Dict[str, Any]],
    tmp_path: Any,
) -> None:
    root, tables = small_raw
    out = str(tmp_path / "out")
    agg.aggregate(root, out, config())
    before = snapshot(out)
    bad = tables["exposures"]["food"][0]
    bad = bad.set_column(bad.schema.get_field_index("click"), "click", pa.array([7] * bad.num_rows))
    raw_writer(root, demo_schema, {"food": [bad]})
    with pytest.raises(DataContractError, match="label outside"):  # fails in the read pass
        agg.aggregate(root, out, config())
    assert snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["out", "raw"]


def test_memory_url_replace_and_overlap(
    raw_writer: Callable[..., str],
    demo_tables: Callable[..., Any],
    demo_schema: Dict[str, Any],
    memory_root: str,
) -> None:
    tables = demo_tables(seed=6, n_users=3, n_exposures=30, n_actions=30)
    root = raw_writer(f"{memory_root}/raw", demo_schema, tables["exposures"], tables["behaviors"])
    fs = fsspec.filesystem("memory")
    base = memory_root[len("memory://") :]
    out = f"{memory_root}/out"
    agg.aggregate(root, out, config(num_partitions=3))
    stats = agg.aggregate(root, out, config(num_partitions=2))
    names = sorted(os.path.basename(p) for p in fs.ls(f"{base}/out", detail=False))
    own = [fmt.shard_name(0), fmt.shard_name(1), fmt.SCHEMA_FILE, fmt.STATS_FILE, fmt.SUCCESS_FILE]
    assert names == sorted(own)
    assert sorted(os.path.basename(p) for p in fs.ls(base, detail=False)) == ["out", "raw"]
    assert ShardedBatchDataset(out, batch_size=1, split="all").num_samples == stats.samples_out
    with pytest.raises(AggregationError, match="inside the raw dataset"):
        agg.aggregate(root, f"{root}/exposures/hp", config())
    assert len(fs.ls(f"{base}/raw/exposures/hp", detail=False)) == 2  # raw files still there


# -------------------------------------------------------------------- content fingerprints
def _same_size_edit(path: str) -> None:
    """Rewrites a raw Parquet file with its click labels reversed: same size, same footer
    statistics, other bytes; the modification time is put back (as cp -p, rsync -t, tar do)."""
    st = os.stat(path)
    table = pq.read_table(path)
    i = table.schema.get_field_index("click")
    edited = table.set_column(i, "click", pa.array(table.column("click").to_pylist()[::-1], pa.int64()))
    buf = io.BytesIO()
    pq.write_table(edited, buf)
    assert len(buf.getvalue()) == st.st_size and buf.getvalue() != open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(buf.getvalue())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_same_size_edit_with_mtime_kept_rebuilds_the_cache(
    small_raw: Tuple[str, Dict[str, Any]], tmp_path: Any
) -> None:
    root, _ = small_raw
    cache = str(tmp_path / "cache")
    first = agg.ensure_aggregated(root, cache, config())
    path = os.path.join(root, "exposures", "food", "part-0.parquet")
    _same_size_edit(path)
    second = agg.ensure_aggregated(root, cache, config())
    assert second != first
    fresh = str(tmp_path / "fresh")
    agg.aggregate(root, fresh, config())

    def shards(d: str) -> Dict[str, bytes]:
        return {n: b for n, b in snapshot(d).items() if n.startswith("part-")}

    assert shards(second) == shards(fresh)  # the cache holds the edited data
    assert shards(first) != shards(fresh)  # and the edit mattered


def test_fingerprint_follows_content_not_mtime(small_raw: Tuple[str, Dict[str, Any]]) -> None:
    root, _ = small_raw
    ds = RawDataset(root)
    before = agg.fingerprint(ds, config())
    for e in before["inputs"]:
        assert e[2].startswith("sha256:")  # small files: the whole bytes
    path = os.path.join(root, "behaviors", "orders", "part-1.parquet")
    os.utime(path, (1, 1))  # touch to another time, same bytes: same cache
    assert agg.fingerprint(RawDataset(root), config()) == before


def test_large_files_are_fingerprinted_by_footer_and_size(
    raw_writer: Callable[..., str], demo_schema: Dict[str, Any], small_raw: Tuple[str, Dict[str, Any]]
) -> None:
    root, tables = small_raw
    entries = dict((e[0], e) for e in RawDataset(root).fingerprint_entries(full_hash_bytes=0))
    assert entries["dataset.yaml"][2].startswith("sha256:")  # always the whole file
    rel = "exposures/food/part-0.parquet"
    assert entries[rel][2].startswith("footer-sha256:")
    assert entries[rel][1] == os.path.getsize(os.path.join(root, rel))
    # an edit that changes a statistic changes the footer
    t = tables["exposures"]["food"][0]
    t = t.set_column(t.schema.get_field_index("ts"), "ts", pa.compute.add(t.column("ts"), 600))
    raw_writer(root, demo_schema, {"food": [t, tables["exposures"]["food"][1]]})
    again = dict((e[0], e) for e in RawDataset(root).fingerprint_entries(full_hash_bytes=0))
    assert again[rel] != entries[rel]
    assert again["exposures/food/part-1.parquet"] == entries["exposures/food/part-1.parquet"]


def test_a_large_file_without_footer_is_named(small_raw: Tuple[str, Dict[str, Any]]) -> None:
    root, _ = small_raw
    path = os.path.join(root, "exposures", "hp", "part-1.parquet")
    data = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(DataContractError, match="hp/part-1.parquet: not a readable Parquet file"):
        RawDataset(root).fingerprint_entries(full_hash_bytes=0)


# -------------------------------------------------------------------- shard list checks
@pytest.fixture
def built(small_raw: Tuple[str, Dict[str, Any]], tmp_path: Any) -> Tuple[str, str]:
    root, _ = small_raw
    out = str(tmp_path / "out")
    agg.aggregate(root, out, config())
    return root, out


def _damage(out: str, how: str) -> str:
    """Damages shard 1 of ``out``; returns a regex of the error part after the shard path."""
    path = os.path.join(out, fmt.shard_name(1))
    data = open(path, "rb").read()
    if how == "deleted":
        os.remove(path)
        return "listed in _SUCCESS but missing"
    if how == "truncated":
        with open(path, "wb") as fh:
            fh.write(data[: len(data) // 2])
        return "not a readable Parquet file"
    if how == "replaced":  # another valid shard, fewer rows
        pq.write_table(pq.read_table(path).slice(1), path)
        return r"\d+ rows, _SUCCESS says \d+"
    assert how == "extra"
    with open(os.path.join(out, fmt.shard_name(7)), "wb") as fh:
        fh.write(data)
    return "on disk but not listed in _SUCCESS"


@pytest.mark.parametrize("how", ["deleted", "truncated", "replaced", "extra"])
def test_loader_refuses_shards_that_differ_from_the_marker(built: Tuple[str, str], how: str) -> None:
    _, out = built
    want = _damage(out, how)
    shard = fmt.shard_name(7 if how == "extra" else 1)
    with pytest.raises(LoaderError, match=f"{shard}: {want}"):
        ShardedBatchDataset(out, batch_size=2, split="all")


@pytest.mark.parametrize("how", ["deleted", "truncated", "replaced", "extra"])
def test_ensure_aggregated_rebuilds_a_damaged_cache(
    small_raw: Tuple[str, Dict[str, Any]], tmp_path: Any, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    root, _ = small_raw
    calls: List[str] = []
    real = agg.aggregate
    monkeypatch.setattr(agg, "aggregate", lambda r, o, c: calls.append(o) or real(r, o, c))
    cache = str(tmp_path / "cache")
    out = agg.ensure_aggregated(root, cache, config())
    n = ShardedBatchDataset(out, batch_size=1, split="all").num_samples
    _damage(out, how)
    assert agg.ensure_aggregated(root, cache, config()) == out
    assert len(calls) == 2  # rebuilt, in the same place
    assert ShardedBatchDataset(out, batch_size=1, split="all").num_samples == n
    assert agg.ensure_aggregated(root, cache, config()) == out and len(calls) == 2


def test_loader_refuses_a_foreign_or_old_marker(built: Tuple[str, str]) -> None:
    _, out = built
    marker = os.path.join(out, fmt.SUCCESS_FILE)
    record = json.load(open(marker))
    with open(marker, "w") as fh:
        fh.write("")
    with pytest.raises(LoaderError, match="_SUCCESS is not an mtfm_rec marker"):
        ShardedBatchDataset(out, batch_size=2, split="all")
    assert ShardedBatchDataset(out, batch_size=2, split="all", require_success=False).num_samples > 0
    old = {k: record[k] for k in ("fingerprint", "inputs", "config")}
    with open(marker, "w") as fh:
        json.dump({**old, "format_version": 1}, fh)
    with pytest.raises(LoaderError, match=r"has no shard list \(format_version 1\); re-run"):
        ShardedBatchDataset(out, batch_size=2, split="all")


def test_unreadable_row_group_names_the_shard(built: Tuple[str, str]) -> None:
    _, out = built
    path = os.path.join(out, fmt.shard_name(0))
    meta = pq.read_metadata(path)
    names = meta.schema.to_arrow_schema().names
    col = meta.row_group(0).column(names.index(fmt.exp_ts("hp")))  # read by the pre-scan too
    data = bytearray(open(path, "rb").read())
    lo = col.data_page_offset
    for i in range(lo, lo + col.total_compressed_size):  # same size, same footer
        data[i] ^= 0xFF
    with open(path, "wb") as fh:
        fh.write(bytes(data))
    want = f"{fmt.shard_name(0)} row group 0: unreadable"
    with pytest.raises(LoaderError, match=want):  # the pre-scan of a split
        ShardedBatchDataset(out, batch_size=1, split="train")
    ds = ShardedBatchDataset(out, batch_size=1, split="all", shuffle=False)  # footers are fine
    with pytest.raises(LoaderError, match=want):
        list(ds)


@pytest.mark.parametrize("split", ["train", "all"])
def test_a_row_group_that_reads_short_is_refused(built: Tuple[str, str], split: str) -> None:
    """A row group whose pages give fewer rows than its footer declares (Arrow reads it without an
    error, and a size or marker check cannot see it): refused by the pre-scan of a split and by
    the reader, never read as fewer samples."""
    _, out = built
    path = os.path.join(out, fmt.shard_name(0))
    with open(path, "rb") as fh:
        damaged = overstate_row_count(fh.read(), row_group=0)
    with open(path, "wb") as fh:
        fh.write(damaged)
    declared = pq.read_metadata(path).row_group(0).num_rows
    want = f"{fmt.shard_name(0)} row group 0: read {declared - 1} rows of the {declared} its footer declares"
    with pytest.raises(LoaderError, match=want):
        list(ShardedBatchDataset(out, batch_size=1, split=split, shuffle=False))
