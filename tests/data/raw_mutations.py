"""Mutations of a raw-contract dataset held in memory, for the fuzz tests (tests/data/test_fuzz.py).

A dataset is a :class:`Files` mapping (relative path -> bytes, :data:`DIR` for an empty
folder, or :data:`LINK` + target for a symbolic link). A :class:`Mutation` is a plain,
printable value (kind, target, args), so a failing hypothesis example shows its exact
reproducer; :func:`apply` turns it into files:

* Parquet tables: drop, rename or duplicate a column, retype it (string, float, bool, list,
  struct, null, timestamp, decimal, uint64 with wrapped negatives, ...), null some values, set
  some to out-of-range or non-finite values, empty the table, rewrite it in row groups of one
  row, swap in another file's table;
* files: truncate at a byte, flip bytes, delete a file or a folder, add a stray file or folder
  (hidden, undeclared, garbage, a copy of or a link to another file, a dangling link, a file
  where a folder was, a folder where dataset.yaml was);
* dataset.yaml: rename, delete or retype a key or value, write a key twice, insert garbage or
  non-UTF-8 bytes, replace the whole text.

A mutation that no longer applies (its file was deleted or is no longer Parquet, its YAML
path is gone) leaves the dataset unchanged.
"""

from __future__ import annotations

import copy
import decimal
import io
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from hypothesis import strategies as st

DIR = "<dir>"  # the content of an (empty) folder in a Files mapping
LINK = "<link>:"  # + a path relative to the root: a symbolic link (dangling if nothing is there)
Files = Dict[str, Union[bytes, str]]
YAML = "dataset.yaml"
YamlPath = Tuple[Union[str, int], ...]


@dataclass(frozen=True)
class Mutation:
    """One change to a dataset: ``kind`` applied to ``target`` (a file or a YAML path) with ``args``."""

    kind: str
    target: Any
    args: Tuple[Any, ...] = ()


# -------------------------------------------------------------------- the base dataset
class Base:
    """The valid dataset every example starts from, and what the strategies draw targets from.

    (No dataclass: hypothesis would print every byte of it with a failing example.)
    """

    def __init__(self, files: Files, columns: Dict[str, List[str]], schema: Dict[str, Any]) -> None:
        self.files = files
        self.columns = columns  # parquet file -> its column names
        self.schema = schema  # dataset.yaml as a mapping
        self.yaml_paths: List[YamlPath] = list(_yaml_paths(schema))  # every node but the root
        self.yaml_keys = sorted({str(p[-1]) for p in self.yaml_paths if isinstance(p[-1], str)})

    @classmethod
    def build(cls, schema: Dict[str, Any], tables: Dict[str, Dict[str, List[pa.Table]]]) -> "Base":
        files: Files = {YAML: yaml.safe_dump(schema, sort_keys=False).encode()}
        columns: Dict[str, List[str]] = {}
        for kind, folders in tables.items():
            for name, parts in folders.items():
                for i, table in enumerate(parts):
                    path = f"{kind}/{name}/part-{i}.parquet"
                    files[path] = _parquet_bytes(table)
                    columns[path] = list(table.column_names)
        return cls(files, columns, schema)

    def yaml_value(self, path: YamlPath) -> Any:
        node = self.schema
        for key in path:
            node = node[key]
        return node

    def __repr__(self) -> str:  # hypothesis prints fixtures with a failing example
        return f"Base({len(self.files)} files)"

    @property
    def parquet_files(self) -> List[str]:
        return sorted(self.columns)


def _yaml_paths(node: Any, prefix: YamlPath = ()) -> Any:
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield prefix + (key,)
        yield from _yaml_paths(child, prefix + (key,))


def _parquet_bytes(table: pa.Table, row_group_size: Optional[int] = None) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    return buf.getvalue()


