"""Model: heterogeneous tokenizer -> Hybrid Target Attention -> MMoE heads -> loss.

Public API (see docs/MODEL.md)::

    from mtfm_rec.model import MTFM, ModelConfig
    model = MTFM(schema, ModelConfig(...))
    loss, out = model(batch)

``MTFM`` and ``MTFMDense`` are imported on first use: ``mtfm_rec.config`` imports
``mtfm_rec.model.config``, and loading a config must not pull in torch and torchrec.
"""

from __future__ import annotations

from typing import Any

from mtfm_rec.model.config import ModelConfig

__all__ = ["MTFM", "MTFMDense", "ModelConfig"]


def __getattr__(name: str) -> Any:
    if name in ("MTFM", "MTFMDense"):
        from mtfm_rec.model import mtfm

        return getattr(mtfm, name)
    raise AttributeError(f"module 'mtfm_rec.model' has no attribute {name!r}")
