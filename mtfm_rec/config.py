"""Typed dataclass configs loaded from YAML with dotted ``key=value`` overrides.

    cfg = load_config("configs/ml1m_genre.yaml", ["train.lr=1e-3", "model.num_blocks=2"])

Every section is a dataclass owned by the package that uses it (``data``, ``model``,
``training``; the YAML section is ``train``). A file may start from another with a top-level
``base: <path relative to this file>``: the base is loaded first and this file's keys are merged
over it, section by section (e.g. a scenario-mix config on top of ``mtfm_small.yaml``). Unknown
keys and values of the wrong type are errors that name the file (or the override) and the dotted
key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from mtfm_rec.config_parsing import ConfigError, apply_overrides, from_dict, read_yaml, to_dict
from mtfm_rec.data.config import DataConfig
from mtfm_rec.model.config import ModelConfig
from mtfm_rec.training.config import TrainConfig


@dataclass
class Config:
    """The whole job: what data, which model, how to train."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Loads ``path`` (YAML, with its ``base:`` chain; None for all defaults), then applies
    dotted overrides."""
    raw = read_yaml(path) if path else {}
    apply_overrides(raw, overrides)
    return from_dict(Config, raw, path or "config")


# ConfigError and to_dict are part of this module's API (callers catch the one, serialise with
# the other); they live in mtfm_rec.config_parsing with the rest of the parsing.
__all__ = ["Config", "ConfigError", "load_config", "to_dict"]
