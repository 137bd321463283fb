"""What every Triton-backed op shares: the optional import and the interpreter flag.

Triton is imported only when a ``triton`` backend is chosen (:func:`load`), so the ops' CPU paths
work where Triton is missing or broken; a forced ``triton`` backend that cannot run raises with
the reason instead of falling back silently.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch


def interpreted() -> bool:
    """Whether the Triton interpreter runs the kernels (``TRITON_INTERPRET=1``): CPU tensors are
    then accepted, and the kernels pick small tiles (correctness, not speed)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def load(module: str, name: str, op: str) -> Any:
    """``module.name``, a Triton implementation; a ``RuntimeError`` naming ``op`` if Triton (or
    the module) cannot be imported on this platform."""
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:  # triton missing or broken on this platform
        raise RuntimeError(f"{op} backend 'triton' unavailable: {exc}") from exc


def check_device(device: torch.device, what: str) -> None:
    """Raises unless the Triton kernels can run on ``device``: CUDA, or any device under the
    interpreter. ``what`` names the op in the message."""
    if device.type != "cuda" and not interpreted():
        raise RuntimeError(
            f"the Triton {what} needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); got {device}"
        )


__all__ = ["check_device", "interpreted", "load"]
