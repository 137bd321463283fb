"""The typed schema a dataset's ``dataset.yaml`` declares (``../shared/spec/raw-data.md``, docs/DATA.md).

The schema is the single source of truth for every shape in the framework: which sequences
become H and R tokens, which scenarios become T tokens with which features, which tasks each
scenario has, and how large each embedding table is. Adding a scenario is an entry here, never a
code change.

Categorical ids are folded into their table (see :func:`fold_ids`): a feature of declared size
``n`` owns a table of ``n + 1`` rows, row ``n`` being the "missing" row for nulls.

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
