"""``dataset.yaml`` -> typed schema objects (see ``../shared/spec/raw-data.md``, docs/DATA.md).

The schema is the single source of truth for every shape in the framework: which sequences
become H and R tokens, which scenarios become T tokens with which features, which tasks each
scenario has, and how large each embedding table is. Adding a scenario is an entry here, never a
code change.

Categorical ids are folded into their table (see :func:`fold_ids`): a feature of declared size
``n`` owns a table of ``n + 1`` rows, row ``n`` being the "missing" row for nulls.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import yaml

HISTORY = "history"
REALTIME = "realtime"
SEQUENCE_KINDS = (HISTORY, REALTIME)
FEATURE_GROUPS = ("user", "item", "cross")
TIME_UNITS = {"s": 1, "ms": 1000}

# Names of scenarios, sequences, features, dense columns, tasks and shared tables: they become
# folder names, Parquet column names, KJT keys and (with "/" -> "__") torch parameter names, so
# no "." (torch module paths), no "/" (keys), no "__" (the mangling separator) and no leading "_"
# or "." (the reader ignores such folders).
NAME_RULE = "a letter, then letters, digits or '_', with no '__'"
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
# The dataset name is only a folder name (the cache dir <cache_dir>/<name>-<fingerprint>).
DATASET_NAME_RULE = "a letter or digit, then letters, digits, '_', '.' or '-'"
_DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
RESERVED_EXPOSURE_COLUMNS = ("user_id", "ts", "request_id", "split")
RESERVED_BEHAVIOR_COLUMNS = ("user_id", "ts")
# A dataset.yaml whose nodes, with every alias expanded, exceed this is refused ("billion laughs").
MAX_YAML_NODES = 100_000
# Ints that meet int64 numpy arithmetic: ids are folded mod the vocabulary size and a table has
# size + 1 rows; aggregation keeps the last max_len actions; the R lookback (in ticks) is
# subtracted from window starts in the ts safe range [-2**62, 2**62) (mtfm_rec.data.reader).
MAX_VOCABULARY_SIZE = 2**63 - 2
MAX_SEQUENCE_LENGTH = 2**63 - 1
MAX_LOOKBACK_TICKS = 2**62
TOP_KEYS = ("name", "time_unit", "sequences", "scenarios", "shared_embeddings")
SEQUENCE_KEYS = ("name", "kind", "max_len", "features")
SCENARIO_KEYS = ("name", "user_features", "item_features", "cross_features", "dense_features", "tasks")
# Documented extra top-level keys (kept in DatasetSchema.extra) and the type each must have;
# any other extra key must start with EXTENSION_PREFIX (kept as written, unchecked).
EXTRA_KEYS: Dict[str, str] = {
    "recommended_valid_after": "int",
    "recommended_eval_after": "int",
    "recommended_realtime_lookback_seconds": "non-negative int",
    "recipe": "string",
    "recipe_version": "int",
    "split": "string",
    "generator": "mapping",
}
EXTENSION_PREFIX = "x_"


class SchemaError(ValueError):
    """A ``dataset.yaml`` that breaks the contract; the message names the file and the key."""


@dataclass(frozen=True)
class SequenceSpec:
    """A behaviour sequence shared by all scenarios (``behaviors/<name>/``)."""

    name: str
    kind: str  # "history" -> H tokens, "realtime" -> R tokens
    max_len: int
    features: Dict[str, int]  # categorical column -> vocabulary size

    @property
    def is_history(self) -> bool:
        return self.kind == HISTORY


@dataclass(frozen=True)
class ScenarioSpec:
    """One scenario's exposure log (``exposures/<name>/``) with its own feature schema."""

    name: str
    user_features: Dict[str, int]
    item_features: Dict[str, int]
    cross_features: Dict[str, int]
    dense_features: List[str]
    tasks: List[str]  # 0/1 label columns in funnel order (a later task implies the earlier)

    def categorical(self) -> List[Tuple[str, str, int]]:
        """(group, column, size) for every categorical feature, groups in FEATURE_GROUPS order."""
        out: List[Tuple[str, str, int]] = []
        for group in FEATURE_GROUPS:
            for column, size in getattr(self, f"{group}_features").items():
                out.append((group, column, size))
        return out


