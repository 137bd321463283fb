"""Reading the raw data contract with validation (``../shared/spec/raw-data.md``, docs/DATA.md).

A raw dataset is ``dataset.yaml`` + ``exposures/<scenario>/*.parquet`` +
``behaviors/<sequence>/*.parquet`` under a local path or any fsspec URL. :class:`RawDataset`
checks the layout against the schema, then streams each folder's files record batch by record
batch (never a whole file in memory), validating every batch and normalising it into a
:class:`pyarrow.RecordBatch` whose columns are what aggregation needs:

* exposures: ``user_id``, ``ts``, ``request_id`` (-1 if absent), ``split`` (int8, -1 if absent),
  ``<group>/<feature>`` (folded int64; a multi-hot feature: list<int64> of folded ids, a null
  list -> ``[size]``, the "missing" row), ``dense/<column>`` (float32, null -> 0.0),
  ``label/<task>`` (int8, null -> -1);
* behaviours: ``user_id``, ``ts``, ``<feature>`` (folded int64).

Structural problems (layout, missing or repeated column, wrong type (a multi-hot feature's column
must be a list of integers), unreadable file) always raise
:class:`DataContractError`. Row-level problems (null ``user_id``/``ts``, ``ts`` outside
``[TS_MIN, TS_MAX)``, an unsigned id that does not fit int64, a dense value that is not a finite
float32, label outside {0, 1}, a broken funnel, ``split`` outside {0, 1, 2}; for a multi-hot
feature, an id in the list that does not fit int64) raise too, unless
``skip_bad_rows`` is set: then the rows are dropped and counted per (file, column, rule) in a
:class:`BadRows`.

It stays one module (a little over 500 lines) because it is one concept, the checked reading of
the raw contract. :class:`RawDataset` holds the layout check, the streaming and the row validation, which
share its files and its bad-row count; the rule texts, the error type and the column helpers
around it exist for it (the aggregation imports the column names and helpers from here).
"""

from __future__ import annotations

import hashlib
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mtfm_rec.data.schema import DatasetSchema, ScenarioSpec, SequenceSpec, fold_ids

EXPOSURES = "exposures"
BEHAVIORS = "behaviors"
USER_ID = "user_id"
TS = "ts"
REQUEST_ID = "request_id"
SPLIT = "split"
SPLIT_VALUES = (0, 1, 2)
# The ts range aggregation can do window arithmetic in without int64 overflow: it computes
# floor(ts / W) * W, + W and - lookback, all within [TS_MIN - W - lookback, TS_MAX + W), which
# fits int64 while W + lookback <= 2**62 ticks (about 146 million years in ms). Outside it a
# window start could wrap and a far-past exposure see future actions as history.
TS_MIN = -(2**62)
TS_MAX = 2**62  # exclusive
INT64_MAX = 2**63 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)

# Rule texts, shared by the errors and the bad-row report (tests match on them).
RULE_MISSING_COLUMN = "missing column"
RULE_NOT_INTEGER = "wrong type: expected an integer column"
RULE_NOT_NUMERIC = "wrong type: expected a numeric column"
RULE_NOT_LIST = "wrong type: expected a list-of-integers column (a multi-hot feature)"
RULE_DUPLICATE_COLUMN = "column appears more than once in the file"
RULE_NULL = "null not allowed"
RULE_LABEL = "label outside {0, 1}"
RULE_SPLIT = "split outside {0, 1, 2}"
RULE_TS_RANGE = "ts outside the safe range [-2**62, 2**62)"
RULE_INT64 = "value does not fit int64"
RULE_NOT_FINITE = "dense value not finite or outside the float32 range"
RULE_FUNNEL = "funnel broken: a later task is 1 while an earlier task is 0"
RULE_CORRUPT = "not a readable Parquet file"
RULE_UNDECLARED = "folder not declared in dataset.yaml"
RULE_MISSING_FOLDER = "declared in dataset.yaml but folder is missing"
RULE_EMPTY_FOLDER = "folder holds no .parquet file"
RULE_NOT_A_FILE = "named .parquet but not a regular file (a folder, a broken link or a special file)"


