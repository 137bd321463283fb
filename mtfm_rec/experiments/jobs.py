"""Training jobs of an experiment: what each runs, whether it finished, running what is missing.

A job is finished when its run directory holds ``metrics.json`` (written last by
``mtfm_rec.train``, atomically). An unfinished job is (re-)started with the same command; the
trainer's ``train.resume=auto`` continues it from its newest checkpoint, so a killed
experiment neither repeats finished work nor loses a job's progress beyond its last checkpoint.

Reusing a job's directory is only right while the job is the same: before a job is reused
(finished) or resumed, the config its directory was run with (``config.yaml``, written by
``mtfm_rec.train`` at its start) must equal what the job resolves to now, or the experiment stops
with :class:`JobChangedError` naming the job and the settings that differ. So an edited YAML or
override never reports another config's numbers under its name. A field the config gained since
the run (missing from its ``config.yaml``) counts as its default, which keeps the old behaviour:
upgrading mtfm_rec does not orphan finished runs.
"""

from __future__ import annotations

import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import yaml

from mtfm_rec.config import Config, ConfigError, load_config, to_dict
from mtfm_rec.config_parsing import config_diff
from mtfm_rec.data.config import RECOMMENDED_SPLIT_KEYS
from mtfm_rec.training.metrics import MetricDict, read_metrics_json


@dataclass
class Job:
    """One training run of an experiment.

    Attributes:
        name: unique within the experiment, also its directory (``<experiment>/<name>``).
        config: the YAML config path.
        overrides: dotted ``key=value`` overrides (``train.run_dir`` is added by :meth:`command`).
        labels: what the report groups by (e.g. model, seed, scenario).
    """

    name: str
    config: str
    overrides: List[str]
    labels: Dict[str, str] = field(default_factory=dict)

    def run_dir(self, root: str) -> str:
        return os.path.join(root, self.name)

    def command(self, root: str, launcher: Sequence[str] = ()) -> List[str]:
        """The command line of this job (``launcher``: e.g. ``torchrun --nproc_per_node 8``)."""
        entry = list(launcher) if launcher else [sys.executable]
        job = ["--config", self.config, *self.overrides, f"train.run_dir={self.run_dir(root)}"]
        return entry + ["-m", "mtfm_rec.train", *job]

    def finished(self, root: str) -> bool:
        return os.path.exists(os.path.join(self.run_dir(root), "metrics.json"))

    def metrics(self, root: str, split: str = "test") -> MetricDict:
        """The job's metrics of ``split`` (``test`` or ``valid``)."""
        name = "metrics.json" if split == "test" else f"{split}_metrics.json"
        return read_metrics_json(os.path.join(self.run_dir(root), name))

    def check_unchanged(self, root: str) -> None:
        """Refuses a run directory that was run with another config (module docstring).

        Raises:
            JobChangedError: naming the job, each differing dotted key (then and now) and the fix.
        """
        path = os.path.join(self.run_dir(root), "config.yaml")
        if not os.path.exists(path):
            return  # never started: nothing to reuse
        with open(path) as fh:
            then = yaml.safe_load(fh) or {}
        run_dir = f"train.run_dir={self.run_dir(root)}"
        now = to_dict(load_config(self.config, [*self.overrides, run_dir]))
        changed = config_diff(then, now, defaults=to_dict(Config()))
        changed.pop("train.run_dir", None)  # where the runs directory lies is not the job
        for key in RECOMMENDED_SPLIT_KEYS:  # unset now: the run filled it from the dataset
            if changed.get(f"data.{key}", (None, 0))[1] is None:
                del changed[f"data.{key}"]
        if changed:
            diff = "; ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in changed.items())
            raise JobChangedError(
                f"job {self.name}: {path} was run with another config ({diff}); give the "
                "experiment a new --name, or delete that directory to re-run the job"
            )


class JobFailedError(RuntimeError):
    """A job's training process exited with an error (its log is named in the message)."""


class JobChangedError(ConfigError):
    """A job's directory holds a run of another config than the job's (see the module doc)."""


def run_jobs(
    jobs: Sequence[Job], root: str, launcher: Sequence[str] = (), env: Optional[Dict[str, str]] = None
) -> None:
    """Runs every unfinished job of ``jobs`` in order, one at a time, printing a line per job.

    Each job's output goes to ``<run_dir>/job.log``.

    Raises:
        JobChangedError: a job's directory was run with another config; nothing is run.
        JobFailedError: a job failed; the jobs before it stay finished.
    """
    for job in jobs:
        job.check_unchanged(root)
    todo = [j for j in jobs if not j.finished(root)]
    print(f"[experiments] {root}: {len(jobs) - len(todo)} of {len(jobs)} jobs already finished", flush=True)
    for i, job in enumerate(todo, 1):
        os.makedirs(job.run_dir(root), exist_ok=True)
        log = os.path.join(job.run_dir(root), "job.log")
        cmd = job.command(root, launcher)
        start = time.perf_counter()
        with open(log, "a") as fh:
            fh.write(f"$ {shlex.join(cmd)}\n")
            fh.flush()
            rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        seconds = time.perf_counter() - start
        if rc != 0 or not job.finished(root):
            raise JobFailedError(f"job {job.name} failed (exit code {rc}) after {seconds:.0f} s; see {log}")
        aucs = [m["auc"] for m in job.metrics(root).values() if not math.isnan(m.get("auc", math.nan))]
        result = f"test AUC {sum(aucs) / len(aucs):.4f} (mean of {len(aucs)})" if aucs else "no test AUC"
        print(f"[experiments] [{i}/{len(todo)}] {job.name}: {result}, {seconds:.0f} s", flush=True)