@dataclass(frozen=True)
class DatasetSchema:
    """The parsed ``dataset.yaml``.

    Token groups (used by Group LayerNorm and the batch's ``token_group``) are numbered:
    history sequences first, then real-time sequences, then scenarios, each in file order.
    """

    name: str
    time_unit: str
    sequences: List[SequenceSpec]
    scenarios: List[ScenarioSpec]
    source: str = "<memory>"
    extra: Dict[str, Any] = field(default_factory=dict)
    # Extension: table name -> KJT keys that look up one shared embedding table (e.g. a category
    # id used by a sequence and by a scenario's items). Keys not listed get a table of their own.
    shared_embeddings: Dict[str, List[str]] = field(default_factory=dict)

    # ---------------------------------------------------------------- derived views
    @property
    def history_sequences(self) -> List[SequenceSpec]:
        return [s for s in self.sequences if s.kind == HISTORY]

    @property
    def realtime_sequences(self) -> List[SequenceSpec]:
        return [s for s in self.sequences if s.kind == REALTIME]

    @property
    def ordered_sequences(self) -> List[SequenceSpec]:
        """History sequences then real-time sequences: the order of token groups."""
        return self.history_sequences + self.realtime_sequences

    @property
    def ticks_per_second(self) -> int:
        return TIME_UNITS[self.time_unit]

    def scenario(self, name: str) -> ScenarioSpec:
        for spec in self.scenarios:
            if spec.name == name:
                return spec
        raise KeyError(f"{self.source}: no scenario named {name!r}")

    def sequence(self, name: str) -> SequenceSpec:
        for spec in self.sequences:
            if spec.name == name:
                return spec
        raise KeyError(f"{self.source}: no sequence named {name!r}")

    @property
    def token_groups(self) -> List[str]:
        """Names of the Group LayerNorm groups, index = group id."""
        return [f"seq/{s.name}" for s in self.ordered_sequences] + [f"exp/{s.name}" for s in self.scenarios]

    def sequence_group(self, name: str) -> int:
        return [s.name for s in self.ordered_sequences].index(name)

    def scenario_group(self, name: str) -> int:
        return len(self.sequences) + [s.name for s in self.scenarios].index(name)

    def sparse_feature_keys(self) -> List[str]:
        """KeyedJaggedTensor keys of a Batch, in order (see mtfm_rec.data.batch)."""
        keys = [f"seq/{q.name}/{f}" for q in self.ordered_sequences for f in q.features]
        keys += [f"exp/{s.name}/{g}/{c}" for s in self.scenarios for g, c, _ in s.categorical()]
        return keys

    def sparse_feature_sizes(self) -> Dict[str, int]:
        """KJT key -> embedding table rows (declared size + 1 "missing" row)."""
        sizes = {f"seq/{q.name}/{f}": n + 1 for q in self.sequences for f, n in q.features.items()}
        for s in self.scenarios:
            for g, c, n in s.categorical():
                sizes[f"exp/{s.name}/{g}/{c}"] = n + 1
        return sizes

    def embedding_tables(self) -> Dict[str, Tuple[int, List[str]]]:
        """Embedding table name -> (rows, the KJT keys it serves), in KJT key order.

        A key listed under ``shared_embeddings`` uses that table; any other key has a table of
        its own, named after the key.
        """
        sizes = self.sparse_feature_sizes()
        table_of = {key: name for name, keys in self.shared_embeddings.items() for key in keys}
        tables: Dict[str, Tuple[int, List[str]]] = {}
        for key in self.sparse_feature_keys():
            name = table_of.get(key, key)
            tables.setdefault(name, (sizes[key], []))[1].append(key)
        return tables

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"name": self.name, "time_unit": self.time_unit}
        out["sequences"] = [dataclasses.asdict(s) for s in self.sequences]
        out["scenarios"] = [dataclasses.asdict(s) for s in self.scenarios]
        if self.shared_embeddings:
            out["shared_embeddings"] = {k: list(v) for k, v in self.shared_embeddings.items()}
        out.update(self.extra)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "<memory>") -> "DatasetSchema":
        return _parse(raw, source)

    @classmethod
    def load(cls, path_or_url: str) -> "DatasetSchema":
        """Reads ``dataset.yaml`` (a file path/URL, or a dataset root holding one) via fsspec."""
        import fsspec

        url = path_or_url
        if not url.endswith((".yaml", ".yml")):
            url = url.rstrip("/") + "/dataset.yaml"
        try:
            with fsspec.open(url, "rb") as fh:
                data = fh.read()
        except FileNotFoundError as exc:
            raise SchemaError(f"{url}: dataset.yaml not found") from exc
        except OSError as exc:  # e.g. a folder of that name
            raise SchemaError(f"{url}: cannot be read ({type(exc).__name__}: {exc})") from exc
        return _parse(load_yaml(data, url), url)


