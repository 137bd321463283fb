"""Run logging on rank 0: CSV, TensorBoard scalars, and loss / AUC curves as PNG.

Every scalar goes through :meth:`RunLogger.log` with a tag (``train/loss``, ``valid/auc``,
``perf/samples_per_s`` ...) and a step; the CSV (``<run_dir>/log.csv``: step, tag, value,
wall time) is the durable record the plots are drawn from, so a resumed run appends to it and
its curves continue where the killed run stopped.
"""

from __future__ import annotations

import csv
import os
import time
from collections import defaultdict
from typing import Dict, List, Mapping, Optional, Tuple

CSV_NAME = "log.csv"


class RunLogger:
    """Writes scalars; a no-op on ranks other than 0 (``enabled=False``)."""

    def __init__(self, run_dir: str, enabled: bool = True, tensorboard: bool = True) -> None:
        self.run_dir = run_dir
        self.enabled = enabled
        self._tb = None
        self._csv = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, CSV_NAME)
        fresh = not os.path.exists(path)
        self._csv = open(path, "a", newline="")
        self._writer = csv.writer(self._csv)
        if fresh:
            self._writer.writerow(["step", "tag", "value", "time"])
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tb"))
            except ImportError:  # tensorboard is optional at run time
                self._tb = None

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        now = time.time()
        for tag, value in scalars.items():
            self._writer.writerow([step, tag, f"{float(value):.6g}", f"{now:.3f}"])
            if self._tb is not None:
                self._tb.add_scalar(tag, float(value), step)
        self._csv.flush()  # type: ignore[union-attr]

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._csv is not None:
            self._csv.close()
            self._csv = None


def read_log(run_dir: str) -> Dict[str, List[Tuple[int, float]]]:
    """tag -> [(step, value)] from ``log.csv`` (the last value wins for a repeated step)."""
    series: Dict[str, Dict[int, float]] = defaultdict(dict)
    path = os.path.join(run_dir, CSV_NAME)
    if not os.path.exists(path):
        return {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            series[row["tag"]][int(row["step"])] = float(row["value"])
    return {tag: sorted(points.items()) for tag, points in series.items()}


def plot_curves(run_dir: str, out_name: str = "curves.png") -> Optional[str]:
    """Draws train/valid loss and valid AUC/GAUC against step into ``<run_dir>/<out_name>``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_log(run_dir)
    panels = [
        ("loss", [t for t in ("train/loss", "valid/logloss") if t in series]),
        ("AUC", [t for t in ("valid/auc", "valid/gauc") if t in series]),
    ]
    panels = [(title, tags) for title, tags in panels if tags]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, tags) in zip(axes[0], panels):
        for tag in tags:
            steps, values = zip(*series[tag])
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=tag)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = os.path.join(run_dir, out_name)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