# -------------------------------------------------------------------- strategies
# Values a mutation may put into a column, by what the column is (anything may go anywhere too):
# id/label/split extremes, the int64 and uint64 ends, the ts safe range's ends, non-finite
# floats and the float32 limits.
IDS = (-1, -(2**31) - 1, 2**31, 2**63 - 1, -(2**63), 2**63, 2**64 - 1)
VALUES: Dict[str, Tuple[Any, ...]] = {
    "ts": (2**62 - 1, 2**62, -(2**62), -(2**62) - 1, 2**63 - 1, -(2**63), 2**63, 2**64 - 1, 0),
    "label": (-1, 2, 3, 0, 1, 255, 2**63),
    "split": (-1, 3, 0, 1, 2, 2**63),
    "dense": (
        float("nan"),
        float("inf"),
        float("-inf"),
        3.4028234663852886e38,
        3.5e38,
        -1e39,
        1e-45,
        -0.0,
        2**64 - 1,
        -(2**63),
    ),
    "id": IDS,
}
EXTREMES: Tuple[Any, ...] = tuple(dict.fromkeys(v for pool in VALUES.values() for v in pool))
CASTS = (
    "string",
    "binary",
    "float64",
    "float32",
    "float16",
    "bool",
    "list",
    "struct",
    "null",
    "timestamp",
    "decimal",
    "uint64",
    "int8",
    "int32",
    "dictionary",
)
YAML_VALUES: Tuple[Any, ...] = (
    "abc",
    "",
    "1",
    "ms",
    "realtime",
    "a.b",
    "__x",
    0,
    -1,
    1,
    10**30,
    2**63,
    True,
    False,
    None,
    [],
    [1],
    ["click"],
    {},
    {"a": 1},
    {"click": 2},
    1.5,
    float("nan"),
)
# ... and by the type of the value they replace (sizes, max_len, names, lists, mappings)
YAML_LIKE: Dict[type, Tuple[Any, ...]] = {
    int: (0, -1, 1, 2**31, 2**62, 2**63 - 2, 2**63 - 1, 2**63, 10**30, True, "5", 1.5, None),
    str: ("", "a.b", "a__b", "_x", "x y", "click", "hp", "orders", "user_id", "ts", 1, None, True),
    list: ([], [1], [None], ["click", "click"], ["x"], [[]], {}, "click"),
    dict: ({}, {"a": 1}, {"a": 0}, {1: 1}, [], "x", None),
}
YAML_TEXTS: Tuple[bytes, ...] = (
    b"",
    b"null\n",
    b"[]\n",
    b"42\n",
    b"---\na: 1\n---\nb: 2\n",
    b"!!python/object/apply:os.system ['true']\n",
    b"a: &x [*x]\n",
    b"{",
    b"\t- x\n",
    b"\x00\x01",
    b"\xef\xbb\xbfname: demo\n",
)
YAML_INSERTS: Tuple[bytes, ...] = (
    b":",
    b"- ",
    b"\t",
    b"&a ",
    b"*a",
    b"{",
    b"[",
    b'"',
    b"'",
    b"#",
    b"\n",
    b"  ",
    b"%",
    b"!!binary ",
    b"? ",
    b"<<: *a\n",
    b"\xff",
    b"\xc3(",
    "\u00e9".encode("latin-1"),
    b"\x00",
)
STRAY_PATHS = (
    "exposures/hp/notes.txt",
    "exposures/hp/_SUCCESS",
    "exposures/hp/.part-0.parquet.crc",
    "exposures/hp/part-9.parquet",
    "exposures/hp/sub.parquet",
    "exposures/stray/part-0.parquet",
    "behaviors/_tmp/part-0.parquet",
    "behaviors/.hidden/x.parquet",
    "stray.parquet",
    "exposures/README",
    "exposures/food",
    "behaviors",
    "dataset.yml",
    "dataset.yaml",
)
STRAY_CONTENTS = ("empty", "garbage", "magic", "magic_pair", "copy", "dir", "link", "dangling_link")
FOLDERS = (
    "exposures",
    "behaviors",
    "exposures/hp",
    "exposures/food",
    "behaviors/orders",
    "behaviors/clicks_rt",
)
_rows = st.one_of(st.just("all"), st.lists(st.integers(0, 64), min_size=1, max_size=3).map(tuple))


def mutations(base: Base, max_size: int = 3) -> st.SearchStrategy[List[Mutation]]:
    """1 to ``max_size`` mutations of ``base``: of one family (tables 2 in 5, files or YAML 1 in
    5 each) or mixed (1 in 5). YAML changes nearly always stop at dataset.yaml, so most examples
    are left to reach the column and row rules behind it."""
    table, files, text = _table_mutation(base), _file_mutation(base), _yaml_mutation(base)
    families = [table, table, files, text, st.one_of(table, files, text)]
    return st.one_of(*[st.lists(f, min_size=1, max_size=max_size) for f in families])


