"""Benchmarks (``make bench``): each area has a module here with

    def run(quick: bool) -> dict          # measures, returns JSON-able results
    def render(result: dict) -> str       # a markdown section for docs/BENCHMARKS.md
    def plot(result: dict, path: str)     # optional: a PNG drawn from the JSON when the report is
                                          # rendered; render() finds its path in result["plot"]

``python -m mtfm_rec.bench [--only NAME ...] [--quick]`` runs them, writes
``docs/bench/<name>.json`` (``<name>-cuda.json`` on a machine with a GPU, so CPU and GPU results
sit side by side) and regenerates ``docs/BENCHMARKS.md`` from every JSON there.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
from typing import Any, Dict

# Order of sections in docs/BENCHMARKS.md; a module that does not exist yet is skipped. "peak"
# (the matmul peak, MFU's denominator) runs first; "model" reuses its fp32 measurement (cached).
SUITES = (
    "peak",
    "aggregation",
    "model",
    "kernels",
    "onetrans_cpu_path",
    "cpu_path",
    "training",
    "quality",
    "baselines",
    "table2",
    "serving",
)
# Run only when named (``--only baselines``): they report a long experiment run by its own target
# (``make compare``, ``make compare-genre``); their section is rendered whenever their JSON exists.
ON_DEMAND = ("baselines", "table2")


def machine_name(m: Dict[str, Any]) -> str:
    """How a report names a :func:`machine`: its GPU if it had one, else ``<cpu> (<n> cores)``."""
    return m.get("gpu") or f"{m.get('cpu')} ({m.get('cores')} cores)"


def machine() -> Dict[str, Any]:
    """The machine a measurement ran on (CPU model, cores, torch, Python, date; the GPU if any),
    which every report names."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": dt.date.today().isoformat(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