# -------------------------------------------------------------------- reading the YAML text
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated in one mapping (PyYAML keeps the last).

    Keys brought in by a ``<<: *anchor`` merge may be overridden, as YAML defines; only keys
    written twice in the same mapping are refused.
    """

    source = "<memory>"

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        first_line: Dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in first_line:
                    raise SchemaError(
                        f"{self.source}: line {line}: key {key!r} appears twice in one mapping "
                        f"(first at line {first_line[key]}); duplicate keys are not allowed"
                    )
                first_line[key] = line
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
        return super().construct_mapping(node, deep=deep)


def _expanded_nodes(root: yaml.Node, source: str, limit: int = MAX_YAML_NODES) -> int:
    """Node count of the document with every alias expanded; refuses cycles and huge counts.

    Counted on the composed node graph with memoisation, so a "billion laughs" file is
    refused in time linear in its size, before anything is constructed.
    """
    size: Dict[int, int] = {}
    active: set = set()  # nodes on the current path: meeting one again is a cycle
    stack: List[Tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        children: List[yaml.Node] = []
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        if done:
            active.discard(id(node))
            size[id(node)] = 1 + sum(size[id(c)] for c in children)
            if size[id(node)] > limit:
                raise SchemaError(
                    f"{source}: line {node.start_mark.line + 1}: YAML expands to more than {limit} "
                    "nodes (anchors/aliases included); refused"
                )
            continue
        if id(node) in size:
            continue
        if id(node) in active:
            raise SchemaError(f"{source}: line {node.start_mark.line + 1}: recursive YAML alias; refused")
        active.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)
    return size[id(root)]


def load_yaml(data: bytes | str, source: str = "<memory>") -> Any:
    """Parses dataset.yaml text strictly: UTF-8, one document, no duplicate keys, and at most
    ``MAX_YAML_NODES`` nodes after alias expansion.

    Raises:
        SchemaError: naming ``source`` (and the line where YAML tells it).
    """
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise SchemaError(f"{source}: not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    try:
        loader = _StrictLoader(data)  # reading the text already refuses non-printable characters
    except yaml.YAMLError as exc:
        raise SchemaError(f"{source}: not valid YAML: {exc}") from exc
    loader.source = source
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_nodes(node, source)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise SchemaError(f"{source}: not valid YAML: {exc}") from exc
    except RecursionError as exc:
        raise SchemaError(f"{source}: YAML nested too deeply") from exc
    finally:
        loader.dispose()


# -------------------------------------------------------------------- checking the mapping
_QUOTE = " (YAML reads unquoted yes/no/on/off/null and numbers as non-strings: quote it)"


def _got(value: Any) -> str:
    return f"got {type(value).__name__} {value!r}"


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def valid_name(name: Any) -> bool:
    """True for a scenario/sequence/feature/task/table name (``NAME_RULE``)."""
    return isinstance(name, str) and _NAME.match(name) is not None and "__" not in name


def mangled_table_name(name: str) -> str:
    """The parameter-safe name of an embedding table in the model (a KJT key or a
    ``shared_embeddings`` name): ``/`` -> ``__``, since torch parameter names may hold no ``/``."""
    return "t__" + name.replace("/", "__")


def mangling_collisions(names: Sequence[str]) -> List[List[str]]:
    """Groups of distinct table names that :func:`mangled_table_name` maps to one name."""
    groups: Dict[str, List[str]] = {}
    for name in dict.fromkeys(names):
        groups.setdefault(mangled_table_name(name), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


class _Checker:
    """Type and key checks whose errors read ``<source>: <place>: <rule>``."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, rule: str) -> SchemaError:
        return SchemaError(f"{self.source}: {where}: {rule}")

    def keys(
        self,
        where: str,
        raw: Mapping[Any, Any],
        allowed: Sequence[str],
        required: Sequence[str] = (),
        extension: bool = False,
    ) -> None:
        """Refuses a non-string or unknown key (naming the nearest valid one) and a missing one."""
        for key in raw:
            if not isinstance(key, str):
                raise self.fail(_join(where, str(key)), f"keys must be strings, {_got(key)}{_QUOTE}")
            if key in allowed or (extension and key.startswith(EXTENSION_PREFIX)):
                continue
            near = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
            hint = f"did you mean {near[0]!r}? " if near else ""
            own = f"; or {EXTENSION_PREFIX}<anything> for your own" if extension else ""
            raise self.fail(_join(where, key), f"unknown key ({hint}valid keys: {', '.join(allowed)}{own})")
        for key in required:
            if key not in raw:
                raise self.fail(_join(where, key), "required key is missing")

    def mapping(self, where: str, value: Any, what: str) -> Mapping[Any, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(where, f"must map {what}, {_got(value)}")
        return value

    def listed(self, where: str, value: Any, what: str) -> List[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(where, f"must be a list of {what}, {_got(value)}")
        return value

    def integer(self, where: str, value: Any, minimum: Optional[int] = None) -> int:
        ok = isinstance(value, int) and not isinstance(value, bool)  # YAML true is no int
        if not ok or (minimum is not None and value < minimum):
            want = {None: "an int", 0: "a non-negative int", 1: "a positive int"}.get(
                minimum, f"an int >= {minimum}"
            )
            raise self.fail(where, f"must be {want}, {_got(value)}")
        return value

    def at_most(self, where: str, value: int, maximum: int, text: str, what: str = "") -> int:
        if value > maximum:
            raise self.fail(where, f"{what}{value} is above {text}")
        return value

    def string(self, where: str, value: Any) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"must be a string, {_got(value)}")
        return value

    def name(self, where: str, value: Any, dataset: bool = False) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"a name must be a string, {_got(value)}{_QUOTE}")
        ok = _DATASET_NAME.match(value) is not None if dataset else valid_name(value)
        if not ok:
            rule = DATASET_NAME_RULE if dataset else NAME_RULE
            raise self.fail(where, f"{value!r} is not a valid name (must be {rule})")
        return value

    def names(self, where: str, value: Any, what: str) -> List[str]:
        return [self.name(f"{where}[{i}]", v) for i, v in enumerate(self.listed(where, value, what))]

    def vocab(self, where: str, value: Any) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for column, size in self.mapping(where, value, "column -> vocabulary size").items():
            self.name(where, column)
            ok = isinstance(size, int) and not isinstance(size, bool) and size >= 1
            if not ok:
                raise self.fail(f"{where}.{column}", f"vocabulary size must be a positive int, {_got(size)}")
            self.at_most(
                f"{where}.{column}",
                size,
                MAX_VOCABULARY_SIZE,
                "2**63 - 2 (ids and table rows are int64)",
                "vocabulary size ",
            )
            out[column] = size
        return out


