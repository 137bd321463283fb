"""Reading ``dataset.yaml`` strictly and checking it into a :class:`DatasetSchema`.

Two steps, each refusing with a :class:`SchemaError` that names the file and the place:

* the YAML text (:func:`load_yaml`): UTF-8, one document, no key repeated in one mapping, at most
  ``MAX_YAML_NODES`` nodes with every alias expanded;
* the mapping (:func:`parse`): known keys only (the nearest valid one named), types, names
  (``NAME_RULE``), sizes within int64 arithmetic, the multi-hot form of a scenario feature
  (``{size: N, pooling: sum|mean}``, never in a sequence), reserved columns, unique names, the
  documented extra keys and ``shared_embeddings``, the R lookback in the ts range.

The schema objects themselves are in :mod:`mtfm_rec.data.schema`, whose
``DatasetSchema.from_dict`` and ``DatasetSchema.load`` call into this module. It stays one
module, under 500 lines: the two steps are one contract, that of ``dataset.yaml``, share
its error format, and neither is used without the other.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from mtfm_rec.data.schema import (
    FEATURE_GROUPS,
    POOLINGS,
    SEQUENCE_KINDS,
    TIME_UNITS,
    DatasetSchema,
    MultiHotFeature,
    ScenarioSpec,
    SchemaError,
    SequenceSpec,
    mangling_collisions,
)

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
MULTI_HOT_KEYS = ("size", "pooling")  # the mapping form of a multi-hot scenario feature
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

    def size(self, where: str, size: Any) -> int:
        """A vocabulary size: a positive int that int64 ids and table rows can hold."""
        ok = isinstance(size, int) and not isinstance(size, bool) and size >= 1
        if not ok:
            raise self.fail(where, f"vocabulary size must be a positive int, {_got(size)}")
        return self.at_most(
            where, size, MAX_VOCABULARY_SIZE, "2**63 - 2 (ids and table rows are int64)", "vocabulary size "
        )

    def vocab(self, where: str, value: Any) -> Dict[str, int]:
        """A sequence's ``column -> vocabulary size`` (one id per action: no multi-hot form)."""
        out: Dict[str, int] = {}
        for column, size in self.mapping(where, value, "column -> vocabulary size").items():
            self.name(where, column)
            if isinstance(size, Mapping):
                raise self.fail(
                    f"{where}.{column}",
                    "a sequence feature is one id per action: the multi-hot form "
                    "{size: N, pooling: sum|mean} is only for scenario features "
                    "(user_features, item_features, cross_features)",
                )
            out[column] = self.size(f"{where}.{column}", size)
        return out

    def features(
        self, where: str, value: Any, group: str
    ) -> Tuple[Dict[str, int], Dict[str, MultiHotFeature]]:
        """A scenario group's features: (single-id column -> size, multi-hot column -> spec).

        A value is a vocabulary size, or the mapping ``{size: N, pooling: sum|mean}`` that makes
        the column multi-hot (a ``list<int64>`` column).
        """
        single: Dict[str, int] = {}
        multi: Dict[str, MultiHotFeature] = {}
        for column, size in self.mapping(where, value, "column -> vocabulary size").items():
            self.name(where, column)
            place = f"{where}.{column}"
            if not isinstance(size, Mapping):
                single[column] = self.size(place, size)
                continue
            self.keys(place, size, MULTI_HOT_KEYS, required=MULTI_HOT_KEYS)
            pooling = size["pooling"]
            if pooling not in POOLINGS:
                raise self.fail(
                    f"{place}.pooling",
                    f"a multi-hot feature's pooling must be one of {POOLINGS}, {_got(pooling)}",
                )
            multi[column] = MultiHotFeature(group, self.size(f"{place}.size", size["size"]), pooling)
        return single, multi


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
    name = check.name(f"{where}.name", sc["name"])
    single: Dict[str, Dict[str, int]] = {}
    multi: Dict[str, MultiHotFeature] = {}
    columns: List[str] = []
    for group in FEATURE_GROUPS:
        key = f"{group}_features"
        single[group], group_multi = check.features(f"{where}.{key}", sc.get(key), group)
        columns += list(single[group]) + list(group_multi)  # a column in two groups: refused below
        multi.update(group_multi)
    dense = check.names(f"{where}.dense_features", sc.get("dense_features"), "float column names")
    columns += dense + tasks
    dup = sorted({c for c in columns if columns.count(c) > 1})
    if dup:
        raise check.fail(where, f"columns declared twice: {dup}")
    reserved = sorted(set(columns) & set(RESERVED_EXPOSURE_COLUMNS))
    if reserved:
        raise check.fail(where, f"reserved column names used as features: {reserved}")
    return ScenarioSpec(
        name=name,
        user_features=single["user"],
        item_features=single["item"],
        cross_features=single["cross"],
        dense_features=dense,
        tasks=tasks,
        multi_hot_features=multi,
    )


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
    # a multi-hot feature's table is in the EmbeddingBagCollection, which shares none with the EC
    multi_hot = {
        f"{p}/{s.name}/{g}/{c}"
        for s in schema.scenarios
        for g, c, _, _ in s.multi_hot()
        for p in ("exp", "bag")
    }
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
            if isinstance(key, str) and key in multi_hot:
                raise check.fail(
                    where, f"{key!r} is a multi-hot feature: it has a table of its own and shares none"
                )
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


def parse(raw: Any, source: str) -> DatasetSchema:
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
    collisions = mangling_collisions(list(schema.embedding_tables()) + list(schema.embedding_bag_tables()))
    if collisions:  # unreachable with NAME_RULE names; kept as the guard the model relies on
        raise check.fail("embedding tables", f"names collide after '/' -> '__' mangling: {collisions}")
    return schema
