"""Typed dataclasses from YAML mappings: the parsing half of the config system.

``from_dict`` builds a dataclass from a mapping (unknown keys, wrong types and values outside a
``Literal[...]`` are :class:`ConfigError` naming the file or override and the dotted key);
``apply_overrides`` applies dotted ``key=value`` strings; ``read_yaml`` resolves a file's
``base:`` chain. This module imports nothing else of the project, so a section owner (the
aggregation, say) can parse its own config without pulling in the model and training configs;
``mtfm_rec.config`` assembles the whole job's :class:`~mtfm_rec.config.Config` from it.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the dataclasses."""


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Converts a YAML value to the annotated type, or raises ConfigError naming ``where``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin is Literal:  # enum-like fields: one of the listed values, named in the error
        if value in args and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be one of {args}, got {value!r}")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be {value!r}")
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):  # a dataclass type, not an instance
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {hint.__name__}, got {value!r}")
        return from_dict(hint, value, where)
    if origin in (list, List, Sequence, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an int, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: Type[T], raw: Mapping[str, Any], where: str = "config") -> T:
    """Builds dataclass ``cls`` from a mapping; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_diff(
    then: Dict[str, Any], now: Dict[str, Any], defaults: Optional[Dict[str, Any]] = None
) -> Dict[str, Tuple[Any, Any]]:
    """The dotted keys whose values differ between two nested config dicts (a key missing on one
    side reads None there): ``{"model.d_model": (32, 64)}``. A key missing from ``then`` reads its
    value in ``defaults`` if given: a config saved before a field was added ran as its default
    (a new field's default keeps the old behaviour)."""
    a, b = _flatten(_merge(defaults, then) if defaults else then), _flatten(now)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def _flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:  # lists and scalars are leaves
            out[f"{prefix}{key}"] = value
    return out


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Applies ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return raw


def _merge(base: Dict[str, Any], over: Mapping[str, Any]) -> Dict[str, Any]:
    """``over`` merged into ``base`` recursively (mappings merge, anything else replaces)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str, _seen: Sequence[str] = ()) -> Dict[str, Any]:
    """Reads a config file, resolving its ``base:`` chain (paths relative to the file)."""
    real = os.path.realpath(path)
    if real in _seen:
        raise ConfigError(f"{path}: base chain loops back to itself")
    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}.base: expected a path, got {base!r}")
    base_path = os.path.join(os.path.dirname(path), base)
    return _merge(read_yaml(base_path, list(_seen) + [real]), raw)
