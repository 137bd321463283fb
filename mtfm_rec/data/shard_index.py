"""The index of an aggregated dataset directory: its units and their sample counts per split.

**Units** are the row groups of the ``part-*.parquet`` shards, in shard-name order: the unit of
reading and of assignment to ranks and workers (:mod:`mtfm_rec.data.sharded_dataset`). Before
listing them the directory is checked against its ``_SUCCESS`` marker
(:func:`mtfm_rec.data.sample_format.check_shards`). A unit's sample count for ``split="all"``
comes from the Parquet metadata; for the other splits from a pre-scan of the ``exp/<s>/ts`` and
``exp/<s>/split`` columns only, cached on disk (any fsspec URL) as ``loader-index-<key>.json``
under a key that covers the shards, the marker, the split rule and the schema. Every rank
computes the same counts, so all ranks agree on every size without communicating.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtfm_rec.data import sample_format as fmt
from mtfm_rec.data.errors import LoaderError
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.data.splits import split_masks


@dataclass(frozen=True)
class Unit:
    """One row group of one shard: the unit of reading and of assignment."""

    path: str  # shard path inside the filesystem (no protocol)
    row_group: int
    num_rows: int  # rows in the row group
    count: int  # rows of the selected split


def _split_columns(schema: DatasetSchema) -> List[str]:
    cols: List[str] = []
    for s in schema.scenarios:
        cols += [fmt.exp_ts(s.name), fmt.exp_split(s.name)]
    return cols


def _list_units(
    fs: fsspec.AbstractFileSystem, root: str, schema: DatasetSchema, require_success: bool
) -> Tuple[List[Tuple[str, int, int]], str]:
    """(path, row_group, num_rows) of every row group, and a fingerprint of the dataset.

    With a ``_SUCCESS`` of mtfm_rec, the shards on disk must be exactly those it lists, with
    its byte sizes and row counts (:func:`sample_format.check_shards`).
    """
    record = fmt.read_marker(fs, root)
    own = fmt.is_own_marker(record)
    if require_success:
        if record is None:
            raise LoaderError(
                f"{root}: no {fmt.SUCCESS_FILE} marker; aggregation did not finish (or pass "
                "require_success=False)"
            )
        if not own or "shards" not in record:
            what = "has no shard list (format_version 1)" if own else "is not an mtfm_rec marker"
            raise LoaderError(
                f"{root}/{fmt.SUCCESS_FILE} {what}; re-run the aggregation (or pass "
                "require_success=False to read the shards unchecked)"
            )
    metas, problems = fmt.check_shards(fs, root, record if own else None)
    if problems:
        raise LoaderError(
            f"{root}: the shards do not match what the aggregation wrote: "
            + "; ".join(problems[:5])
            + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            + "; re-run the aggregation"
        )
    if not metas:
        raise LoaderError(f"{root}: no {fmt.SHARD_GLOB} shards")
    expected = fmt.arrow_schema(schema)
    units: List[Tuple[str, int, int]] = []
    digest = hashlib.sha256()
    for path, meta in metas.items():
        names = set(meta.schema.to_arrow_schema().names)
        missing = [f.name for f in expected if f.name not in names]
        if missing:
            raise LoaderError(f"{path}: missing columns {missing[:5]} of the aggregated format")
        digest.update(f"{path}:{meta.num_rows}:{meta.num_row_groups};".encode())
        for i in range(meta.num_row_groups):
            units.append((path, i, meta.row_group(i).num_rows))
    if record is not None:
        with fs.open(f"{root}/{fmt.SUCCESS_FILE}", "rb") as fh:
            digest.update(fh.read())
    return units, digest.hexdigest()


def unreadable_shard(path: str, row_group: int, exc: Exception) -> LoaderError:
    """The error for a shard that fails to open or read (pyarrow's own names no file)."""
    return LoaderError(
        f"{path} row group {row_group}: unreadable ({type(exc).__name__}: {exc}); re-run the aggregation"
    )


def read_unit(
    pf: pq.ParquetFile, path: str, row_group: int, declared: int, columns: Sequence[str]
) -> pa.Table:
    """One row group's ``columns``. A damaged row group can read short without an error from
    Arrow (as raw files can, ``RawDataset._batches``), which would drop its samples from the
    index and the batches alike: the rows read must be the ``declared`` count of its footer."""
    try:
        table = pf.read_row_group(row_group, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise unreadable_shard(path, row_group, exc) from exc
    if table.num_rows != declared:
        raise LoaderError(
            f"{path} row group {row_group}: read {table.num_rows} rows of the {declared} its footer "
            "declares; the shard is damaged, re-run the aggregation"
        )
    return table


def _prescan(
    fs: fsspec.AbstractFileSystem,
    units: Sequence[Tuple[str, int, int]],
    schema: DatasetSchema,
    split: str,
    eval_after: Optional[int],
    valid_after: Optional[int],
    scenarios: Sequence[str],
) -> List[int]:
    """Rows of ``split`` per unit, reading only the exposure ts and split columns."""
    counts: List[int] = []
    columns = _split_columns(schema)
    open_path, pf, fh = None, None, None
    try:
        for path, rg, num_rows in units:
            try:
                if path != open_path:
                    if fh is not None:
                        fh.close()
                    fh = fs.open(path, "rb")
                    pf, open_path = pq.ParquetFile(fh), path
            except (pa.ArrowException, OSError) as exc:
                raise unreadable_shard(path, rg, exc) from exc
            assert pf is not None  # opened above, for this path or an earlier unit's
            table = read_unit(pf, path, rg, num_rows, columns)
            row_keep, _ = split_masks(table, schema, split, eval_after, valid_after, scenarios)
            counts.append(int(row_keep.sum()))
    finally:
        if fh is not None:
            fh.close()
    return counts


def _cached_counts(
    cache_dir: Optional[str],
    key: str,
    compute: Callable[[], List[int]],
) -> List[int]:
    """Per-unit counts from ``cache_dir`` (any fsspec URL) or ``compute()``, then cached."""
    if cache_dir is None:
        return compute()
    fs, root = fsspec.core.url_to_fs(cache_dir)
    path = f"{root.rstrip('/')}/loader-index-{key[:32]}.json"
    if fs.exists(path):
        with fs.open(path, "r") as fh:
            cached = json.load(fh)
        if cached.get("key") == key:
            return [int(c) for c in cached["counts"]]
    counts = compute()
    fs.makedirs(root, exist_ok=True)
    tmp = f"{path}.tmp-{np.random.default_rng().integers(1 << 62)}"
    with fs.open(tmp, "w") as fh:
        json.dump({"key": key, "counts": counts}, fh)
    fs.mv(tmp, path)  # atomic on local filesystems: concurrent ranks write the same content
    return counts


def build_index(
    fs: fsspec.AbstractFileSystem,
    root: str,
    schema: DatasetSchema,
    split: str,
    eval_after: Optional[int],
    valid_after: Optional[int],
    require_success: bool,
    cache_dir: Optional[str],
    scenarios: Sequence[str] = (),
) -> List[Unit]:
    """The units of the dataset directory ``root`` with their sample counts of ``split``.

    Args:
        fs: the filesystem of ``root``.
        root: the dataset directory inside ``fs`` (no protocol, no trailing ``/``).
        schema: the dataset schema.
        split: ``train``, ``valid``, ``test`` or ``all``.
        eval_after: first test tick, or None.
        valid_after: first validation tick, or None.
        require_success: refuse a directory without an mtfm_rec ``_SUCCESS`` listing its shards.
        cache_dir: where to cache the per-split pre-scan (path or fsspec URL), or None.
        scenarios: keep only these scenarios' exposures (all when empty).

    Raises:
        LoaderError: the directory does not match its marker, lacks columns, or is unreadable.
    """
    raw_units, fingerprint = _list_units(fs, root, schema, require_success)
    if split == "all" and not scenarios:
        counts = [n for _, _, n in raw_units]
    else:
        key = hashlib.sha256(
            json.dumps(
                [fingerprint, split, eval_after, valid_after, sorted(scenarios), schema.to_dict()]
            ).encode()
        ).hexdigest()
        counts = _cached_counts(
            cache_dir,
            key,
            lambda: _prescan(fs, raw_units, schema, split, eval_after, valid_after, scenarios),
        )
    return [Unit(p, rg, n, c) for (p, rg, n), c in zip(raw_units, counts)]