def _place(kind: str, i: int, entry: Any) -> str:
    """``scenarios.feed`` when the entry has a valid name, else ``scenarios[0]``."""
    name = entry.get("name") if isinstance(entry, Mapping) else None
    return f"{kind}.{name}" if valid_name(name) else f"{kind}[{i}]"


def _sequence(check: _Checker, i: int, seq: Any) -> SequenceSpec:
    where = _place("sequences", i, seq)
    if not isinstance(seq, Mapping):
        raise check.fail(where, f"must be a mapping with {', '.join(SEQUENCE_KEYS)}, {_got(seq)}")
    check.keys(where, seq, SEQUENCE_KEYS, required=("name", "kind", "max_len", "features"))
    name = check.name(f"{where}.name", seq["name"])
    kind = seq["kind"]
    if kind not in SEQUENCE_KINDS:
        raise check.fail(f"{where}.kind", f"must be one of {SEQUENCE_KINDS}, {_got(kind)}")
    max_len = check.integer(f"{where}.max_len", seq["max_len"], minimum=1)
    check.at_most(f"{where}.max_len", max_len, MAX_SEQUENCE_LENGTH, "2**63 - 1 (aggregation counts in int64)")
    features = check.vocab(f"{where}.features", seq["features"])
    if not features:
        raise check.fail(f"{where}.features", "a sequence needs at least one categorical feature")
    reserved = sorted(set(features) & set(RESERVED_BEHAVIOR_COLUMNS))
    if reserved:
        raise check.fail(where, f"reserved column names used as features: {reserved}")
    return SequenceSpec(name, kind, max_len, features)


