"""The Apache Spark engine of the user-level aggregation: the same samples as the local engine.

:func:`aggregate_spark` turns a raw-contract dataset into exactly the output of
:func:`mtfm_rec.data.aggregate.aggregate` (same shards, byte for byte, same ``dataset.yaml``,
``_stats.json`` but its timings, and ``_SUCCESS``), with Spark's own DataFrame operations for the
heavy part, so that a dataset too large for one machine can be aggregated on a cluster:

1. **Check** (driver, pyarrow metadata only): every input file's columns and types, with the local
   reader's own checks (:class:`mtfm_rec.data.reader.RawDataset`), so a missing column or a wrong
   type names the file, the column and the rule exactly as the local engine does.
2. **Validate** (one Spark job, counts only): every row rule of the reader as a Spark expression;
   per row, the first rule it breaks (the reader's order), counted per (file, rule). A bad row
   stops the run with the local reader's own error (the first bad file is read again by it), or
   is dropped and counted under ``skip_bad_rows``.
3. **Build** (one Spark job): ids folded with ``pmod`` (null -> size), exposures repartitioned by
   ``user_id``; per real-time sequence a running count gives each exposure its earlier actions;
   an ``aggregate`` fold over each user-window's exposures in (ts, scenario, file, row) order
   assigns them to samples (:mod:`mtfm_rec.data.realtime_split`'s rule, with
   ``max_exposures_per_sample``); one ``groupBy`` per sample collects each scenario's exposures as
   ``sort_array`` of (ts, file, row, ...) structs; each sequence is collected per user as one sorted
   array and joined to the samples on the same partitioning, H sliced from it by counting the
   actions before the window start, R by the fold's bounds; each sample goes to shard
   ``splitmix64(user_id) mod num_partitions`` (the local engine's hash, in decimal arithmetic:
   no int64 overflow, ANSI mode or not). Spark writes ``shard=<k>/`` folders into a hidden
   sibling of the output.
4. **Finish** (driver, one shard at a time): each shard is rewritten with pyarrow to the exact
   :func:`mtfm_rec.data.sample_format.arrow_schema` and row groups, its statistics taken, and the
   output published atomically with the local engine's own functions.

Ties in ``ts`` are broken by file then row order as everywhere: the file is its index in the local
reader's sorted order, the row Spark's ``_metadata.row_index``. No Python UDF runs on the rows;
the executors need no Python at all.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import posixpath
import re
import shutil
import tempfile
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Dict, Iterator, List, Mapping, NoReturn, Optional, Sequence, Tuple, Union

import fsspec
import fsspec.implementations.local
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from py4j.protocol import Py4JJavaError
from pyspark.errors import PySparkException
from pyspark.sql import Column, DataFrame, Row, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from mtfm_rec.data import aggregate as agg
from mtfm_rec.data import reader as rd
from mtfm_rec.data import sample_format as fmt
from mtfm_rec.data.aggregate_output import check_replaceable, output_location, publish
from mtfm_rec.data.aggregate_partitions import _check_window_sizes
from mtfm_rec.data.config import AggregationConfig
from mtfm_rec.data.errors import AggregationError
from mtfm_rec.data.realtime_split import keep_counts
from mtfm_rec.data.schema import DatasetSchema, ScenarioSpec, SequenceSpec

DEFAULT_MASTER = "local[*]"
# A raw column type Spark's Parquet reader cannot read (float16): the run stops naming it.
RULE_NOT_FOR_SPARK = "wrong type: Spark cannot read this column type (aggregate it with the local engine)"
# fsspec protocol -> the Hadoop scheme Spark reads it with.
_HADOOP_SCHEMES = {"s3": "s3a", "gcs": "gs"}
_SHARD = "shard"  # the partition column of Spark's temporary output
_CHUNK = "_chunk"  # the sample's index inside its user-window (realtime_split), for the row order
_MAX_INT32 = 2**31 - 1
_DEC = T.DecimalType(38, 0)
_U32, _U63, _U64 = 2**32, 2**63, 2**64
_SPLITMIX_ADD, _SPLITMIX_MUL1, _SPLITMIX_MUL2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_SPARK_INTS: Dict[pa.DataType, T.DataType] = {
    pa.int8(): T.ByteType(),
    pa.int16(): T.ShortType(),
    pa.int32(): T.IntegerType(),
    pa.int64(): T.LongType(),
    pa.uint8(): T.ShortType(),
    pa.uint16(): T.IntegerType(),
    pa.uint32(): T.LongType(),
    pa.uint64(): T.DecimalType(20, 0),  # may not fit int64: checked like the reader does
    pa.null(): T.IntegerType(),  # an all-null column written without a type
    pa.float32(): T.FloatType(),
    pa.float64(): T.DoubleType(),
}
Spec = Union[ScenarioSpec, SequenceSpec]


# -------------------------------------------------------------------- the input files
@dataclass
class _Source:
    """One raw folder (a scenario's exposures or a sequence's actions) as Spark reads it.

    Attributes:
        kind: ``rd.EXPOSURES`` or ``rd.BEHAVIORS``.
        spec: its scenario or sequence.
        files: its files (filesystem paths), in the local reader's order.
        types: per file, the arrow type of every column read (the reader's choice of columns).
        rows: per file, the row count its footer declares, which Spark's count must equal.
    """

    kind: str
    spec: Spec
    files: List[str]
    types: List[Dict[str, pa.DataType]] = field(default_factory=list)
    rows: List[int] = field(default_factory=list)

    @property
    def is_exposures(self) -> bool:
        return self.kind == rd.EXPOSURES


def _requirements(source: _Source) -> Tuple[Dict[str, str], Dict[str, str]]:
    """(required, optional) columns -> the reader's type check, as ``RawDataset`` iterates them."""
    required = {rd.USER_ID: "int", rd.TS: "int"}
    spec = source.spec
    if isinstance(spec, SequenceSpec):
        required.update({f: "int" for f in spec.features})
        return required, {}
    required.update({c: "int" for _, c, _ in spec.categorical()})
    required.update({c: "list" for _, c, _, _ in spec.multi_hot()})
    required.update({c: "num" for c in spec.dense_features})
    required.update({t: "int" for t in spec.tasks})
    return required, {rd.REQUEST_ID: "int", rd.SPLIT: "int"}


def _scan(ds: rd.RawDataset) -> Tuple[List[_Source], Optional[Tuple[int, int, rd.DataContractError]]]:
    """Checks every file's columns and types from its footer, in the local engine's order.

    Returns:
        (the sources with the types of the files before the first structural problem, and that
        problem as (source, file, error), or None).
    """
    sources = [_Source(rd.EXPOSURES, s, ds.files(rd.EXPOSURES, s.name)) for s in ds.schema.scenarios]
    sources += [_Source(rd.BEHAVIORS, q, ds.files(rd.BEHAVIORS, q.name)) for q in ds.schema.sequences]
    for i, source in enumerate(sources):
        required, optional = _requirements(source)
        for j, path in enumerate(source.files):
            try:
                pf = ds._open(path)  # the reader's own checks: the same errors, word for word
                try:
                    columns = ds._check_columns(path, pf.schema_arrow, required, optional)
                    types = {c: pf.schema_arrow.field(c).type for c in columns}
                    rows = pf.metadata.num_rows
                finally:
                    pf.close()
                for column, t in types.items():
                    _spark_type(ds, path, column, t)
            except rd.DataContractError as exc:
                return sources, (i, j, exc)
            source.types.append(types)
            source.rows.append(rows)
    return sources, None


def _spark_type(ds: rd.RawDataset, path: str, column: str, t: pa.DataType) -> T.DataType:
    """The Spark type a raw column is read as (the reader accepted its arrow type)."""
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return T.ArrayType(_spark_type(ds, path, column, t.value_type))
    spark_type = _SPARK_INTS.get(t)
    if spark_type is None:
        raise rd.DataContractError(ds._display(path), column, RULE_NOT_FOR_SPARK, f"got {t}")
    return spark_type


def _spark_uri(fs: fsspec.AbstractFileSystem, path: str, glob_escape: bool = False) -> str:
    """A filesystem path as the URI Spark (Hadoop) reads or writes it."""
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        uri = "file://" + os.path.abspath(path)
    else:
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        if protocol == "memory":
            raise AggregationError(
                f"memory://{path}: Spark cannot read or write an in-process memory:// filesystem; "
                "use the local engine, or a path or URL every Spark executor reaches"
            )
        uri = f"{_HADOOP_SCHEMES.get(protocol, protocol)}://{path.lstrip('/')}"
    # Hadoop expands glob characters in input paths; a file named "a[1].parquet" is read as is.
    return re.sub(r"([\\\[\]{}*?])", r"\\\1", uri) if glob_escape else uri


# -------------------------------------------------------------------- row rules as expressions
@dataclass
class _Int:
    """An integer raw column as Spark reads it: int64 value (null where null or not fitting),
    null mask, and "does not fit int64" (uint64 columns only)."""

    value: Column
    null: Column
    wraps: Optional[Column]


def _int(types: Mapping[str, pa.DataType], column: str) -> _Int:
    c = F.col(column)
    if types[column] == pa.uint64():
        wraps = c > F.lit(rd.INT64_MAX)
        return _Int(F.when(~wraps, c).cast("long"), c.isNull(), wraps)
    return _Int(c.cast("long"), c.isNull(), None)


def _fold(value: Column, size: int) -> Column:
    """``schema.fold_ids``: v mod size (floor modulo), null -> size."""
    return F.coalesce(F.pmod(value, F.lit(size)), F.lit(size))


def _fold_list(types: Mapping[str, pa.DataType], column: str, size: int) -> Tuple[Column, Optional[Column]]:
    """(folded ``array<long>``, "an id does not fit int64") of a multi-hot column; a null list
    is ``[size]``, an empty one stays empty (the reader's ``_id_lists``)."""
    c = F.col(column)
    wraps = None
    if types[column].value_type == pa.uint64():
        wraps = F.exists(c, lambda x: x > F.lit(rd.INT64_MAX))
        ids = F.transform(c, lambda x: _fold(F.when(x <= F.lit(rd.INT64_MAX), x).cast("long"), size))
    else:
        ids = F.transform(c, lambda x: _fold(x.cast("long"), size))
    return F.when(c.isNull(), F.array(F.lit(size).cast("long"))).otherwise(ids), wraps


class _Rows:
    """Builds, for one group of files of a source, its normalised columns and the index of the
    first rule each row breaks, in the reader's order of checks (``self.checks``)."""

    def __init__(self, checks: List[Tuple[str, str]], types: Mapping[str, pa.DataType]) -> None:
        self.checks, self.types = checks, types
        self.conditions: Dict[Tuple[str, str], Column] = {}
        self.columns: Dict[str, Column] = {}

    def check(self, column: str, rule: str, condition: Optional[Column]) -> None:
        if condition is not None:
            self.conditions[(column, rule)] = condition

    def integer(self, column: str) -> _Int:
        col = _int(self.types, column)
        self.check(column, rd.RULE_INT64, col.wraps)
        return col

    def keys(self) -> None:
        for column in (rd.USER_ID, rd.TS):
            col = self.integer(column)
            self.check(column, rd.RULE_NULL, col.null)
            self.columns[column] = col.value
        ts = self.columns[rd.TS]
        self.check(rd.TS, rd.RULE_TS_RANGE, (ts < F.lit(rd.TS_MIN)) | (ts >= F.lit(rd.TS_MAX)))

    def bad(self) -> Column:
        """The index in ``checks`` of the first rule the row breaks, else null."""
        whens = [
            F.when(self.conditions[k], F.lit(i)) for i, k in enumerate(self.checks) if k in self.conditions
        ]
        return F.coalesce(*whens) if whens else F.lit(None).cast("int")


def _exposure_checks(s: ScenarioSpec) -> List[Tuple[str, str]]:
    """(column, rule) of every row check of an exposure, in the reader's order."""
    checks = [(rd.USER_ID, rd.RULE_INT64), (rd.USER_ID, rd.RULE_NULL), (rd.TS, rd.RULE_INT64)]
    checks += [(rd.TS, rd.RULE_NULL), (rd.TS, rd.RULE_TS_RANGE), (rd.REQUEST_ID, rd.RULE_INT64)]
    checks += [(rd.SPLIT, rd.RULE_INT64), (rd.SPLIT, rd.RULE_SPLIT)]
    checks += [(c, rd.RULE_INT64) for _, c, _ in s.categorical()]
    checks += [(c, rd.RULE_INT64) for _, c, _, _ in s.multi_hot()]
    checks += [(c, rd.RULE_NOT_FINITE) for c in s.dense_features]
    for t in s.tasks:
        checks += [(t, rd.RULE_INT64), (t, rd.RULE_LABEL), (t, rd.RULE_FUNNEL)]
    return checks


def _sequence_checks(q: SequenceSpec) -> List[Tuple[str, str]]:
    checks = [(rd.USER_ID, rd.RULE_INT64), (rd.USER_ID, rd.RULE_NULL), (rd.TS, rd.RULE_INT64)]
    checks += [(rd.TS, rd.RULE_NULL), (rd.TS, rd.RULE_TS_RANGE)]
    return checks + [(f, rd.RULE_INT64) for f in q.features]


def _checks(source: _Source) -> List[Tuple[str, str]]:
    spec = source.spec
    return _exposure_checks(spec) if isinstance(spec, ScenarioSpec) else _sequence_checks(spec)


def _exposure_rows(rows: _Rows, s: ScenarioSpec) -> None:
    """The reader's ``_normalise_exposures`` as expressions: ``rows.columns`` are named
    ts, request_id, split, f<j> (categorical), m<j> (multi-hot), d<j> (dense), l<j> (labels)."""
    rows.keys()
    out, types = rows.columns, rows.types
    if rd.REQUEST_ID in types:
        out[rd.REQUEST_ID] = F.coalesce(rows.integer(rd.REQUEST_ID).value, F.lit(-1).cast("long"))
    else:
        out[rd.REQUEST_ID] = F.lit(-1).cast("long")
    if rd.SPLIT in types:
        split = rows.integer(rd.SPLIT).value  # null stays null: "split by time", not a bad row
        rows.check(rd.SPLIT, rd.RULE_SPLIT, (split < 0) | (split > 2))
        out[rd.SPLIT] = F.when(split.between(0, 2), split).otherwise(F.lit(-1)).cast("byte")
    else:
        out[rd.SPLIT] = F.lit(-1).cast("byte")
    for j, (_, column, size) in enumerate(s.categorical()):
        out[f"f{j}"] = _fold(rows.integer(column).value, size)
    for j, (_, column, size, _) in enumerate(s.multi_hot()):
        out[f"m{j}"], wraps = _fold_list(types, column, size)
        rows.check(column, rd.RULE_INT64, wraps)
    for j, column in enumerate(s.dense_features):
        c = F.col(column)
        if pa.types.is_floating(types[column]):  # NaN is above every number in Spark: bad
            bad = c.isNotNull() & ~(F.abs(c) <= F.lit(rd.FLOAT32_MAX))
            rows.check(column, rd.RULE_NOT_FINITE, bad)
            c = F.when(bad, F.lit(0.0)).otherwise(c)
        out[f"d{j}"] = F.coalesce(c.cast("float"), F.lit(0.0).cast("float"))
    earlier_zero: Column = F.lit(False)
    for j, task in enumerate(s.tasks):
        col = rows.integer(task)
        v = col.value
        rows.check(task, rd.RULE_LABEL, (v < 0) | (v > 1))
        rows.check(task, rd.RULE_FUNNEL, (v == 1) & earlier_zero)
        earlier_zero = earlier_zero | F.coalesce(v == 0, F.lit(False))
        out[f"l{j}"] = F.when(v.between(0, 1), v).otherwise(F.lit(-1)).cast("byte")


def _sequence_rows(rows: _Rows, q: SequenceSpec) -> None:
    rows.keys()
    for j, (f, size) in enumerate(q.features.items()):
        rows.columns[f"f{j}"] = _fold(rows.integer(f).value, size)


# -------------------------------------------------------------------- reading a source
def _read_source(spark: SparkSession, ds: rd.RawDataset, source: _Source, n_files: int) -> DataFrame:
    """The first ``n_files`` files of a source, normalised: ``_file`` (index in the reader's
    order), ``_row`` (row in the file), ``_bad`` (first rule broken, index in ``_checks``), then
    the columns of :func:`_exposure_rows` / :func:`_sequence_rows`."""
    groups: Dict[Tuple[Tuple[str, str], ...], List[int]] = {}
    for j in range(n_files):  # files with the same column types are read by one scan
        groups.setdefault(tuple((c, str(t)) for c, t in source.types[j].items()), []).append(j)
    frames = [_read_group(spark, ds, source, files) for files in groups.values()]
    return functools.reduce(DataFrame.unionByName, frames)


def _read_group(spark: SparkSession, ds: rd.RawDataset, source: _Source, files: List[int]) -> DataFrame:
    types = source.types[files[0]]
    schema = T.StructType(
        [T.StructField(c, _spark_type(ds, source.files[files[0]], c, t)) for c, t in types.items()]
    )
    uris = [_spark_uri(ds.fs, source.files[j], glob_escape=True) for j in files]
    frame = (
        spark.read.schema(schema)
        .option("ignoreCorruptFiles", "false")
        .option("ignoreMissingFiles", "false")
        .parquet(*uris)
    )
    meta = frame.metadataColumn("_metadata")
    # Spark's file_name is URI-encoded ("a%20b.parquet"); '+' stays as is, so protect it from
    # url_decode, which reads it as a space. A name missing from the map is caught by _validate.
    name = F.url_decode(F.replace(meta.getField("file_name"), F.lit("+"), F.lit("%2B")))
    index = F.create_map(*[x for j in files for x in (F.lit(posixpath.basename(source.files[j])), F.lit(j))])
    rows = _Rows(_checks(source), types)
    if isinstance(source.spec, ScenarioSpec):
        _exposure_rows(rows, source.spec)
    else:
        _sequence_rows(rows, source.spec)
    return frame.select(
        F.try_element_at(index, name).cast("int").alias("_file"),
        meta.getField("row_index").cast("long").alias("_row"),
        rows.bad().alias("_bad"),
        *[c.alias(n) for n, c in rows.columns.items()],
    )


# -------------------------------------------------------------------- pass 1: validate
@dataclass
class _Validation:
    """What the validation job found: kept rows per source and the bad rows."""

    kept: List[int]
    bad_rows: rd.BadRows


def _validate(
    ds: rd.RawDataset, sources: List[_Source], frames: List[Optional[DataFrame]], skip_bad_rows: bool
) -> _Validation:
    """Counts every source's rows per (file, first rule broken) in one job; raises the local
    reader's error on the first bad file (a bad row, unless ``skip_bad_rows``, or a row count
    other than the footer's).

    Raises:
        DataContractError: a bad row (strict), a file Spark cannot read or reads another number
            of rows from than its footer declares, word for word the local engine's error.
        AggregationError: Spark read a file under a name the engine did not list.
    """
    parts = [
        f.groupBy("_file", "_bad")
        .agg(F.count(F.lit(1)).alias("n"), F.min("_row").alias("first"))
        .withColumn("_source", F.lit(i))
        for i, f in enumerate(frames)
        if f is not None
    ]
    rows = _collect(functools.reduce(DataFrame.unionByName, parts), ds, sources) if parts else []
    kept = [0] * len(sources)
    bad = rd.BadRows()
    read: Dict[Tuple[int, int], int] = {}  # (source, file) -> rows Spark read
    problems: List[Tuple[int, int, rd.DataContractError]] = []  # (source, file, error)
    for r in sorted(rows, key=lambda r: (r["_source"], -1 if r["_file"] is None else r["_file"])):
        i, j, source = r["_source"], r["_file"], sources[r["_source"]]
        if j is None:
            raise AggregationError(
                f"{ds.root}/{source.kind}/{source.spec.name}: Spark read {r['n']} row(s) from a file "
                "under a name the aggregation did not list; rename files to plain names"
            )
        read[i, j] = read.get((i, j), 0) + int(r["n"])
        if r["_bad"] is None:
            kept[i] += int(r["n"])
            continue
        column, rule = _checks(source)[r["_bad"]]
        bad.add(ds._display(source.files[j]), column, rule, int(r["n"]))
        if not skip_bad_rows:
            detail = f"row {r['first']}; found by the Spark engine, not by the local reader"
            problems.append((i, j, rd.DataContractError(ds._display(source.files[j]), column, rule, detail)))
    problems += _miscounted_files(ds, sources, frames, read)
    if problems:  # the local engine reads the files in this order and stops at the first
        i, j, error = min(problems, key=lambda p: p[:2])
        _reread_locally(ds, sources[i], sources[i].files[j], error)
    return _Validation(kept, bad)


def _miscounted_files(
    ds: rd.RawDataset,
    sources: List[_Source],
    frames: List[Optional[DataFrame]],
    read: Dict[Tuple[int, int], int],
) -> List[Tuple[int, int, rd.DataContractError]]:
    """The files of which Spark read another number of rows than the footer declares: a damaged
    file can read short without an error, as the local reader checks too (``_batches``)."""
    found = []
    for i, (source, frame) in enumerate(zip(sources, frames)):
        for j, declared in enumerate(source.rows if frame is not None else []):
            got = read.get((i, j), 0)
            if got != declared:
                detail = f"Spark read {got} rows of the {declared} its footer declares"
                found.append(
                    (i, j, rd.DataContractError(ds._display(source.files[j]), None, rd.RULE_CORRUPT, detail))
                )
    return found


class _OneFile(rd.RawDataset):
    """``ds`` restricted to one file, to let the local reader word the error of a bad row."""

    def __init__(self, ds: rd.RawDataset, path: str) -> None:  # shares ds's listing and schema
        self.__dict__.update(vars(ds))
        self.bad_rows, self.skip_bad_rows, self._only = rd.BadRows(), False, path

    def files(self, kind: str, name: str) -> List[str]:
        return [self._only]


def _reread_locally(ds: rd.RawDataset, source: _Source, path: str, otherwise: Exception) -> NoReturn:
    """Reads one file with the local reader, which raises its own error, word for word; raises
    ``otherwise`` if the reader finds nothing wrong."""
    one = _OneFile(ds, path)
    spec = source.spec
    batches = one.iter_scenario(spec) if isinstance(spec, ScenarioSpec) else one.iter_sequence(spec)
    for _ in batches:
        pass
    raise otherwise


def _collect(frame: DataFrame, ds: rd.RawDataset, sources: List[_Source]) -> List[Row]:
    """``frame.collect()``; a file Spark could not read is named as the local engine names it."""
    try:
        return frame.collect()
    except (Py4JJavaError, PySparkException) as exc:
        found = re.search(r"Encountered error while reading file (\S+)\.\s", str(exc))
        uri = urllib.parse.unquote(found.group(1)) if found else None
        for source in sources:
            for path in source.files:
                if uri == _spark_uri(ds.fs, path):
                    detail = f"Spark: {str(exc).splitlines()[0]}"[:500]
                    error = rd.DataContractError(ds._display(path), None, rd.RULE_CORRUPT, detail)
                    _reread_locally(ds, source, path, error)
        raise


# -------------------------------------------------------------------- pass 2: build samples
def _exposures(frames: List[DataFrame], schema: DatasetSchema, window: int) -> DataFrame:
    """Every kept exposure of every scenario, one struct column ``e<i>`` per scenario (null in
    the rows of the others), with its window start ``ws``, repartitioned by user."""
    union: Optional[DataFrame] = None
    for i, (frame, s) in enumerate(zip(frames, schema.scenarios)):
        payload = ["request_id", "split"] + [f"f{j}" for j in range(len(s.categorical()))]
        payload += [f"m{j}" for j in range(len(s.multi_hot()))]
        payload += [f"d{j}" for j in range(len(s.dense_features))]
        payload += [f"l{j}" for j in range(len(s.tasks))]
        # (ts, file, row) first: sort_array orders each sample's exposures by them (unique).
        struct = F.struct(F.col("ts"), F.col("_file").alias("file"), F.col("_row").alias("row"), *payload)
        part = frame.filter(F.col("_bad").isNull()).select(
            "user_id", "ts", F.lit(i).alias("si"), "_file", "_row", struct.alias(f"e{i}")
        )
        union = part if union is None else union.unionByName(part, allowMissingColumns=True)
    assert union is not None  # a schema has at least one scenario
    ws = F.col("ts") - F.pmod(F.col("ts"), F.lit(window))  # floor(ts / W) * W, no overflow
    return union.withColumn("ws", ws).repartition("user_id")


def _counts_before(keys: DataFrame, actions: DataFrame, lookback: int, j: int) -> DataFrame:
    """``keys`` with ``_c<j>`` (the user's actions with ``ts <`` the exposure's) and ``_lo<j>``
    (with ``ts < ws - lookback``): a running count over the user's exposures (carrying their
    columns, so no join brings the count back), window probes and actions in ts order, the
    actions last among equal ts (so a count is of strictly earlier ones)."""
    carried = keys.columns
    exp = keys.select(*carried, F.lit(0).alias("_k"), F.lit(0).alias("_key"))
    probes = (
        keys.select("user_id", "ws")
        .distinct()
        .select("user_id", "ws", (F.col("ws") - F.lit(lookback)).alias("ts"), F.lit(0).alias("_k"))
        .withColumn("_key", F.lit(1))
    )
    acts = actions.filter(F.col("_bad").isNull()).select(
        "user_id", "ts", F.lit(1).alias("_k"), F.lit(2).alias("_key")
    )
    rows = exp.unionByName(probes, allowMissingColumns=True).unionByName(acts, allowMissingColumns=True)
    order = Window.partitionBy("user_id").orderBy("ts", "_k").rowsBetween(Window.unboundedPreceding, 0)
    counted = rows.withColumn("_n", F.sum("_k").over(order).cast("long"))
    lows = counted.filter(F.col("_key") == 1).select("user_id", "ws", F.col("_n").alias(f"_lo{j}"))
    mine = counted.filter(F.col("_key") == 0).select(*carried, F.col("_n").alias(f"_c{j}"))
    return mine.join(lows, ["user_id", "ws"])


def _chunks(
    exposures: DataFrame,
    actions: List[DataFrame],
    realtime: List[SequenceSpec],
    lookback: int,
    config: AggregationConfig,
) -> DataFrame:
    """Per exposure (``si, _file, _row``): its sample ``_chunk`` inside the user-window and, per
    real-time sequence ``j``, the sample's slice start ``_s<j>`` and the count before the
    exposure ``_c<j>`` (a sample's slice ends at its largest): the rule of
    :mod:`mtfm_rec.data.realtime_split` as a fold (``aggregate``) over the user-window's
    exposures in (ts, scenario, file, row) order."""
    keys = exposures.select("user_id", "ws", "ts", "si", "_file", "_row")
    for j, frame in enumerate(actions):
        keys = _counts_before(keys, frame, lookback, j)
    js = range(len(realtime))
    fields = ["ts", "si", "_file", "_row"] + [f"_c{j}" for j in js] + [f"_lo{j}" for j in js]
    grouped = keys.groupBy("user_id", "ws").agg(F.sort_array(F.collect_list(F.struct(*fields))).alias("_x"))
    out_fields = ["si", "_file", "_row", _CHUNK] + [f"_s{j}" for j in js] + [f"_c{j}" for j in js]
    max_lens = [min(q.max_len, _MAX_INT32) for q in realtime]
    keeps = keep_counts(max_lens, config.realtime_split_keep)
    limit = config.max_exposures_per_sample

    def step(acc: Column, x: Column) -> Column:
        first = acc.getField("chunk") < 0
        over = [x.getField(f"_c{j}") - acc.getField(f"s{j}") > F.lit(max_lens[j]) for j in js]
        opens = functools.reduce(lambda a, b: a | b, over, first)
        if limit:
            opens = opens | (acc.getField("n") == F.lit(limit))
        starts = [
            F.when(first, F.greatest(x.getField(f"_lo{j}"), x.getField(f"_c{j}") - F.lit(max_lens[j])))
            .when(over[j], F.greatest(x.getField(f"_lo{j}"), x.getField(f"_c{j}") - F.lit(keeps[j])))
            .otherwise(acc.getField(f"s{j}"))
            for j in js
        ]
        chunk = F.when(opens, acc.getField("chunk") + 1).otherwise(acc.getField("chunk"))
        row = F.struct(
            x.getField("si").alias("si"),
            x.getField("_file").alias("_file"),
            x.getField("_row").alias("_row"),
            chunk.alias(_CHUNK),
            *[v.alias(f"_s{j}") for j, v in zip(js, starts)],
            *[x.getField(f"_c{j}").alias(f"_c{j}") for j in js],
        )
        return F.struct(
            chunk.alias("chunk"),
            F.when(opens, F.lit(1)).otherwise(acc.getField("n") + 1).alias("n"),
            *[v.alias(f"s{j}") for j, v in zip(js, starts)],
            F.concat(acc.getField("out"), F.array(row)).alias("out"),
        )

    row_type = T.StructType(
        [T.StructField(f, keys.schema[f].dataType) for f in ("si", "_file", "_row")]
        + [T.StructField(_CHUNK, T.LongType())]
        + [T.StructField(f"_s{j}", T.LongType()) for j in js]
        + [T.StructField(f"_c{j}", T.LongType()) for j in js]
    )
    initial = F.struct(
        F.lit(-1).cast("long").alias("chunk"),
        F.lit(0).cast("long").alias("n"),
        *[F.lit(0).cast("long").alias(f"s{j}") for j in js],
        F.array().cast(T.ArrayType(row_type)).alias("out"),
    )
    folded = grouped.select(F.explode(F.aggregate("_x", initial, step).getField("out")).alias("_o"))
    return folded.select(*[F.col("_o").getField(f).alias(f) for f in out_fields])


def _samples(exposures: DataFrame, n_scenarios: int, n_realtime: int) -> DataFrame:
    """One row per (user, window, chunk): each scenario's exposures as a sorted struct array and
    each real-time sequence's slice bounds ``_s<j>`` (start) and ``_e<j>`` (end)."""
    lists = [F.sort_array(F.collect_list(f"e{i}")).alias(f"e{i}") for i in range(n_scenarios)]
    bounds = [F.max(f"_s{j}").alias(f"_s{j}") for j in range(n_realtime)]
    bounds += [F.max(f"_c{j}").alias(f"_e{j}") for j in range(n_realtime)]
    return exposures.groupBy("user_id", "ws", _CHUNK).agg(*lists, *bounds)


def _with_sequences(samples: DataFrame, frames: List[DataFrame], sequences: List[SequenceSpec]) -> DataFrame:
    """Joins each sequence's actions of the sample's user, as one array ``a<i>`` sorted by
    (ts, file, row) (empty when the user has none)."""
    for i, (frame, q) in enumerate(zip(frames, sequences)):
        features = [f"f{j}" for j in range(len(q.features))]
        struct = F.struct(F.col("ts"), F.col("_file").alias("file"), F.col("_row").alias("row"), *features)
        actions = (
            frame.filter(F.col("_bad").isNull())
            .groupBy("user_id")
            .agg(F.sort_array(F.collect_list(struct)).alias(f"a{i}"))
        )
        array_type = actions.schema[f"a{i}"].dataType
        samples = samples.join(actions, "user_id", "left").withColumn(
            f"a{i}", F.coalesce(F.col(f"a{i}"), F.array().cast(array_type))
        )
    return samples


def _with_kept_actions(samples: DataFrame, sequences: List[SequenceSpec]) -> DataFrame:
    """Adds ``k<i>``: the H or R slice of each sequence's sorted actions for the sample
    (sample_format): H counted once per sample before the window start (own projections: never
    recomputed), R from the sample's bounds (:func:`_chunks`)."""
    start = F.col("ws")
    realtime = 0
    for i, q in enumerate(sequences):
        if q.is_history:
            ts = F.col(f"a{i}").getField("ts")
            end = F.aggregate(ts, F.lit(0), lambda n, t: n + F.when(t < start, 1).otherwise(0))
            samples = samples.withColumn("_end", end)
            samples = samples.withColumn(
                "_first", F.greatest(F.lit(0), F.col("_end") - F.lit(min(q.max_len, _MAX_INT32)))
            )
        else:
            samples = samples.withColumn("_end", F.col(f"_e{realtime}")).withColumn(
                "_first", F.col(f"_s{realtime}")
            )
            realtime += 1
        length = F.greatest(F.col("_end") - F.col("_first"), F.lit(0)).cast("int")
        kept = F.slice(f"a{i}", (F.col("_first") + 1).cast("int"), length)
        samples = samples.withColumn(f"k{i}", kept).drop(f"a{i}", "_end", "_first")
    return samples


def _output_columns(schema: DatasetSchema, window: int) -> List[Column]:
    """The shard columns, in ``sample_format.arrow_schema`` order, named c0, c1, ..."""
    cols: Dict[str, Column] = {
        fmt.USER_ID: F.col("user_id"),
        fmt.WINDOW_START: F.col("ws"),
        fmt.WINDOW_END: F.col("ws") + F.lit(window),
    }
    for i, q in enumerate(schema.sequences):
        kept = F.col(f"k{i}")
        cols[fmt.seq_ts(q.name)] = kept.getField("ts")
        for j, f in enumerate(q.features):
            cols[fmt.seq_feature(q.name, f)] = kept.getField(f"f{j}")
    for i, s in enumerate(schema.scenarios):
        e = F.col(f"e{i}")
        cols[fmt.exp_ts(s.name)] = e.getField("ts")
        cols[fmt.exp_request_id(s.name)] = e.getField("request_id")
        cols[fmt.exp_split(s.name)] = e.getField("split")
        for j, (g, c, _) in enumerate(s.categorical()):
            cols[fmt.exp_feature(s.name, g, c)] = e.getField(f"f{j}")
        for j, (g, c, _, _) in enumerate(s.multi_hot()):
            cols[fmt.exp_feature(s.name, g, c)] = e.getField(f"m{j}")
        for j, c in enumerate(s.dense_features):
            cols[fmt.exp_dense(s.name, c)] = e.getField(f"d{j}")
        for j, t in enumerate(s.tasks):
            cols[fmt.exp_label(s.name, t)] = e.getField(f"l{j}")
    return [cols[name].alias(f"c{k}") for k, name in enumerate(fmt.arrow_schema(schema).names)]


# -------------------------------------------------------------------- the shard of a user
def _unsigned(z: Column) -> Column:
    """The unsigned 64-bit value of an int64's bits, as a decimal."""
    d = z.cast(_DEC)
    return F.when(z < 0, d + F.lit(Decimal(_U64))).otherwise(d).cast(_DEC)


def _signed(u: Column) -> Column:
    """The int64 whose bits are the unsigned decimal ``u`` in [0, 2**64)."""
    return F.when(u >= F.lit(Decimal(_U63)), u - F.lit(Decimal(_U64))).otherwise(u).cast("long")


def _mul_mod64(z: Column, c: int) -> Column:
    """``z * c mod 2**64`` on the bits of an int64, without ever overflowing: 32-bit halves
    multiplied in decimals (every product below 2**96)."""
    lo = z.bitwiseAND(F.lit(_U32 - 1)).cast(_DEC)
    hi = F.shiftrightunsigned(z, 32).cast(_DEC)
    c_lo, c_hi = F.lit(Decimal(c % _U32)), F.lit(Decimal(c // _U32))
    mid = F.pmod(hi * c_lo + lo * c_hi, F.lit(Decimal(_U32)))
    return _signed(F.pmod(lo * c_lo + mid * F.lit(Decimal(_U32)), F.lit(Decimal(_U64))))


def with_user_partition(frame: DataFrame, user: str, num_partitions: int, out: str) -> DataFrame:
    """Adds column ``out`` = ``aggregate_partitions.user_partition`` of column ``user``:
    splitmix64(user_id) mod ``num_partitions``, bit for bit. One projection per step, so that
    no step's expression is inlined several times into the next."""
    z = "_splitmix"
    frame = frame.withColumn(
        z, _signed(F.pmod(_unsigned(F.col(user)) + F.lit(Decimal(_SPLITMIX_ADD)), F.lit(Decimal(_U64))))
    )
    for shift, mul in ((30, _SPLITMIX_MUL1), (27, _SPLITMIX_MUL2)):
        frame = frame.withColumn(z, F.col(z).bitwiseXOR(F.shiftrightunsigned(F.col(z), shift)))
        frame = frame.withColumn(z, _mul_mod64(F.col(z), mul))
    frame = frame.withColumn(z, F.col(z).bitwiseXOR(F.shiftrightunsigned(F.col(z), 31)))
    return frame.withColumn(
        out, F.pmod(_unsigned(F.col(z)), F.lit(Decimal(num_partitions))).cast("long")
    ).drop(z)


def _shard_keys(spark: SparkSession, num_partitions: int) -> Column:
    """Per shard k, a long whose Spark hash partition among ``num_partitions`` is k: a
    ``repartition`` by it puts exactly one shard in each task (by the shard itself, Murmur3
    would put several shards in some tasks and none in others). A wrong guess only unbalances."""
    candidates = spark.range(0, 64 * num_partitions + 64).select(
        "id", F.pmod(F.hash("id"), F.lit(num_partitions)).alias("k")
    )
    rows = candidates.groupBy("k").agg(F.min("id").alias("id")).collect()
    keys = {int(r["k"]): int(r["id"]) for r in rows}
    pairs = [x for k in range(num_partitions) for x in (F.lit(k), F.lit(keys.get(k, k)).cast("long"))]
    return F.try_element_at(F.create_map(*pairs), F.col(_SHARD))


def _write_samples(
    spark: SparkSession,
    frames: List[DataFrame],
    schema: DatasetSchema,
    config: AggregationConfig,
    ticks: Tuple[int, int],
    uri: str,
) -> None:
    """Pass 2 (one Spark job): builds every sample and writes them as ``shard=<k>/*.parquet``."""
    window, lookback = ticks
    n = len(schema.scenarios)
    exposures = _exposures(frames[:n], schema, window)
    realtime = [(q, frame) for q, frame in zip(schema.sequences, frames[n:]) if not q.is_history]
    chunks = _chunks(exposures, [f for _, f in realtime], [q for q, _ in realtime], lookback, config)
    samples = _samples(exposures.join(chunks, ["si", "_file", "_row"]), n, len(realtime))
    samples = _with_sequences(samples, frames[n:], schema.sequences)
    samples = _with_kept_actions(samples, schema.sequences)
    samples = with_user_partition(samples, "user_id", config.num_partitions, _SHARD)
    out = samples.select(*_output_columns(schema, window), _CHUNK, _SHARD)
    (
        out.repartition(config.num_partitions, _shard_keys(spark, config.num_partitions))
        .sortWithinPartitions(_SHARD, "c0", "c1", _CHUNK)
        .write.partitionBy(_SHARD)
        .parquet(uri)
    )


# -------------------------------------------------------------------- finish: exact shards
def _shard_table(fs: fsspec.AbstractFileSystem, folder: str, arrow: pa.Schema) -> pa.Table:
    """One shard of Spark's output as a table of ``arrow`` schema, rows in (user, window,
    chunk) order."""
    files = sorted(fs.glob(posixpath.join(folder, "*.parquet")))
    files = [p for p in files if not posixpath.basename(p).startswith((".", "_"))]
    tables = []
    for path in files:
        with fs.open(path, "rb") as fh:
            tables.append(pq.read_table(fh))
    if not tables:
        return arrow.empty_table()
    table = pa.concat_tables(tables)
    keys = [table.column(c).to_numpy() for c in ("c0", "c1", _CHUNK)]
    order = np.lexsort(keys[::-1])
    if not (order == np.arange(len(order))).all():  # Spark sorted them; make sure of it
        table = table.take(pa.array(order))
    arrays = [table.column(f"c{k}").cast(f.type) for k, f in enumerate(arrow)]
    return pa.Table.from_arrays(arrays, schema=arrow).combine_chunks()


def _shard_result(table: pa.Table, schema: DatasetSchema) -> Dict[str, Any]:
    """The per-partition result dict of ``aggregate_partitions.build_partition``."""

    def lengths(names: Sequence[str]) -> np.ndarray:
        total = np.zeros(table.num_rows, np.int64)
        for name in names:
            total += pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False)
        return total

    exposures = {s.name: int(lengths([fmt.exp_ts(s.name)]).sum()) for s in schema.scenarios}
    return {
        "samples": table.num_rows,
        "exposures": exposures,
        "actions": {},
        "hist_h": np.bincount(lengths([fmt.seq_ts(q.name) for q in schema.history_sequences])),
        "hist_r": np.bincount(lengths([fmt.seq_ts(q.name) for q in schema.realtime_sequences])),
        "hist_t": np.bincount(lengths([fmt.exp_ts(s.name) for s in schema.scenarios])),
    }


def _check_unchunked(table: pa.Table, schema: DatasetSchema, window: int) -> None:
    """The local engine's refusal of a window above ``UNCHUNKED_EXPOSURE_LIMIT`` exposures."""
    sizes = np.zeros(table.num_rows, np.int64)
    for s in schema.scenarios:
        sizes += pc.list_value_length(table.column(fmt.exp_ts(s.name))).to_numpy(zero_copy_only=False)
    if not len(sizes) or int(sizes.max()) <= agg.UNCHUNKED_EXPOSURE_LIMIT:
        return
    opens = np.zeros(int(sizes.sum()), bool)
    opens[np.cumsum(sizes) - sizes] = True
    users = np.repeat(table.column(fmt.USER_ID).to_numpy(), sizes)
    starts = np.repeat(table.column(fmt.WINDOW_START).to_numpy(), sizes)
    _check_window_sizes(opens, users, starts, window, agg.UNCHUNKED_EXPOSURE_LIMIT)


def _rewrite_shards(
    fs: fsspec.AbstractFileSystem,
    stage: str,
    local_dir: str,
    schema: DatasetSchema,
    config: AggregationConfig,
    window: int,
) -> Tuple[List[Tuple[str, str]], List[Dict[str, Any]]]:
    """Rewrites Spark's ``shard=<k>`` folders as exact shards in ``local_dir``, one at a time.

    Returns:
        ((local path, shard name) per shard, the per-shard results for the statistics).
    """
    arrow = fmt.arrow_schema(schema)
    shards, results = [], []
    for k in range(config.num_partitions):
        table = _shard_table(fs, posixpath.join(stage, f"{_SHARD}={k}"), arrow)
        if config.max_exposures_per_sample is None:
            _check_unchunked(table, schema, window)
        path = os.path.join(local_dir, fmt.shard_name(k))
        pq.write_table(table, path, row_group_size=max(1, config.output_row_group_size))
        shards.append((path, fmt.shard_name(k)))
        results.append(_shard_result(table, schema))
    return shards, results


# -------------------------------------------------------------------- the session
def _session(
    master: Optional[str], spark_conf: Mapping[str, str], progress: bool
) -> Tuple[SparkSession, bool]:
    """The active SparkSession, or a new one; (session, whether this call started it)."""
    active = SparkSession.getActiveSession()
    if active is not None:
        if master is not None and active.sparkContext.master != master:
            raise AggregationError(
                f"aggregate_spark(master={master!r}): a SparkSession with master "
                f"{active.sparkContext.master!r} is already running in this process; pass "
                "master=None to use it, or stop it first"
            )
        for key, value in spark_conf.items():
            active.conf.set(key, value)
        return active, False
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        raise AggregationError(
            "the Spark engine needs Java 17 or later and found no `java` on PATH and no JAVA_HOME: "
            "install a JDK (e.g. apt-get install openjdk-17-jre-headless) or use the local engine"
        )
    builder = SparkSession.builder.appName("mtfm_rec.aggregate")
    # Under spark-submit (which starts this driver with the gateway's port) its --master holds;
    # a plain interpreter starts its own JVM, on local[*] unless told otherwise.
    if master is not None or not os.environ.get("PYSPARK_GATEWAY_PORT"):
        builder = builder.master(master or DEFAULT_MASTER)
    builder = builder.config("spark.ui.showConsoleProgress", "true" if progress else "false")
    for key, value in spark_conf.items():
        builder = builder.config(key, value)
    return builder.getOrCreate(), True


@contextlib.contextmanager
def _case_sensitive(spark: SparkSession) -> Iterator[None]:
    """Column names are case-sensitive in the contract ("click" and "Click" are two columns)."""
    key = "spark.sql.caseSensitive"
    before = spark.conf.get(key, "false")
    spark.conf.set(key, "true")
    try:
        yield
    finally:
        spark.conf.set(key, before or "false")


# -------------------------------------------------------------------- driver
def _ticks(schema: DatasetSchema, config: AggregationConfig) -> Tuple[int, int]:
    """(window, R lookback) in dataset ticks; refused as by the local engine when they could
    overflow int64 window arithmetic."""
    tps = schema.ticks_per_second
    window = config.window_seconds * tps
    lookback = agg.realtime_lookback_seconds(config, schema) * tps
    if window + lookback > rd.TS_MAX:
        raise AggregationError(
            f"window_seconds={config.window_seconds} plus the real-time lookback of "
            f"{lookback // tps} s is more than 2**62 ticks ({schema.time_unit}): window "
            "arithmetic would overflow int64"
        )
    return window, lookback


_Structural = Optional[Tuple[int, int, rd.DataContractError]]


def _read_and_validate(
    spark: SparkSession,
    ds: rd.RawDataset,
    config: AggregationConfig,
    sources: List[_Source],
    structural: _Structural,
) -> Tuple[List[DataFrame], _Validation]:
    """Pass 1: every row of the files the local engine reads before the first structural
    problem (all files when there is none); raises what the local engine would raise first."""
    frames: List[Optional[DataFrame]] = []
    for i, source in enumerate(sources):
        n_files = len(source.files)
        if structural is not None:
            n_files = n_files if i < structural[0] else structural[1] if i == structural[0] else 0
        frames.append(_read_source(spark, ds, source, n_files) if n_files else None)
    validation = _validate(ds, sources, frames, config.skip_bad_rows)
    if structural is not None:
        raise structural[2]
    return [f for f in frames if f is not None], validation


def _stage(out_fs: fsspec.AbstractFileSystem, out_path: str) -> str:
    """Where Spark writes: a hidden sibling of the output, on its filesystem."""
    parent, name = posixpath.split(out_path)
    return posixpath.join(parent, f".{name}.spark-{uuid.uuid4().hex[:12]}")


def aggregate_spark(
    raw: str,
    out: str,
    config: AggregationConfig,
    master: Optional[str] = None,
    spark_conf: Optional[Mapping[str, object]] = None,
) -> agg.AggregationStats:
    """Aggregates ``raw`` into ``out`` with Apache Spark: the output of ``aggregate`` (the same
    shards, byte for byte), built by a Spark application.

    Args:
        raw: raw-contract dataset root: a local path or a URL Spark reads (``hdfs://``, ``s3://``
            read as ``s3a://``, ``gs://``, ...); not ``memory://``.
        out: output directory, as for ``aggregate``; Spark writes into a hidden sibling of it,
            which must be reachable by every executor.
        config: the aggregation config (``num_workers`` and ``start_method`` are not used:
            Spark's master decides the parallelism).
        master: Spark master; default: spark-submit's ``--master`` when run under spark-submit,
            else ``local[*]``. An active SparkSession of this process is used as it is (its
            master must then be this one, or None).
        spark_conf: ``spark.*`` settings for the session (e.g. ``spark.sql.shuffle.partitions``;
            values are passed as text, booleans as ``true``/``false``).

    Returns:
        The statistics (also ``out/_stats.json``); ``read_seconds`` is pass 1 (checks and the
        validation job), ``build_seconds`` the build job and the rewrite of the shards.

    Raises:
        DataContractError: the raw data breaks the contract (the local engine's error).
        AggregationError: as ``aggregate``; also a ``memory://`` path or no Java.
    """
    t0 = time.perf_counter()
    config.validate()
    out_fs, out_path = output_location(raw, out)
    check_replaceable(out_fs, out_path, out)
    ds = rd.RawDataset(raw, skip_bad_rows=config.skip_bad_rows, batch_rows=config.read_batch_rows)
    fp = agg.fingerprint(ds, config)
    ticks = _ticks(ds.schema, config)
    stage = _stage(out_fs, out_path)
    stage_uri = _spark_uri(out_fs, stage)  # refuses memory:// before a session starts
    _spark_uri(ds.fs, ds.all_files()[0])  # and the raw files (one filesystem)
    sources, structural = _scan(ds)
    if structural is not None and (config.skip_bad_rows or structural[:2] == (0, 0)):
        raise structural[2]  # no row before it would stop the run (skipped ones only count)
    conf = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in (spark_conf or {}).items()}
    spark, started = _session(master, conf, config.progress)
    try:
        with _case_sensitive(spark), tempfile.TemporaryDirectory(prefix="mtfm_agg_spark_") as tmp:
            frames, validation = _read_and_validate(spark, ds, config, sources, structural)
            t_read = time.perf_counter() - t0
            try:
                _write_samples(spark, frames, ds.schema, config, ticks, stage_uri)
                agg._check_unchanged(ds, config, fp)
                shards, results = _rewrite_shards(out_fs, stage, tmp, ds.schema, config, ticks[0])
            finally:
                if out_fs.exists(stage):
                    out_fs.rm(stage, recursive=True)
            stats = _stats(ds.schema, sources, validation, results, fp["fingerprint"], config)
            stats.seconds = time.perf_counter() - t0
            stats.read_seconds, stats.build_seconds = t_read, stats.seconds - t_read
            _publish(out_fs, out_path, out, shards, ds.schema, stats, fp)
    finally:
        if started:
            spark.stop()
    return stats


def _publish(
    fs: fsspec.AbstractFileSystem,
    out_path: str,
    out: str,
    shards: List[Tuple[str, str]],
    schema: DatasetSchema,
    stats: agg.AggregationStats,
    fp: Dict[str, Any],
) -> None:
    """The local engine's finish: the shards, dataset.yaml, _stats.json, then _SUCCESS."""
    entries = [
        fmt.shard_entry(name, pq.read_metadata(src).num_rows, os.path.getsize(src)) for src, name in shards
    ]
    texts = {
        fmt.SCHEMA_FILE: schema.to_yaml(),
        fmt.STATS_FILE: json.dumps(stats.to_dict(), indent=2),
        fmt.SUCCESS_FILE: json.dumps(fmt.success_record(entries, **fp), indent=2),  # last
    }
    publish(fs, out_path, out, shards, texts)


def _stats(
    schema: DatasetSchema,
    sources: List[_Source],
    validation: _Validation,
    results: List[Dict[str, Any]],
    fp: str,
    config: AggregationConfig,
) -> agg.AggregationStats:
    """The local engine's statistics from the shards, with the actions counted by pass 1."""
    stats = agg._merge_stats(results, schema, validation.bad_rows, fp, config.num_partitions)
    for source, kept in zip(sources, validation.kept):
        if not source.is_exposures:
            stats.actions_per_sequence[source.spec.name] = kept
        elif stats.exposures_per_scenario[source.spec.name] != kept:  # every exposure in one sample
            raise AggregationError(
                f"exposures/{source.spec.name}: {kept} exposures read but "
                f"{stats.exposures_per_scenario[source.spec.name]} in the samples written (a bug)"
            )
    return stats
