"""The aggregated-sample Parquet format: what aggregation writes and the loader reads.

One row = one user x time window (paper 3.1, 3.3.1: scenario parts joined column-wise, then
merged with the shared sequences at user level). All list columns of one group share lengths.

============================  ==============  =====================================================
column                        type            meaning
============================  ==============  =====================================================
user_id                       int64
window_start, window_end      int64           the window ``[start, end)`` in dataset ticks
seq/<q>/ts                    list<int64>     sequence q's kept actions, ascending ts (ties: file,
seq/<q>/<feature>             list<int64>     then row order); ids folded (schema.fold_ids)
exp/<s>/ts                    list<int64>     scenario s's exposures of the window, ascending ts
exp/<s>/request_id            list<int64>     -1 where the raw row had none
exp/<s>/split                 list<int8>      raw ``split`` column (0 train, 1 valid, 2 test) or -1
                                              ("split by time at load")
exp/<s>/<group>/<feature>     list<int64>     group in user | item | cross; ids folded
exp/<s>/<group>/<feature>     list<list<      a multi-hot feature: per exposure its list of folded
                              int64>>         ids, in the raw list's order (a null raw list:
                                              ``[size]``, the "missing" row)
exp/<s>/dense/<column>        list<float32>   null -> 0.0
exp/<s>/label/<task>          list<int8>      0/1; -1 where the raw label was null (missing)
============================  ==============  =====================================================

Which actions are kept (``lookback`` and ``window`` in dataset ticks, from the aggregation config):

* history sequence: its last ``max_len`` actions with ``ts < window_start``;
* real-time sequence: at most ``max_len`` actions with ``ts >= window_start - lookback`` and
  before the sample's last exposure, a slice fixed when the sample opens (a busy window is split
  so that no exposure's slice depends on later actions: :mod:`mtfm_rec.data.realtime_split`);
  the model's dynamic mask lets a T token see only those with a smaller ts than its own.

A dataset directory holds ``part-NNNNN.parquet`` shards (users hash-partitioned), the
``dataset.yaml`` it was built from, ``_stats.json`` and a ``_SUCCESS`` marker written last: a
JSON object (:func:`success_record`) with ``producer`` (``mtfm_rec.data.aggregate``), the
``format_version``, the fingerprint of the inputs and of the aggregation config, and ``shards``:
the name, row count and byte size of every shard as written. :func:`check_shards` compares that
list with what is on disk; the loader and the aggregation cache refuse any difference.

The multi-hot columns did not change ``FORMAT_VERSION``: a shard has them only when its
``dataset.yaml`` declares multi-hot features, which no earlier version could read, and every
other column is as before (existing caches stay valid).
"""

from __future__ import annotations

import json
import posixpath
from typing import Any, Dict, List, Mapping, Optional, Tuple

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from mtfm_rec.data.schema import DatasetSchema

USER_ID = "user_id"
WINDOW_START = "window_start"
WINDOW_END = "window_end"
SHARD_GLOB = "part-*.parquet"
SUCCESS_FILE = "_SUCCESS"
STATS_FILE = "_stats.json"
SCHEMA_FILE = "dataset.yaml"
MISSING_LABEL = -1
SPLIT_BY_TIME = -1
SPLIT_TRAIN, SPLIT_VALID, SPLIT_TEST = 0, 1, 2
PRODUCER = "mtfm_rec.data.aggregate"  # the ``producer`` of our _SUCCESS markers
# 2: _SUCCESS lists the shards and inputs are fingerprinted by content (1: sizes and mtimes).
# 3: R slices are fixed per sample by mtfm_rec.data.realtime_split (2: the window's last max_len).
FORMAT_VERSION = 3
# Files an aggregation (or the loader's index cache) writes into a dataset directory.
OWN_FILE_GLOBS = (SHARD_GLOB, SUCCESS_FILE, STATS_FILE, SCHEMA_FILE, "loader-index-*.json")


def shard_name(partition: int) -> str:
    return f"part-{partition:05d}.parquet"


def seq_ts(sequence: str) -> str:
    return f"seq/{sequence}/ts"


def seq_feature(sequence: str, feature: str) -> str:
    return f"seq/{sequence}/{feature}"


def exp_ts(scenario: str) -> str:
    return f"exp/{scenario}/ts"


def exp_request_id(scenario: str) -> str:
    return f"exp/{scenario}/request_id"


def exp_split(scenario: str) -> str:
    return f"exp/{scenario}/split"


def exp_feature(scenario: str, group: str, feature: str) -> str:
    return f"exp/{scenario}/{group}/{feature}"


def exp_dense(scenario: str, column: str) -> str:
    return f"exp/{scenario}/dense/{column}"


def exp_label(scenario: str, task: str) -> str:
    return f"exp/{scenario}/label/{task}"


