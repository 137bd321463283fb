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
    jobs: Sequence[Job],
    root: str,
    launcher: Sequence[str] = (),
    env: Optional[Dict[str, str]] = None,
    parallel: int = 1,
) -> None:
    """Runs every unfinished job of ``jobs`` in order, up to ``parallel`` at a time, printing a
    line per job as it ends. Each job's output goes to ``<run_dir>/job.log``.

    With ``parallel`` > 1 the jobs' data is aggregated here first, once per data config (jobs
    starting together would each build the same cache), and each job gets its share of the
    machine: ``OMP_NUM_THREADS`` = cores // ``parallel`` unless ``env`` sets it, and on a GPU
    machine its own GPUs in ``CUDA_VISIBLE_DEVICES``. On a CPU two 1-thread jobs train more
    samples per second together than one 2-thread job (docs/EXPERIMENTS.md).

    Raises:
        ConfigError: ``parallel`` < 1, or fewer GPUs than ``parallel`` on a GPU machine.
        JobChangedError: a job's directory was run with another config; nothing is run.
        JobFailedError: a job failed; no job starts after it, the running ones finish, and the
            finished ones stay finished.
    """
    slots = slot_environments(parallel, env)
    for job in jobs:
        job.check_unchanged(root)
    todo = [j for j in jobs if not j.finished(root)]
    print(f"[experiments] {root}: {len(jobs) - len(todo)} of {len(jobs)} jobs already finished", flush=True)
    if parallel > 1 and len(todo) > 1:
        aggregate_once(todo, root)
    queue, ended = list(todo), 0
    running: Dict[int, _RunningJob] = {}  # slot -> its job
    failure: Optional[JobFailedError] = None
    while running or (queue and failure is None):
        for slot in [k for k in range(len(slots)) if k not in running]:
            if queue and failure is None:
                running[slot] = _RunningJob.start(queue.pop(0), root, launcher, slots[slot])
        time.sleep(0.2 if len(running) > 1 else 0)
        for slot, run in list(running.items()):
            if run.wait(block=len(running) == 1) is None:
                continue
            del running[slot]
            ended += 1
            try:
                print(f"[experiments] [{ended}/{len(todo)}] {run.result(root)}", flush=True)
            except JobFailedError as exc:
                failure = failure or exc
    if failure is not None:
        raise failure


@dataclass
class _RunningJob:
    """A job's training process, started with its output going to its ``job.log``."""

    job: Job
    process: subprocess.Popen
    log: str
    started: float

    @classmethod
    def start(
        cls, job: Job, root: str, launcher: Sequence[str], env: Optional[Dict[str, str]]
    ) -> "_RunningJob":
        os.makedirs(job.run_dir(root), exist_ok=True)
        log = os.path.join(job.run_dir(root), "job.log")
        cmd = job.command(root, launcher)
        with open(log, "a") as fh:
            fh.write(f"$ {shlex.join(cmd)}\n")
            fh.flush()
            process = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        return cls(job, process, log, time.perf_counter())

    def wait(self, block: bool) -> Optional[int]:
        """The exit code, or None while it runs (``block``: waits for it)."""
        return self.process.wait() if block else self.process.poll()

    def result(self, root: str) -> str:
        """``<name>: test AUC ..., <seconds> s``; raises :class:`JobFailedError` for a failed job."""
        rc, seconds = self.process.returncode, time.perf_counter() - self.started
        if rc != 0 or not self.job.finished(root):
            raise JobFailedError(
                f"job {self.job.name} failed (exit code {rc}) after {seconds:.0f} s; see {self.log}"
            )
        aucs = [m["auc"] for m in self.job.metrics(root).values() if not math.isnan(m.get("auc", math.nan))]
        result = f"test AUC {sum(aucs) / len(aucs):.4f} (mean of {len(aucs)})" if aucs else "no test AUC"
        return f"{self.job.name}: {result}, {seconds:.0f} s"


def slot_environments(parallel: int, env: Optional[Dict[str, str]] = None) -> List[Optional[Dict[str, str]]]:
    """The environment of each of ``parallel`` job slots (``[env]`` for one slot: as given).

    Raises:
        ConfigError: ``parallel`` < 1, or a GPU machine with fewer GPUs than slots (a slot
            without a GPU would train on the CPU without a word).
    """
    if parallel < 1:
        raise ConfigError(f"--parallel must be >= 1, got {parallel}")
    if parallel == 1:
        return [env]
    base = dict(os.environ if env is None else env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = base.get("OMP_NUM_THREADS") or str(max(1, cores // parallel))
    gpus = _visible_gpus(base)
    if gpus and len(gpus) < parallel:
        raise ConfigError(f"--parallel {parallel} needs a GPU per job, and {len(gpus)} are visible ({gpus})")
    slots: List[Optional[Dict[str, str]]] = []
    for k in range(parallel):
        slot = {**base, "OMP_NUM_THREADS": threads}
        if gpus:
            slot["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[k::parallel])
        slots.append(slot)
    return slots


def _visible_gpus(env: Dict[str, str]) -> List[str]:
    """The GPUs the jobs may use: ``CUDA_VISIBLE_DEVICES`` when set, else every CUDA device."""
    if "CUDA_VISIBLE_DEVICES" in env:
        return [g for g in env["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def aggregate_once(jobs: Sequence[Job], root: str) -> None:
    """Builds (or checks) the aggregated data of every distinct data config of ``jobs``, one
    after another, so that jobs started together find it ready."""
    from mtfm_rec.data.aggregate import ensure_aggregated

    seen = set()
    for job in jobs:
        data = load_config(job.config, [*job.overrides, f"train.run_dir={job.run_dir(root)}"]).data
        key = (data.raw, data.cache_dir, repr(data.aggregation))
        if data.raw and key not in seen:
            seen.add(key)
            out = ensure_aggregated(data.raw, data.cache_dir, data.aggregation)
            print(f"[experiments] data: {data.raw} -> {out}", flush=True)