def role(column: str) -> str:
    """What a column of the base dataset is, for :data:`VALUES`."""
    if column in ("ts", "split"):
        return column
    if column in ("click", "order"):
        return "label"
    return "dense" if column == "price" else "id"


@st.composite
def _table_mutation(draw: Callable[..., Any], base: Base) -> Mutation:
    # the column first (each name as likely), then a file holding it
    column = draw(st.sampled_from(sorted({c for cols in base.columns.values() for c in cols})))
    path = draw(st.sampled_from([p for p in base.parquet_files if column in base.columns[p]]))
    kind = draw(
        st.sampled_from(
            (
                "drop",
                "rename",
                "duplicate",
                "cast",
                "null",
                "set",
                "set",
                "set",
                "funnel",
                "empty",
                "row_groups",
                "swap",
            )
        )
    )
    args: Tuple[Any, ...] = ()
    if kind == "rename":
        args = (draw(st.sampled_from([column.upper(), column + "_x"] + base.columns[path])),)
    elif kind == "cast":
        args = (draw(st.sampled_from(CASTS)),)
    elif kind == "null":
        args = (draw(_rows),)
    elif kind == "set":
        value = st.sampled_from(VALUES[role(column)]) | st.sampled_from(EXTREMES)
        args = (draw(_rows), draw(value))
    elif kind == "funnel":  # a later task 1 after an earlier 0, where the file has both
        path = draw(st.sampled_from([p for p in base.parquet_files if "order" in base.columns[p]]))
        return Mutation(kind, (path, "order"), (draw(_rows),))
    elif kind == "swap":
        args = (draw(st.sampled_from(base.parquet_files)),)
    return Mutation(kind, (path, column), args)


@st.composite
def _file_mutation(draw: Callable[..., Any], base: Base) -> Mutation:
    kind = draw(st.sampled_from(("truncate", "flip", "delete", "delete_folder", "stray")))
    if kind == "delete_folder":
        return Mutation(kind, draw(st.sampled_from(FOLDERS)))
    if kind == "stray":
        content = draw(st.sampled_from(STRAY_CONTENTS))
        source = draw(st.sampled_from(base.parquet_files)) if content in ("copy", "link") else None
        return Mutation(kind, draw(st.sampled_from(STRAY_PATHS)), (content, source))
    path = draw(st.sampled_from(sorted(base.files)))
    if kind == "truncate":  # at a byte from the start or from the end (the Parquet footer)
        return Mutation(kind, path, (draw(st.integers(0, 1 << 16)), draw(st.booleans())))
    if kind == "flip":
        flips = st.tuples(st.integers(0, 1 << 16), st.integers(1, 255), st.booleans())
        return Mutation(kind, path, tuple(draw(st.lists(flips, min_size=1, max_size=4))))
    return Mutation(kind, path)


@st.composite
def _yaml_mutation(draw: Callable[..., Any], base: Base) -> Mutation:
    kind = draw(st.sampled_from(("rename", "delete", "retype", "retype", "duplicate", "insert", "replace")))
    if kind == "rename":
        path = draw(st.sampled_from([p for p in base.yaml_paths if isinstance(p[-1], str)]))
        key = str(path[-1])
        new = draw(
            st.sampled_from([key + "s", key[:-1], key.upper(), "x_" + key, 1, True, None] + base.yaml_keys)
        )
        return Mutation("yaml_rename", path, (new,))
    if kind == "delete":
        return Mutation("yaml_delete", draw(st.sampled_from(base.yaml_paths)))
    if kind == "retype":
        path = draw(st.sampled_from(base.yaml_paths))
        like = YAML_LIKE.get(type(base.yaml_value(path)), YAML_VALUES)
        return Mutation("yaml_retype", path, (draw(st.sampled_from(like) | st.sampled_from(YAML_VALUES)),))
    if kind == "duplicate":
        return Mutation("yaml_duplicate", YAML, (draw(st.integers(0, 200)),))
    if kind == "insert":
        return Mutation(
            "yaml_insert", YAML, (draw(st.integers(0, 1 << 12)), draw(st.sampled_from(YAML_INSERTS)))
        )
    return Mutation("yaml_replace", YAML, (draw(st.sampled_from(YAML_TEXTS)),))