def arrow_schema(schema: DatasetSchema) -> pa.Schema:
    """The exact Arrow schema of an aggregated shard for ``schema``."""
    fields: List[pa.Field] = [
        pa.field(USER_ID, pa.int64(), nullable=False),
        pa.field(WINDOW_START, pa.int64(), nullable=False),
        pa.field(WINDOW_END, pa.int64(), nullable=False),
    ]
    ints = pa.list_(pa.int64())
    for q in schema.sequences:
        fields.append(pa.field(seq_ts(q.name), ints))
        fields += [pa.field(seq_feature(q.name, f), ints) for f in q.features]
    for s in schema.scenarios:
        fields.append(pa.field(exp_ts(s.name), ints))
        fields.append(pa.field(exp_request_id(s.name), ints))
        fields.append(pa.field(exp_split(s.name), pa.list_(pa.int8())))
        fields += [pa.field(exp_feature(s.name, g, c), ints) for g, c, _ in s.categorical()]
        fields += [pa.field(exp_feature(s.name, g, c), pa.list_(ints)) for g, c, _, _ in s.multi_hot()]
        fields += [pa.field(exp_dense(s.name, c), pa.list_(pa.float32())) for c in s.dense_features]
        fields += [pa.field(exp_label(s.name, t), pa.list_(pa.int8())) for t in s.tasks]
    return pa.schema(fields)


# -------------------------------------------------------------------- the _SUCCESS marker
def success_record(shards: List[Dict[str, Any]], **fields: Any) -> Dict[str, Any]:
    """The ``_SUCCESS`` JSON: producer, format version, ``fields`` (fingerprint...) and shards.

    Args:
        shards: one :func:`shard_entry` per shard, in name order.
        **fields: the rest of the record (aggregation: ``fingerprint``, ``inputs``, ``config``).
    """
    return {"producer": PRODUCER, "format_version": FORMAT_VERSION, **fields, "shards": shards}


def shard_entry(name: str, rows: int, nbytes: int) -> Dict[str, Any]:
    """One shard of the ``_SUCCESS`` shard list."""
    return {"name": name, "rows": int(rows), "bytes": int(nbytes)}


def read_marker(fs: fsspec.AbstractFileSystem, root: str) -> Optional[Dict[str, Any]]:
    """The parsed ``_SUCCESS`` of ``root``: None when absent, ``{}`` when not a JSON object."""
    path = posixpath.join(root.rstrip("/"), SUCCESS_FILE)
    if not fs.exists(path):
        return None
    try:
        with fs.open(path, "r") as fh:
            record = json.load(fh)
    except (OSError, ValueError):  # e.g. the empty _SUCCESS of Spark or Hadoop
        return {}
    return record if isinstance(record, dict) else {}


def is_own_marker(record: Optional[Mapping[str, Any]]) -> bool:
    """Whether a ``_SUCCESS`` record was written by this framework (now or format version 1)."""
    if not record:
        return False
    if record.get("producer") == PRODUCER:
        return True
    # format_version 1 had no producer key; its records held exactly these keys.
    return record.get("format_version") == 1 and {"fingerprint", "inputs", "config"} <= set(record)


def check_shards(
    fs: fsspec.AbstractFileSystem, root: str, record: Optional[Mapping[str, Any]]
) -> Tuple[Dict[str, pq.FileMetaData], List[str]]:
    """Reads every shard's footer and compares the shards with the marker's shard list.

    Args:
        fs: the filesystem of ``root``.
        root: dataset directory (a filesystem path, no protocol).
        record: the ``_SUCCESS`` record; its ``shards`` list (when present) is the truth.

    Returns:
        (footer of every readable shard by path in name order, problems): each problem names
        the shard and what differs (missing, not listed, bytes, rows, unreadable).
    """
    root = root.rstrip("/")
    paths = sorted(fs.glob(posixpath.join(root, SHARD_GLOB)))
    listed = {e["name"]: e for e in (record or {}).get("shards", [])}
    problems = [
        f"{posixpath.join(root, name)}: listed in {SUCCESS_FILE} but missing"
        for name in sorted(set(listed) - {posixpath.basename(p) for p in paths})
    ]
    metas: Dict[str, pq.FileMetaData] = {}
    for path in paths:
        want = listed.get(posixpath.basename(path))
        if record and "shards" in record and want is None:
            problems.append(f"{path}: on disk but not listed in {SUCCESS_FILE}")
        size = int(fs.info(path).get("size", -1))
        if want is not None and size != want["bytes"]:
            problems.append(f"{path}: {size} bytes, {SUCCESS_FILE} says {want['bytes']}")
        try:
            with fs.open(path, "rb") as fh:
                meta = pq.ParquetFile(fh).metadata
        except (pa.ArrowException, OSError, ValueError) as exc:
            problems.append(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})")
            continue
        if want is not None and meta.num_rows != want["rows"]:
            problems.append(f"{path}: {meta.num_rows} rows, {SUCCESS_FILE} says {want['rows']}")
        metas[path] = meta
    return metas, problems
