"""The typed schema a dataset's ``dataset.yaml`` declares (``../shared/spec/raw-data.md``, docs/DATA.md).

The schema is the single source of truth for every shape in the framework: which sequences
become H and R tokens, which scenarios become T tokens with which features, which tasks each
scenario has, and how large each embedding table is. Adding a scenario is an entry here, never a
code change.

Categorical ids are folded into their table (see :func:`fold_ids`): a feature of declared size
``n`` owns a table of ``n + 1`` rows, row ``n`` being the "missing" row for nulls.

A scenario feature declared as ``{size: N, pooling: sum|mean}`` instead of a size is multi-hot
(:class:`MultiHotFeature`): a ``list<int64>`` column of several ids per exposure, looked up in an
``EmbeddingBagCollection`` and pooled into one vector. It is kept apart from the single-id
features: ``ScenarioSpec.user_features`` and its siblings, :meth:`ScenarioSpec.categorical` and
:meth:`DatasetSchema.sparse_feature_keys` hold the single-id ones only, and
:meth:`ScenarioSpec.multi_hot` / :meth:`DatasetSchema.bag_feature_keys` the multi-hot ones.

Reading and checking ``dataset.yaml`` is in :mod:`mtfm_rec.data.schema_parsing`.
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
POOLINGS = ("sum", "mean")  # how a multi-hot feature's rows are pooled into one vector
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
class MultiHotFeature:
    """A multi-hot scenario feature: a ``list<int64>`` column, several ids per exposure.

    Declared in dataset.yaml under its group as ``<column>: {size: N, pooling: sum|mean}``; its
    ids are folded as single ids are (:func:`fold_ids`, a null list is one "missing" id) and
    their ``size + 1``-row table's rows are pooled (summed or averaged) into one vector.
    """

    group: str  # user | item | cross
    size: int
    pooling: str  # one of POOLINGS

    def to_yaml_value(self) -> Dict[str, Any]:
        return {"size": self.size, "pooling": self.pooling}


@dataclass(frozen=True)
class ScenarioSpec:
    """One scenario's exposure log (``exposures/<name>/``) with its own feature schema.

    ``user_features`` / ``item_features`` / ``cross_features`` hold the single-id columns;
    the multi-hot ones of every group are in ``multi_hot_features`` (column -> spec, groups in
    FEATURE_GROUPS order), written back into their group by :meth:`to_dict`.
    """

    name: str
    user_features: Dict[str, int]
    item_features: Dict[str, int]
    cross_features: Dict[str, int]
    dense_features: List[str]
    tasks: List[str]  # 0/1 label columns in funnel order (a later task implies the earlier)
    multi_hot_features: Dict[str, MultiHotFeature] = field(default_factory=dict)

    def categorical(self) -> List[Tuple[str, str, int]]:
        """(group, column, size) for every single-id categorical feature, groups in
        FEATURE_GROUPS order (multi-hot features: :meth:`multi_hot`)."""
        out: List[Tuple[str, str, int]] = []
        for group in FEATURE_GROUPS:
            for column, size in getattr(self, f"{group}_features").items():
                out.append((group, column, size))
        return out

    def multi_hot(self) -> List[Tuple[str, str, int, str]]:
        """(group, column, size, pooling) for every multi-hot feature, groups in FEATURE_GROUPS
        order, then declaration order."""
        out: List[Tuple[str, str, int, str]] = []
        for group in FEATURE_GROUPS:
            for column, spec in self.multi_hot_features.items():
                if spec.group == group:
                    out.append((group, column, spec.size, spec.pooling))
        return out

    def to_dict(self) -> Dict[str, Any]:
        """The dataset.yaml entry: multi-hot features in their group, in the mapping form (so a
        scenario without any writes exactly what it always did)."""
        out: Dict[str, Any] = {"name": self.name}
        for group in FEATURE_GROUPS:
            features: Dict[str, Any] = dict(getattr(self, f"{group}_features"))
            for _, column, _, _ in (m for m in self.multi_hot() if m[0] == group):
                features[column] = self.multi_hot_features[column].to_yaml_value()
            out[f"{group}_features"] = features
        out["dense_features"] = list(self.dense_features)
        out["tasks"] = list(self.tasks)
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
        """KeyedJaggedTensor keys of a Batch's ``sparse_features``, in order (see
        mtfm_rec.data.batch); single-id features only."""
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

    def bag_feature_keys(self) -> List[str]:
        """KeyedJaggedTensor keys of a Batch's ``bag_features`` (multi-hot features), in order:
        ``bag/<scenario>/<group>/<column>``, scenarios in file order."""
        return [f"bag/{s.name}/{g}/{c}" for s in self.scenarios for g, c, _, _ in s.multi_hot()]

    @property
    def has_bag_features(self) -> bool:
        """Whether any scenario declares a multi-hot feature (the model then builds its
        EmbeddingBagCollection)."""
        return any(s.multi_hot_features for s in self.scenarios)

    def embedding_bag_tables(self) -> Dict[str, Tuple[int, str, List[str]]]:
        """Embedding-bag table name -> (rows, pooling, the one KJT key it serves), in KJT key
        order: every multi-hot feature has a table of its own, named after its key, of its
        declared size + 1 rows."""
        tables: Dict[str, Tuple[int, str, List[str]]] = {}
        for s in self.scenarios:
            for g, c, n, pooling in s.multi_hot():
                key = f"bag/{s.name}/{g}/{c}"
                tables[key] = (n + 1, pooling, [key])
        return tables

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"name": self.name, "time_unit": self.time_unit}
        out["sequences"] = [dataclasses.asdict(s) for s in self.sequences]
        out["scenarios"] = [s.to_dict() for s in self.scenarios]
        if self.shared_embeddings:
            out["shared_embeddings"] = {k: list(v) for k, v in self.shared_embeddings.items()}
        out.update(self.extra)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "<memory>") -> "DatasetSchema":
        """Checks a loaded ``dataset.yaml`` mapping (:func:`mtfm_rec.data.schema_parsing.parse`)."""
        from mtfm_rec.data.schema_parsing import parse  # it imports this module: import on use

        return parse(raw, source)

    @classmethod
    def load(cls, path_or_url: str) -> "DatasetSchema":
        """Reads ``dataset.yaml`` (a file path/URL, or a dataset root holding one) via fsspec."""
        import fsspec

        from mtfm_rec.data.schema_parsing import load_yaml, parse  # it imports this module

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
        return parse(load_yaml(data, url), url)


# -------------------------------------------------------------------- table names
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


# -------------------------------------------------------------------- ids
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