# -------------------------------------------------------------------- applying them
def apply(base: Base, muts: Sequence[Mutation]) -> Files:
    """The files of ``base`` with ``muts`` applied in order."""
    files: Files = dict(base.files)
    for m in muts:
        _APPLY[_family(m.kind)](files, m, base)
    return files


def _family(kind: str) -> str:
    if kind.startswith("yaml_"):
        return "yaml"
    return "table" if kind in _TABLE_OPS else kind


def materialise(files: Files, root: str) -> None:
    """Writes ``files`` under the local folder ``root``."""
    for path, content in sorted(files.items()):
        target = os.path.join(root, path)
        if content == DIR:
            os.makedirs(target, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if isinstance(content, str) and content.startswith(LINK):
            os.symlink(os.path.join(root, content[len(LINK) :]), target)
            continue
        with open(target, "wb") as fh:
            fh.write(content)  # type: ignore[arg-type]


def _put(files: Files, path: str, content: Union[bytes, str]) -> None:
    """Sets ``path``, replacing a folder of that name and any file where a parent folder goes."""
    for other in list(files):
        if other.startswith(path + "/") or path.startswith(other + "/"):
            del files[other]
    files[path] = content


def _read_table(content: Any) -> Optional[pa.Table]:
    if not isinstance(content, bytes):
        return None
    try:
        return pq.read_table(io.BytesIO(content))
    except (pa.ArrowException, OSError):
        return None


# ---- tables
def _apply_table(files: Files, m: Mutation, base: Base) -> None:
    path, column = m.target
    table = _read_table(files.get(path))
    if table is None or (column not in table.column_names and m.kind != "swap"):
        return
    row_group_size = 1 if m.kind == "row_groups" else None
    new = table if m.kind == "row_groups" else _TABLE_OPS[m.kind](table, column, *m.args, files=files)
    if new is not None:
        files[path] = _parquet_bytes(new, row_group_size)


def _set_column(table: pa.Table, column: str, values: Any) -> pa.Table:
    return table.set_column(table.column_names.index(column), column, values)


def _rows_of(rows: Any, n: int) -> List[int]:
    return list(range(n)) if rows == "all" else sorted({r % n for r in rows}) if n else []


def _cast(table: pa.Table, column: str, to: str, **_: Any) -> Optional[pa.Table]:
    col = table.column(column).combine_chunks()
    values = col.to_pylist()
    builders: Dict[str, Callable[[], pa.Array]] = {
        "string": lambda: pa.array([None if v is None else str(v) for v in values], pa.string()),
        "binary": lambda: pa.array([None if v is None else str(v).encode() for v in values], pa.binary()),
        "float64": lambda: col.cast(pa.float64()),
        "float32": lambda: col.cast(pa.float32()),
        "float16": lambda: pc.cast(col.cast(pa.float32()), pa.float16()),
        "bool": lambda: pa.array([None if v is None else bool(v) for v in values], pa.bool_()),
        "list": lambda: pa.array([None if v is None else [v] for v in values]),
        "struct": lambda: pa.array([None if v is None else {"v": v} for v in values]),
        "null": lambda: pa.nulls(len(col)),
        "timestamp": lambda: col.cast(pa.int64(), safe=False).cast(pa.timestamp("s")),
        "decimal": lambda: pa.array(
            [None if v is None else decimal.Decimal(int(v)) for v in values], pa.decimal128(38, 0)
        ),
        "uint64": lambda: col.cast(pa.uint64(), safe=False),  # negatives wrap to huge values
        "int8": lambda: col.cast(pa.int8(), safe=False),
        "int32": lambda: col.cast(pa.int32(), safe=False),
        "dictionary": lambda: col.dictionary_encode(),
    }
    try:
        return _set_column(table, column, builders[to]())
    except (pa.ArrowException, ValueError, TypeError, OverflowError, decimal.InvalidOperation):
        return None  # not representable (e.g. a float NaN as an int): the mutation does not apply


def _null(table: pa.Table, column: str, rows: Any, **_: Any) -> pa.Table:
    col = table.column(column).combine_chunks()
    mask = [False] * len(col)
    for r in _rows_of(rows, len(col)):
        mask[r] = True
    return _set_column(table, column, pc.if_else(pa.array(mask), pa.nulls(len(col), col.type), col))


def _set(table: pa.Table, column: str, rows: Any, value: Any, **_: Any) -> Optional[pa.Table]:
    """``value`` at ``rows``: in the column's type if it fits, else in the type pyarrow infers
    (float for a float, uint64 for an int above int64), as a writer would produce."""
    col = table.column(column).combine_chunks()
    values = col.to_pylist()
    for r in _rows_of(rows, len(values)):
        values[r] = value
    for kind in (col.type, None, pa.uint64()):
        try:
            return _set_column(table, column, pa.array(values, kind))
        except (pa.ArrowException, OverflowError, TypeError, ValueError):
            continue
    return None


def _funnel(table: pa.Table, column: str, rows: Any, **_: Any) -> pa.Table:
    """click = 0 and order = 1 at ``rows``: the funnel broken (where an earlier mutation left
    both columns: a dropped label column is a mutation of its own)."""
    if not {"click", "order"} <= set(table.column_names):
        return table
    for name, value in (("click", 0), ("order", 1)):
        values = table.column(name).to_pylist()
        for r in _rows_of(rows, len(values)):
            values[r] = value
        table = _set_column(table, name, pa.array(values, table.schema.field(name).type))
    return table


def _rename(table: pa.Table, column: str, new: str, **_: Any) -> pa.Table:
    return table.rename_columns([new if c == column else c for c in table.column_names])


def _duplicate(table: pa.Table, column: str, **_: Any) -> pa.Table:
    return table.append_column(column, table.column(column))


def _swap(table: pa.Table, column: str, source: str, files: Files, **_: Any) -> Optional[pa.Table]:
    return _read_table(files.get(source))


_TABLE_OPS: Dict[str, Callable[..., Optional[pa.Table]]] = {
    "drop": lambda t, c, **_: t.drop_columns([c]),
    "rename": _rename,
    "duplicate": _duplicate,
    "cast": _cast,
    "null": _null,
    "set": _set,
    "funnel": _funnel,
    "empty": lambda t, c, **_: t.slice(0, 0),
    "row_groups": lambda t, c, **_: t,
    "swap": _swap,
}


# ---- files
def _apply_truncate(files: Files, m: Mutation, base: Base) -> None:
    content = files.get(m.target)
    if isinstance(content, bytes):
        at, from_end = m.args
        cut = at % (len(content) + 1)
        files[m.target] = content[: len(content) - cut] if from_end else content[:cut]


def _apply_flip(files: Files, m: Mutation, base: Base) -> None:
    content = files.get(m.target)
    if not isinstance(content, bytes) or not content:
        return
    data = bytearray(content)
    for offset, xor, from_end in m.args:
        i = offset % len(data)
        data[len(data) - 1 - i if from_end else i] ^= xor
    files[m.target] = bytes(data)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def overstate_row_count(content: bytes, row_group: Optional[int] = None) -> bytes:
    """The Parquet file with a footer that declares one row more than the pages hold: in
    FileMetaData.num_rows (``row_group`` None) or in that row group's num_rows. Both are field 3
    of their struct, an i64 zigzag varint; the edit keeps the file's size (a count whose varint
    would grow is refused), so it is the damage a size check cannot see."""

    def counts(data: bytes) -> Optional[Tuple[int, ...]]:
        try:
            meta = pq.ParquetFile(io.BytesIO(data)).metadata
        except (OSError, pa.ArrowException):  # the bytes were part of another field
            return None
        return (meta.num_rows, *(meta.row_group(g).num_rows for g in range(meta.num_row_groups)))

    before = counts(content)
    assert before is not None
    index = 0 if row_group is None else 1 + row_group
    want = tuple(n + (i == index) for i, n in enumerate(before))
    old, new = _varint(2 * before[index]), _varint(2 * want[index])  # zigzag(n) = 2n for n >= 0
    assert len(old) == len(new), f"{before[index]} + 1 needs a longer varint"
    footer_end = len(content) - 8
    footer_start = footer_end - int.from_bytes(content[footer_end : footer_end + 4], "little")
    field = b"\x16" + old  # field-id delta 1 (from field 2), compact type i64
    at = content.find(field, footer_start, footer_end)
    while at >= 0:
        edited = content[: at + 1] + new + content[at + 1 + len(old) :]
        if counts(edited) == want:
            return edited
        at = content.find(field, at + 1, footer_end)
    raise AssertionError(f"no num_rows field {index} found in the footer")


def _apply_delete(files: Files, m: Mutation, base: Base) -> None:
    files.pop(m.target, None)


def _apply_delete_folder(files: Files, m: Mutation, base: Base) -> None:
    for path in [p for p in files if p == m.target or p.startswith(m.target + "/")]:
        del files[path]


def _apply_stray(files: Files, m: Mutation, base: Base) -> None:
    content, source = m.args
    stray: Union[bytes, str, None] = {
        "empty": b"",
        "garbage": b"not parquet at all\n" * 3,
        "magic": b"PAR1",
        "magic_pair": b"PAR1\x00\x00\x00\x00PAR1",
        "dir": DIR,
        "link": f"{LINK}{source}",
        "dangling_link": f"{LINK}gone/nothing.parquet",
    }.get(content)
    if content == "copy":
        stray = files.get(source, base.files[source])
    if stray is not None:
        _put(files, m.target, stray)


# ---- dataset.yaml
def _yaml_obj(files: Files) -> Any:
    try:
        return yaml.safe_load(files.get(YAML, b""))  # type: ignore[arg-type]
    except (yaml.YAMLError, ValueError):
        return None


def _has(node: Any, key: Any) -> bool:
    if isinstance(node, dict):
        return key in node
    return isinstance(node, list) and isinstance(key, int) and key < len(node)


def _parent(obj: Any, path: YamlPath) -> Any:
    """The container holding ``path[-1]``, or None when the path is gone."""
    node = obj
    for key in path:
        if not _has(node, key):
            return None
        parent, node = node, node[key]
    return parent


def _apply_yaml(files: Files, m: Mutation, base: Base) -> None:
    if m.kind in ("yaml_duplicate", "yaml_insert", "yaml_replace"):
        text = files.get(YAML)
        if isinstance(text, bytes):
            files[YAML] = _YAML_TEXT_OPS[m.kind](text, *m.args)
        return
    obj = copy.deepcopy(_yaml_obj(files))
    parent = _parent(obj, m.target) if m.target else None
    if parent is None:
        return
    last = m.target[-1]
    if m.kind == "yaml_delete":
        del parent[last]
    elif m.kind == "yaml_retype":
        parent[last] = copy.deepcopy(m.args[0])
    elif isinstance(parent, dict) and m.args[0] not in parent:  # yaml_rename
        items = [(m.args[0] if k == last else k, v) for k, v in parent.items()]
        parent.clear()
        parent.update(items)
    files[YAML] = yaml.safe_dump(obj, sort_keys=False).encode()


_KEY_LINE = re.compile(rb"^(\s*)(- )?([^\s:#][^:]*): (\S.*)$")


def _duplicate_line(text: bytes, n: int) -> bytes:
    """Writes the ``n``-th (mod count) ``key: scalar`` line twice: the key twice in one mapping."""
    lines = text.split(b"\n")
    hits = [i for i, line in enumerate(lines) if _KEY_LINE.match(line)]
    if not hits:
        return text
    i = hits[n % len(hits)]
    indent, dash, key, value = _KEY_LINE.match(lines[i]).groups()  # type: ignore[union-attr]
    copy_line = indent + (b"  " if dash else b"") + key + b": " + value
    return b"\n".join(lines[: i + 1] + [copy_line] + lines[i + 1 :])


def _insert(text: bytes, at: int, what: bytes) -> bytes:
    i = at % (len(text) + 1)
    return text[:i] + what + text[i:]


_YAML_TEXT_OPS: Dict[str, Callable[..., bytes]] = {
    "yaml_duplicate": _duplicate_line,
    "yaml_insert": _insert,
    "yaml_replace": lambda text, new: new,
}
_APPLY: Dict[str, Callable[[Files, Mutation, Base], None]] = {
    "table": _apply_table,
    "truncate": _apply_truncate,
    "flip": _apply_flip,
    "delete": _apply_delete,
    "delete_folder": _apply_delete_folder,
    "stray": _apply_stray,
    "yaml": _apply_yaml,
}
