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
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np
import yaml

HISTORY = "history"
REALTIME = "realtime"
SEQUENCE_KINDS = (HISTORY, REALTIME)
FEATURE_GROUPS = ("user", "item", "cross")
TIME_UNITS = {"s": 1, "ms": 1000}


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
        return [f"seq/{s.name}" for s in self.ordered_sequences] + [
            f"exp/{s.name}" for s in self.scenarios
        ]

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
            with fsspec.open(url, "r") as fh:
                raw = yaml.safe_load(fh)
        except FileNotFoundError as exc:
            raise SchemaError(f"{url}: dataset.yaml not found") from exc
        except yaml.YAMLError as exc:
            raise SchemaError(f"{url}: not valid YAML: {exc}") from exc
        return _parse(raw, url)


def _parse(raw: Any, source: str) -> DatasetSchema:
    def fail(where: str, rule: str) -> SchemaError:
        return SchemaError(f"{source}: {where}: {rule}")

    if not isinstance(raw, Mapping):
        raise fail("<top>", "must be a mapping with name, time_unit, sequences, scenarios")

    def vocab(where: str, value: Any) -> Dict[str, int]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise fail(where, "must map column -> vocabulary size")
        out: Dict[str, int] = {}
        for column, size in value.items():
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise fail(f"{where}.{column}", f"vocabulary size must be a positive int, got {size!r}")
            out[str(column)] = size
        return out

    time_unit = raw.get("time_unit", "s")
    if time_unit not in TIME_UNITS:
        raise fail("time_unit", f"must be one of {sorted(TIME_UNITS)}, got {time_unit!r}")
    sequences: List[SequenceSpec] = []
    for i, seq in enumerate(raw.get("sequences") or []):
        where = f"sequences[{i}]"
        if not isinstance(seq, Mapping) or "name" not in seq:
            raise fail(where, "must be a mapping with a name")
        kind = seq.get("kind")
        if kind not in SEQUENCE_KINDS:
            raise fail(f"{where}.kind", f"must be one of {SEQUENCE_KINDS}, got {kind!r}")
        max_len = seq.get("max_len")
        if not isinstance(max_len, int) or max_len < 1:
            raise fail(f"{where}.max_len", f"must be a positive int, got {max_len!r}")
        features = vocab(f"{where}.features", seq.get("features"))
        if not features:
            raise fail(f"{where}.features", "a sequence needs at least one categorical feature")
        sequences.append(SequenceSpec(str(seq["name"]), kind, max_len, features))
    scenarios: List[ScenarioSpec] = []
    for i, sc in enumerate(raw.get("scenarios") or []):
        where = f"scenarios[{i}]"
        if not isinstance(sc, Mapping) or "name" not in sc:
            raise fail(where, "must be a mapping with a name")
        tasks = list(sc.get("tasks") or [])
        if not tasks:
            raise fail(f"{where}.tasks", "a scenario needs at least one task")
        dense = [str(c) for c in (sc.get("dense_features") or [])]
        spec = ScenarioSpec(
            name=str(sc["name"]),
            user_features=vocab(f"{where}.user_features", sc.get("user_features")),
            item_features=vocab(f"{where}.item_features", sc.get("item_features")),
            cross_features=vocab(f"{where}.cross_features", sc.get("cross_features")),
            dense_features=dense,
            tasks=[str(t) for t in tasks],
        )
        columns = [c for _, c, _ in spec.categorical()] + dense + spec.tasks
        dup = sorted({c for c in columns if columns.count(c) > 1})
        if dup:
            raise fail(where, f"columns declared twice: {dup}")
        reserved = sorted(set(columns) & {"user_id", "ts", "request_id", "split"})
        if reserved:
            raise fail(where, f"reserved column names used as features: {reserved}")
        scenarios.append(spec)
    if not scenarios:
        raise fail("scenarios", "at least one scenario is required")
    for kind, names in (("sequence", [s.name for s in sequences]), ("scenario", [s.name for s in scenarios])):
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise fail(f"{kind}s", f"duplicate names {dup}")
        bad = [n for n in names if not n or "/" in n]
        if bad:
            raise fail(f"{kind}s", f"names must be non-empty and contain no '/': {bad}")
    known = {"name", "time_unit", "sequences", "scenarios", "shared_embeddings"}
    extra = {k: v for k, v in raw.items() if k not in known}
    schema = DatasetSchema(
        name=str(raw.get("name", "dataset")),
        time_unit=time_unit,
        sequences=sequences,
        scenarios=scenarios,
        source=source,
        extra=extra,
    )
    shared = raw.get("shared_embeddings") or {}
    if not isinstance(shared, Mapping):
        raise fail("shared_embeddings", "must map table name -> list of feature keys")
    sizes = schema.sparse_feature_sizes()
    seen: Dict[str, str] = {}
    for table, keys in shared.items():
        where = f"shared_embeddings.{table}"
        if not isinstance(keys, list) or len(keys) < 2:
            raise fail(where, "must list at least two feature keys (seq/<q>/<f> or exp/<s>/<group>/<f>)")
        for key in keys:
            if key not in sizes:
                raise fail(where, f"{key!r} is not a declared feature key; known: {sorted(sizes)}")
            if key in seen:
                raise fail(where, f"{key!r} is already shared in table {seen[key]!r}")
            seen[key] = str(table)
        if len({sizes[k] for k in keys}) > 1:
            raise fail(where, f"keys of one table need one vocabulary size, got {[sizes[k] - 1 for k in keys]}")
    return dataclasses.replace(schema, shared_embeddings={str(t): [str(k) for k in v] for t, v in shared.items()})


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