def _scenario(check: _Checker, i: int, sc: Any) -> ScenarioSpec:
    where = _place("scenarios", i, sc)
    if not isinstance(sc, Mapping):
        raise check.fail(where, f"must be a mapping with {', '.join(SCENARIO_KEYS)}, {_got(sc)}")
    check.keys(where, sc, SCENARIO_KEYS, required=("name", "tasks"))
    tasks = check.names(f"{where}.tasks", sc["tasks"], "task (0/1 label column) names")
    if not tasks:
        raise check.fail(f"{where}.tasks", "a scenario needs at least one task")
    spec = ScenarioSpec(
        name=check.name(f"{where}.name", sc["name"]),
        user_features=check.vocab(f"{where}.user_features", sc.get("user_features")),
        item_features=check.vocab(f"{where}.item_features", sc.get("item_features")),
        cross_features=check.vocab(f"{where}.cross_features", sc.get("cross_features")),
        dense_features=check.names(f"{where}.dense_features", sc.get("dense_features"), "float column names"),
        tasks=tasks,
    )
    columns = [c for _, c, _ in spec.categorical()] + spec.dense_features + spec.tasks
    dup = sorted({c for c in columns if columns.count(c) > 1})
    if dup:
        raise check.fail(where, f"columns declared twice: {dup}")
    reserved = sorted(set(columns) & set(RESERVED_EXPOSURE_COLUMNS))
    if reserved:
        raise check.fail(where, f"reserved column names used as features: {reserved}")
    return spec


def _extras(check: _Checker, raw: Mapping[str, Any]) -> Dict[str, Any]:
    """The documented extra keys (type-checked) and ``x_*`` keys (free), in file order."""
    extra: Dict[str, Any] = {}
    for key, value in raw.items():
        if key in TOP_KEYS:
            continue
        want = EXTRA_KEYS.get(key)  # None: an x_* key, kept as written
        if want == "int":
            check.integer(key, value)
        elif want == "non-negative int":
            check.integer(key, value, minimum=0)
        elif want == "string":
            check.string(key, value)
        elif want == "mapping" and not isinstance(value, Mapping):
            raise check.fail(key, f"must be a mapping, {_got(value)}")
        extra[key] = value
    return extra