class DataContractError(ValueError):
    """Raw data that breaks the contract; the message names the file, the column and the rule."""

    def __init__(self, path: str, column: Optional[str], rule: str, detail: str = "") -> None:
        self.path, self.column, self.rule = path, column, rule
        self.detail = detail
        where = f"{path}: column {column!r}" if column is not None else path
        super().__init__(f"{where}: {rule}" + (f" ({detail})" if detail else ""))

    def __reduce__(self) -> Tuple[Any, ...]:  # picklable across worker processes
        return (type(self), (self.path, self.column, self.rule, self.detail))


@dataclass
class BadRows:
    """Rows skipped under ``skip_bad_rows``, counted per (file, column, rule)."""

    counts: Counter = field(default_factory=Counter)

    def add(self, path: str, column: str, rule: str, n: int) -> None:
        if n:
            self.counts[(path, column, rule)] += int(n)

    def merge(self, other: "BadRows") -> None:
        self.counts.update(other.counts)

    @property
    def total(self) -> int:
        return int(sum(self.counts.values()))

    def to_list(self) -> List[Dict[str, object]]:
        return [
            {"file": p, "column": c, "rule": r, "rows": n} for (p, c, r), n in sorted(self.counts.items())
        ]

    def report(self) -> str:
        if not self.counts:
            return "bad rows: 0"
        lines = [f"bad rows: {self.total} skipped"]
        lines += [f"  {p}: column {c!r}: {r}: {n}" for (p, c, r), n in sorted(self.counts.items())]
        return "\n".join(lines)


def _hidden(name: str) -> bool:
    """Names starting with "." or "_" (``_SUCCESS``, ``.crc``, ``_temporary``) are not data."""
    return name.startswith((".", "_"))


def _is_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(t)


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _is_int_list(t: pa.DataType) -> bool:
    """A list (any of Arrow's three list types) of integers, or of nulls only."""
    lists = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    return lists and (_is_int(t.value_type) or pa.types.is_null(t.value_type))


_TYPE_CHECKS = {
    "int": (lambda t: _is_int(t) or pa.types.is_null(t), RULE_NOT_INTEGER),
    "num": (lambda t: _is_numeric(t) or pa.types.is_null(t), RULE_NOT_NUMERIC),
    "list": (lambda t: _is_int_list(t) or pa.types.is_null(t), RULE_NOT_LIST),
}


