"""Run logging on rank 0: CSV, TensorBoard scalars, and loss / AUC curves as PNG.

Every scalar goes through :meth:`RunLogger.log` with a tag (``train/loss``, ``valid/auc``,
``perf/samples_per_s`` ...) and a step; the CSV (``<run_dir>/log.csv``: step, tag, value,
wall time) is the durable record the plots are drawn from, so a resumed run appends to it and
its curves continue where the killed run stopped. :meth:`RunLogger.resume_from` (called with
the step a run starts from) first drops the rows the killed run wrote after that step, which
the resumed run writes again, so that the CSV has each step once; TensorBoard's event files
cannot be rewritten, so the next writer is opened with ``purge_step`` and TensorBoard hides
the old events of those steps.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, TextIO, Tuple

if TYPE_CHECKING:  # tensorboard is optional at run time, imported on first use
    from torch.utils.tensorboard import SummaryWriter

CSV_NAME = "log.csv"
HEADER = ["step", "tag", "value", "time"]

logger = logging.getLogger(__name__)


def _wait_for_a_later_event_file_name(tb_dir: str) -> None:
    """Waits (at most a second) until a new event file would sort after every existing one.

    TensorBoard reads a directory's event files in name order, and a name is
    ``events.out.tfevents.<second>.<host>.<pid>.<writer counter>``: two writers opened in the
    same second and process sort by the counter as text (``.10`` before ``.9``), which would put
    the purging writer's events before those it purges. A later second sorts first, whatever the
    rest of the name.
    """
    seconds = [
        int(name.split(".")[3])
        for name in (os.listdir(tb_dir) if os.path.isdir(tb_dir) else [])
        if name.startswith("events.out.tfevents.") and name.split(".")[3].isdigit()
    ]
    if seconds:
        delay = max(seconds) + 1 - time.time()
        if delay > 0:
            time.sleep(delay)


class RunLogger:
    """Writes scalars; a no-op on ranks other than 0 (``enabled=False``)."""

    def __init__(self, run_dir: str, enabled: bool = True, tensorboard: bool = True) -> None:
        self.run_dir = run_dir
        self.enabled = enabled
        self._tb: Optional[SummaryWriter] = None
        self._tb_wanted = tensorboard
        self._purge_step: Optional[int] = None
        self._csv: Optional[TextIO] = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._open_csv()

    def _open_csv(self) -> None:
        path = os.path.join(self.run_dir, CSV_NAME)
        fresh = not os.path.exists(path) or os.path.getsize(path) == 0
        fh = open(path, "a", newline="")
        self._csv = fh
        self._writer = csv.writer(fh)
        if fresh:
            self._writer.writerow(HEADER)
            fh.flush()

    def _tensorboard(self) -> Optional[SummaryWriter]:
        """The SummaryWriter, opened on first use (after :meth:`resume_from` set purge_step)."""
        if self._tb is None and self._tb_wanted:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional at run time
                self._tb_wanted = False
                return None
            tb_dir = os.path.join(self.run_dir, "tb")
            if self._purge_step is not None:
                _wait_for_a_later_event_file_name(tb_dir)
            self._tb = SummaryWriter(tb_dir, purge_step=self._purge_step)
        return self._tb

    def resume_from(self, step: int) -> int:
        """Forgets what an earlier run logged after ``step``: the run (re)starts there.

        Rewrites ``log.csv`` (atomically) without the rows of steps ``> step`` and without
        unparsable rows (a line cut short by a crash), and opens the next TensorBoard writer
        with ``purge_step=step + 1``, so TensorBoard hides the earlier events of those steps.

        Returns:
            The number of rows dropped from the CSV.
        """
        if not self.enabled:
            return 0
        assert self._csv is not None
        self._csv.close()
        path = os.path.join(self.run_dir, CSV_NAME)
        with open(path, newline="") as fh:
            rows = [row for row in csv.reader(fh) if row != HEADER]
        steps = [_row_step(row) for row in rows]
        kept = [row for row, s in zip(rows, steps) if s is not None and s <= step]
        dropped = len(rows) - len(kept)
        if dropped:
            tmp = f"{path}.tmp"
            with open(tmp, "w", newline="") as fh:
                csv.writer(fh).writerows([HEADER] + kept)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            logger.warning(
                "%s: dropped %d rows of steps after %d (or cut short) left by an earlier run",
                path,
                dropped,
                step,
            )
        self._open_csv()
        if self._tb is not None:  # already writing: the purge needs a new writer
            self._tb.close()
            self._tb = None
        self._purge_step = step + 1
        return dropped

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        now = time.time()
        tb = self._tensorboard()
        for tag, value in scalars.items():
            self._writer.writerow([step, tag, f"{float(value):.6g}", f"{now:.3f}"])
            if tb is not None:
                tb.add_scalar(tag, float(value), step)
        assert self._csv is not None  # opened by __init__ on an enabled logger
        self._csv.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._csv is not None:
            self._csv.close()
            self._csv = None


def _row_step(row: List[str]) -> Optional[int]:
    """The step of a ``log.csv`` row, or None if the row is not a whole one."""
    if len(row) != len(HEADER):
        return None
    try:
        float(row[2])
        return int(row[0])
    except ValueError:
        return None


def read_log(run_dir: str) -> Dict[str, List[Tuple[int, float]]]:
    """tag -> [(step, value)] from ``log.csv`` (the last value wins for a repeated step)."""
    series: Dict[str, Dict[int, float]] = defaultdict(dict)
    path = os.path.join(run_dir, CSV_NAME)
    if not os.path.exists(path):
        return {}
    with open(path, newline="") as fh:
        for row in csv.reader(fh):
            step = _row_step(row)
            if step is not None:  # not the header, nor a line a crash cut short
                series[row[1]][step] = float(row[2])
    return {tag: sorted(points.items()) for tag, points in series.items()}


def plot_curves(run_dir: str, out_name: str = "curves.png") -> Optional[str]:
    """Draws train/valid loss and valid AUC/GAUC against step into ``<run_dir>/<out_name>``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_log(run_dir)
    panels: List[Tuple[str, List[str]]] = [
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