def _shared_embeddings(check: _Checker, value: Any, schema: DatasetSchema) -> Dict[str, List[str]]:
    shared = check.mapping("shared_embeddings", value, "table name -> list of feature keys")
    sizes = schema.sparse_feature_sizes()
    seen: Dict[str, str] = {}
    out: Dict[str, List[str]] = {}
    for table, keys in shared.items():
        check.name("shared_embeddings", table)
        where = f"shared_embeddings.{table}"
        if not isinstance(keys, list) or len(keys) < 2:
            raise check.fail(
                where, "must list at least two feature keys (seq/<q>/<f> or exp/<s>/<group>/<f>)"
            )
        for key in keys:
            if not isinstance(key, str) or key not in sizes:
                raise check.fail(where, f"{key!r} is not a declared feature key; known: {sorted(sizes)}")
            if key in seen:
                raise check.fail(where, f"{key!r} is already shared in table {seen[key]!r}")
            seen[key] = table
        if len({sizes[k] for k in keys}) > 1:
            raise check.fail(
                where, f"keys of one table need one vocabulary size, got {[sizes[k] - 1 for k in keys]}"
            )
        out[table] = list(keys)
    return out


def _parse(raw: Any, source: str) -> DatasetSchema:
    """Checks a loaded ``dataset.yaml`` mapping and builds its schema, in phases: the top-level
    keys and time unit; each sequence and scenario (:func:`_sequence`, :func:`_scenario`) and
    their names' uniqueness; the extra keys and ``shared_embeddings`` (which need the declared
    features); last, the guards on the whole: the R lookback in the ts range and table names
    that stay distinct once mangled.

    Raises:
        SchemaError: ``<source>: <place>: <rule>`` for the first problem found.
    """
    check = _Checker(source)
    if not isinstance(raw, Mapping):
        raise check.fail("<top>", "must be a mapping with name, time_unit, sequences, scenarios")
    check.keys("", raw, TOP_KEYS + tuple(EXTRA_KEYS), required=("scenarios",), extension=True)
    time_unit = check.string("time_unit", raw.get("time_unit", "s"))
    if time_unit not in TIME_UNITS:
        raise check.fail("time_unit", f"must be one of {sorted(TIME_UNITS)}, got {time_unit!r}")
    seqs = check.listed("sequences", raw.get("sequences"), "sequence mappings")
    sequences = [_sequence(check, i, seq) for i, seq in enumerate(seqs)]
    scens = check.listed("scenarios", raw["scenarios"], "scenario mappings")
    scenarios = [_scenario(check, i, sc) for i, sc in enumerate(scens)]
    if not scenarios:
        raise check.fail("scenarios", "at least one scenario is required")
    for kind, names in (("sequence", [s.name for s in sequences]), ("scenario", [s.name for s in scenarios])):
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise check.fail(f"{kind}s", f"duplicate names {dup}")
    schema = DatasetSchema(
        name=check.name("name", raw.get("name", "dataset"), dataset=True),
        time_unit=time_unit,
        sequences=sequences,
        scenarios=scenarios,
        source=source,
        extra=_extras(check, raw),
    )
    schema = dataclasses.replace(
        schema, shared_embeddings=_shared_embeddings(check, raw.get("shared_embeddings"), schema)
    )
    lookback = schema.extra.get("recommended_realtime_lookback_seconds", 0)
    if lookback * schema.ticks_per_second > MAX_LOOKBACK_TICKS:
        raise check.fail(
            "recommended_realtime_lookback_seconds",
            f"{lookback} s is more than 2**62 ticks ({time_unit}), beyond the ts safe range",
        )
    collisions = mangling_collisions(list(schema.embedding_tables()))
    if collisions:  # unreachable with NAME_RULE names; kept as the guard the model relies on
        raise check.fail("embedding tables", f"names collide after '/' -> '__' mangling: {collisions}")
    return schema


def fold_ids(values: np.ndarray, size: int, null_mask: np.ndarray | None = None) -> np.ndarray:
    """Folds raw categorical ids into ``[0, size]`` deterministically.

    * ``0 <= v < size``: kept.
    * any other int (negative or too large): ``v mod size`` (Python/numpy floor modulo, so it is
      always in ``[0, size)``); the same raw id always lands on the same row.
    * null: ``size``, the dedicated "missing" row.

    Args:
        values: int64 array of raw ids (values under ``null_mask`` are ignored).
        size: declared vocabulary size.
        null_mask: True where the raw value was null.
    """
    out = np.mod(values.astype(np.int64, copy=False), size)
    if null_mask is not None and null_mask.any():
        out = np.where(null_mask, size, out)
    return out