def _int64(col: pa.Array) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int64 values with nulls as 0, null mask, "does not fit int64" mask) of an integer column.

    Only uint64 can hold values above int64's maximum; they would wrap to negative ids in the
    cast, so they are flagged (and their value here is meaningless).
    """
    if pa.types.is_null(col.type):  # an all-null column written without a type
        col = col.cast(pa.int64())
    nulls = col.is_null().to_numpy(zero_copy_only=False) if col.null_count else np.zeros(len(col), bool)
    raw = (pc.fill_null(col, 0) if col.null_count else col).to_numpy(zero_copy_only=False)
    wraps = raw > INT64_MAX if raw.dtype == np.uint64 else np.zeros(len(col), bool)
    return raw.astype(np.int64, copy=False), nulls, wraps


def _float32(col: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
    """(float32 values with nulls as 0.0, "not a finite float32" mask) of a numeric column.

    Floats are checked before the cast: NaN, +/-inf and values beyond float32's range (which
    the cast would turn into inf) are flagged. Integers always fit (rounded to nearest).
    """
    if pa.types.is_null(col.type):
        col = col.cast(pa.float32())
    raw = (pc.fill_null(col, 0) if col.null_count else col).to_numpy(zero_copy_only=False)
    if raw.dtype.kind != "f":
        return raw.astype(np.float32), np.zeros(len(col), bool)
    bad = ~(np.abs(raw.astype(np.float64)) <= FLOAT32_MAX)  # NaN compares False: bad
    with np.errstate(over="ignore", invalid="ignore"):  # bad rows are dropped or raised on
        return raw.astype(np.float32), bad


class RawDataset:
    """A raw-contract dataset at ``root`` (a local path or fsspec URL), checked against its schema.

    Args:
        root: dataset root holding ``dataset.yaml``.
        skip_bad_rows: drop and count row-level problems instead of raising.
        batch_rows: rows per record batch when streaming files.
    """

    def __init__(self, root: str, skip_bad_rows: bool = False, batch_rows: int = 65536) -> None:
        self.root = root.rstrip("/")
        self.fs, self._base = fsspec.core.url_to_fs(self.root)
        self._base = self._base.rstrip("/")
        self.schema = DatasetSchema.load(self.root)
        self.skip_bad_rows = skip_bad_rows
        self.batch_rows = batch_rows
        self.bad_rows = BadRows()
        self._files: Dict[Tuple[str, str], List[str]] = {}
        self._check_layout()

    # ---------------------------------------------------------------- layout
    def _display(self, path: str) -> str:
        """A path as the user knows it (with the URL protocol), for messages."""
        rel = posixpath.relpath(path, self._base) if path.startswith(self._base) else path
        return f"{self.root}/{rel}"

    def _entries(self, folder: str) -> List[Tuple[str, str]]:
        """(path, "file" | "directory" | "other") of a folder's entries, symlinks followed (fsspec's
        local listing types every link "other", which would skip a linked file silently)."""
        out = []
        for e in self.fs.ls(folder, detail=True):
            path, kind = e["name"].rstrip("/"), e["type"]
            if kind == "other" and e.get("islink"):
                kind = "directory" if self.fs.isdir(path) else "file" if self.fs.isfile(path) else "other"
            out.append((path, kind))
        return out

    def _subdirs(self, kind: str) -> List[str]:
        top = f"{self._base}/{kind}"
        if not self.fs.isdir(top):
            return []
        names = (posixpath.basename(p) for p, t in self._entries(top) if t == "directory")
        return sorted(n for n in names if not _hidden(n))

    def _parquet_files(self, folder: str) -> List[str]:
        """Sorted non-hidden ``*.parquet`` files of a folder; such a name that is no regular file
        is refused (its data would go unread)."""
        files = []
        for path, kind in self._entries(folder):
            name = posixpath.basename(path)
            if _hidden(name) or not name.endswith(".parquet"):
                continue
            if kind != "file":
                raise DataContractError(self._display(path), None, RULE_NOT_A_FILE)
            files.append(path)
        return sorted(files)

    def _check_layout(self) -> None:
        for kind, declared in (
            (EXPOSURES, [s.name for s in self.schema.scenarios]),
            (BEHAVIORS, [q.name for q in self.schema.sequences]),
        ):
            present = self._subdirs(kind)
            for name in present:
                if name not in declared:
                    raise DataContractError(f"{self.root}/{kind}/{name}", None, RULE_UNDECLARED)
            for name in declared:
                folder = f"{self._base}/{kind}/{name}"
                if name not in present:
                    raise DataContractError(self._display(folder), None, RULE_MISSING_FOLDER)
                files = self._parquet_files(folder)
                if not files:
                    raise DataContractError(self._display(folder), None, RULE_EMPTY_FOLDER)
                self._files[(kind, name)] = files

    def files(self, kind: str, name: str) -> List[str]:
        """Sorted Parquet files (filesystem paths) of ``exposures/<name>`` or ``behaviors/<name>``."""
        return list(self._files[(kind, name)])

    def all_files(self) -> List[str]:
        return [f for key in sorted(self._files) for f in self._files[key]]

    def fingerprint_entries(self, full_hash_bytes: int = 1 << 20) -> List[Tuple[str, int, str]]:
        """(relative path, size, content digest) of dataset.yaml and every input file.

        The digest follows the content, never the modification time: ``sha256:<hex>`` of the
        whole file for dataset.yaml and for Parquet files of at most ``full_hash_bytes``;
        ``footer-sha256:<hex>`` of the Parquet footer (schema, row-group offsets, sizes and
        column statistics) for larger ones, with the size next to it. A footer digest misses
        an edit that keeps the size and every footer byte (docs/DATA.md, "The cache").

        Raises:
            DataContractError: a large file without a Parquet footer.
        """
        out = []
        for path in [f"{self._base}/dataset.yaml"] + self.all_files():
            size = int(self.fs.info(path).get("size", 0))
            with self.fs.open(path, "rb") as fh:
                if size <= full_hash_bytes or not path.endswith(".parquet"):
                    digest = "sha256:" + hashlib.sha256(fh.read()).hexdigest()
                else:  # a Parquet file ends with <footer><4-byte LE footer length>PAR1
                    fh.seek(size - 8)
                    tail = fh.read(8)
                    footer_len = int.from_bytes(tail[:4], "little")
                    if tail[4:] != b"PAR1" or footer_len + 8 > size:
                        raise DataContractError(self._display(path), None, RULE_CORRUPT, "no footer")
                    fh.seek(size - 8 - footer_len)
                    footer = fh.read(footer_len)
                    digest = "footer-sha256:" + hashlib.sha256(footer + tail).hexdigest()
            out.append((posixpath.relpath(path, self._base), size, digest))
        return out

    # ---------------------------------------------------------------- reading
    def _open(self, path: str) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(self.fs.open(path, "rb"))
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise DataContractError(self._display(path), None, RULE_CORRUPT, str(exc)) from exc

    def _check_columns(
        self, path: str, arrow_schema: pa.Schema, required: Dict[str, str], optional: Dict[str, str]
    ) -> List[str]:
        """Checks presence and types; returns the columns to read."""
        names = set(arrow_schema.names)
        read = []
        for column, want in list(required.items()) + list(optional.items()):
            if column not in names:
                if column in required:
                    raise DataContractError(self._display(path), column, RULE_MISSING_COLUMN)
                continue
            copies = len(arrow_schema.get_all_field_indices(column))
            if copies > 1:  # Arrow and Parquet allow it; which copy would be the data?
                detail = f"{copies} columns of this name"
                raise DataContractError(self._display(path), column, RULE_DUPLICATE_COLUMN, detail)
            t = arrow_schema.field(column).type
            ok, rule = _TYPE_CHECKS[want]
            if not ok(t):
                raise DataContractError(self._display(path), column, rule, f"got {t}")
            read.append(column)
        return read

    def _batches(self, pf: pq.ParquetFile, path: str, columns: List[str]) -> Iterator[pa.RecordBatch]:
        """The file's batches; a file whose pages give fewer or more rows than its footer declares
        (a damaged row-group header can make Arrow read none, without an error) is corrupt."""
        read = 0
        try:
            for batch in pf.iter_batches(batch_size=self.batch_rows, columns=columns):
                read += batch.num_rows
                yield batch
        except (pa.ArrowException, OSError) as exc:
            raise DataContractError(self._display(path), None, RULE_CORRUPT, str(exc)) from exc
        declared = pf.metadata.num_rows
        if read != declared:
            detail = f"read {read} rows of the {declared} its footer declares"
            raise DataContractError(self._display(path), None, RULE_CORRUPT, detail)

    def _row_problem(
        self, path: str, column: str, rule: str, bad: np.ndarray, row0: int, keep: np.ndarray, note: str = ""
    ) -> None:
        """Raises on the first bad row still kept, or counts them under skip_bad_rows; then
        drops them from ``keep`` (in place), so a row bad twice counts once, under its first rule."""
        bad = bad & keep
        n = int(bad.sum())
        if not n:
            return
        if not self.skip_bad_rows:
            first = row0 + int(np.argmax(bad))
            detail = f"row {first}; {n} such row(s) in this batch" + (f"; {note}" if note else "")
            raise DataContractError(self._display(path), column, rule, detail)
        self.bad_rows.add(self._display(path), column, rule, n)
        keep &= ~bad

    def _ints(
        self, path: str, batch: pa.RecordBatch, column: str, row0: int, keep: np.ndarray
    ) -> Tuple[np.ndarray, np.ndarray]:
        """(int64 values, null mask) of an integer column; a value that does not fit int64 is a
        bad row (never a wrapped id)."""
        values, nulls, wraps = _int64(batch.column(column))
        self._row_problem(path, column, RULE_INT64, wraps, row0, keep)
        return values, nulls

    def _id_lists(
        self, path: str, batch: pa.RecordBatch, column: str, size: int, row0: int, keep: np.ndarray
    ) -> pa.ListArray:
        """The ``list<int64>`` of folded ids of a multi-hot column, one list per row.

        Ids are folded as single ids are (:func:`fold_ids`: a null id in a list is the "missing"
        row ``size``); a null list is missing too, and becomes ``[size]``, so that it is looked
        up like a null single id; an empty list stays empty (it pools to a zero vector). A row
        with an id that does not fit int64 is a bad row.
        """
        col = batch.column(column)
        n = len(col)
        if pa.types.is_null(col.type):  # an all-null column written without a type
            col = pa.nulls(n, pa.list_(pa.int64()))
        missing = col.is_null().to_numpy(zero_copy_only=False)
        lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy().astype(np.int64)
        values, nulls, wraps = _int64(pc.list_flatten(col))  # null lists give no values
        row_of = np.repeat(np.arange(n, dtype=np.int64), lengths)
        bad = np.zeros(n, bool)
        bad[row_of[wraps]] = True
        self._row_problem(path, column, RULE_INT64, bad, row0, keep)
        out_lengths = np.where(missing, 1, lengths)
        offsets = np.concatenate([[0], np.cumsum(out_lengths)]).astype(np.int64)
        out = np.full(int(offsets[-1]), size, np.int64)  # the null lists' one "missing" id
        rank = np.arange(len(values), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        out[offsets[:-1][row_of] + rank] = fold_ids(values, size, nulls)
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(out, pa.int64()))

    def iter_scenario(self, scenario: ScenarioSpec) -> Iterator[Tuple[str, pa.RecordBatch]]:
        """Yields (file, normalised batch) of one scenario's exposures, in file then row order."""
        required = {USER_ID: "int", TS: "int"}
        required.update({c: "int" for _, c, _ in scenario.categorical()})
        required.update({c: "list" for _, c, _, _ in scenario.multi_hot()})
        required.update({c: "num" for c in scenario.dense_features})
        required.update({t: "int" for t in scenario.tasks})
        optional = {REQUEST_ID: "int", SPLIT: "int"}
        for path in self.files(EXPOSURES, scenario.name):
            pf = self._open(path)
            columns = self._check_columns(path, pf.schema_arrow, required, optional)
            row0 = 0
            for batch in self._batches(pf, path, columns):
                out = self._normalise_exposures(path, scenario, batch, row0)
                row0 += batch.num_rows
                if out.num_rows:
                    yield self._display(path), out

    def iter_sequence(self, sequence: SequenceSpec) -> Iterator[Tuple[str, pa.RecordBatch]]:
        """Yields (file, normalised batch) of one behaviour sequence, in file then row order."""
        required = {USER_ID: "int", TS: "int"}
        required.update({f: "int" for f in sequence.features})
        for path in self.files(BEHAVIORS, sequence.name):
            pf = self._open(path)
            columns = self._check_columns(path, pf.schema_arrow, required, {})
            row0 = 0
            for batch in self._batches(pf, path, columns):
                keep, cols = self._keys(path, batch, row0)
                for f, size in sequence.features.items():
                    values, nulls = self._ints(path, batch, f, row0, keep)
                    cols[f] = fold_ids(values, size, nulls)
                row0 += batch.num_rows
                out = _record_batch(cols, keep)
                if out.num_rows:
                    yield self._display(path), out

    def _keys(self, path: str, batch: pa.RecordBatch, row0: int) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
        keep = np.ones(batch.num_rows, dtype=bool)
        cols: Dict[str, np.ndarray] = {}
        for column in (USER_ID, TS):
            values, nulls = self._ints(path, batch, column, row0, keep)
            self._row_problem(path, column, RULE_NULL, nulls, row0, keep)
            cols[column] = values
        outside = (cols[TS] < TS_MIN) | (cols[TS] >= TS_MAX)
        self._row_problem(path, TS, RULE_TS_RANGE, outside, row0, keep)
        return keep, cols

    def _normalise_exposures(
        self, path: str, scenario: ScenarioSpec, batch: pa.RecordBatch, row0: int
    ) -> pa.RecordBatch:
        keep, cols = self._keys(path, batch, row0)
        names = batch.schema.names
        n = batch.num_rows
        if REQUEST_ID in names:
            values, nulls = self._ints(path, batch, REQUEST_ID, row0, keep)
            cols[REQUEST_ID] = np.where(nulls, -1, values)
        else:
            cols[REQUEST_ID] = np.full(n, -1, np.int64)
        if SPLIT in names:
            values, nulls = self._ints(path, batch, SPLIT, row0, keep)
            bad = ~nulls & ((values < 0) | (values > 2))
            self._row_problem(path, SPLIT, RULE_SPLIT, bad, row0, keep)
            cols[SPLIT] = np.where(nulls, -1, values).astype(np.int8)
        else:
            cols[SPLIT] = np.full(n, -1, np.int8)
        for group, column, size in scenario.categorical():
            values, nulls = self._ints(path, batch, column, row0, keep)
            cols[f"{group}/{column}"] = fold_ids(values, size, nulls)
        for group, column, size, _ in scenario.multi_hot():
            cols[f"{group}/{column}"] = self._id_lists(path, batch, column, size, row0, keep)
        for column in scenario.dense_features:
            values, bad = _float32(batch.column(column))
            self._row_problem(path, column, RULE_NOT_FINITE, bad, row0, keep)
            cols[f"dense/{column}"] = values
        self._labels(path, scenario, batch, row0, keep, cols)
        return _record_batch(cols, keep)

    def _labels(
        self,
        path: str,
        scenario: ScenarioSpec,
        batch: pa.RecordBatch,
        row0: int,
        keep: np.ndarray,
        cols: Dict[str, np.ndarray],
    ) -> None:
        """``label/<task>`` columns (null -> -1): each 0/1, and in funnel order (tasks as listed
        in dataset.yaml) a 1 needs no earlier 0; a null earlier label is unknown, not a 0."""
        earlier_zero = np.zeros(batch.num_rows, dtype=bool)
        for i, task in enumerate(scenario.tasks):
            values, nulls = self._ints(path, batch, task, row0, keep)
            bad = ~nulls & ((values < 0) | (values > 1))
            self._row_problem(path, task, RULE_LABEL, bad, row0, keep)
            broken = ~nulls & (values == 1) & earlier_zero
            note = f"funnel order {scenario.tasks[: i + 1]}"
            self._row_problem(path, task, RULE_FUNNEL, broken, row0, keep, note)
            earlier_zero |= ~nulls & (values == 0)
            cols[f"label/{task}"] = np.where(nulls, -1, values).astype(np.int8)


def _record_batch(cols: Dict[str, Any], keep: np.ndarray) -> pa.RecordBatch:
    """The kept rows of ``cols`` (numpy arrays, or Arrow arrays for the multi-hot lists)."""
    arrays = {k: v if isinstance(v, pa.Array) else pa.array(v) for k, v in cols.items()}
    if not keep.all():
        mask = pa.array(keep)
        arrays = {k: v.filter(mask) for k, v in arrays.items()}
    return pa.RecordBatch.from_pydict(arrays)


def exposure_columns(scenario: ScenarioSpec) -> List[str]:
    """Column names of a normalised exposure batch (see module docstring), in order."""
    cols = [USER_ID, TS, REQUEST_ID, SPLIT]
    cols += [f"{g}/{c}" for g, c, _ in scenario.categorical()]
    cols += [f"{g}/{c}" for g, c, _, _ in scenario.multi_hot()]  # list<int64>
    cols += [f"dense/{c}" for c in scenario.dense_features]
    cols += [f"label/{t}" for t in scenario.tasks]
    return cols


def multi_hot_columns(scenario: ScenarioSpec) -> List[str]:
    """The ``list<int64>`` columns of a normalised exposure batch (its multi-hot features)."""
    return [f"{g}/{c}" for g, c, _, _ in scenario.multi_hot()]


def sequence_columns(sequence: SequenceSpec) -> List[str]:
    """Column names of a normalised behaviour batch, in order."""
    return [USER_ID, TS] + list(sequence.features)


def read_parquet_folder(root: str, folder: str) -> pa.Table:
    """Every Parquet file of ``root/folder``, concatenated in file-name order, unvalidated.

    For tools that need a folder's rows in their stored order (the synthetic generator's truth
    files follow its exposure files row by row); training reads through :class:`RawReader`.

    Raises:
        FileNotFoundError: the folder is missing or holds no Parquet file.
    """
    fs, base = fsspec.core.url_to_fs(root)
    path = f"{base.rstrip('/')}/{folder}"
    files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet")) if fs.isdir(path) else []
    if not files:
        raise FileNotFoundError(f"{root}/{folder}: no Parquet files there")
    tables = []
    for file in files:
        with fs.open(file, "rb") as fh:
            tables.append(pq.read_table(fh))
    return pa.concat_tables(tables)
