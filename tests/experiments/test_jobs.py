"""A job's run directory is reused only by the same job (``Job.check_unchanged``); jobs run one or
several at a time (``run_jobs``, ``slot_environments``)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Sequence

import pytest
import yaml

from mtfm_rec.config import ConfigError, load_config, to_dict
from mtfm_rec.experiments.jobs import Job, JobChangedError, JobFailedError, run_jobs, slot_environments

CONFIG = "configs/mtfm_small.yaml"


def _saved(tmp_path, job: Job, drop: str = "", **train) -> None:
    """Writes the job's ``config.yaml`` as ``mtfm_rec.train`` would, as an older version would
    have (without the ``train`` key ``drop``) or with other ``train`` values."""
    run_dir = job.run_dir(str(tmp_path))
    saved = to_dict(load_config(job.config, [*job.overrides, f"train.run_dir={run_dir}"]))
    saved["train"].pop(drop, None)
    saved["train"].update(train)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "config.yaml"), "w") as fh:
        yaml.safe_dump(saved, fh)


def test_the_same_config_is_reused(tmp_path) -> None:
    job = Job("mtfm/seed0", CONFIG, ["train.seed=0"])
    job.check_unchanged(str(tmp_path))  # never started: nothing to compare
    _saved(tmp_path, job)
    job.check_unchanged(str(tmp_path))


def test_another_setting_is_refused_naming_the_key(tmp_path) -> None:
    job = Job("mtfm/seed0", CONFIG, ["train.seed=0"])
    _saved(tmp_path, job, max_steps=7)
    with pytest.raises(JobChangedError, match=r"job mtfm/seed0: .* \(train.max_steps: 7 then, 1000 now\)"):
        job.check_unchanged(str(tmp_path))


def test_a_field_added_since_is_its_default_then(tmp_path) -> None:
    """A run saved before ``train.lr_step_gamma`` existed ran as its default: reused; asking now
    for another value is a change."""
    job = Job("mtfm/seed0", CONFIG, [])
    _saved(tmp_path, job, drop="lr_step_gamma")
    job.check_unchanged(str(tmp_path))
    changed = Job("mtfm/seed0", CONFIG, ["train.lr_step_gamma=0.5"])
    with pytest.raises(JobChangedError, match=r"train.lr_step_gamma: 0.85 then, 0.5 now"):
        changed.check_unchanged(str(tmp_path))


# ---- running jobs, several at once: run_jobs with stand-in training processes
_FAKE_TRAIN = """
import json, os, sys, time
run_dir, peers, fail, wait = sys.argv[1], sys.argv[2].split(","), sys.argv[3] == "fail", float(sys.argv[4])
open(os.path.join(run_dir, "started"), "w").close()
deadline = time.time() + wait  # waits for its peers' processes: only jobs run together see them
while time.time() < deadline and not all(os.path.exists(os.path.join(p, "started")) for p in peers if p):
    time.sleep(0.05)
seen = [p for p in peers if p and os.path.exists(os.path.join(p, "started"))]
env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")}
json.dump({"seen": seen, "env": env}, open(os.path.join(run_dir, "seen.json"), "w"))
if fail:
    sys.exit(3)
json.dump({"s/click": {"auc": 0.75, "count": 1}}, open(os.path.join(run_dir, "metrics.json"), "w"))
"""


class _FakeJob(Job):
    """A job whose process is the stand-in above: it records which peers ran beside it."""

    peers: List[str] = []
    fails: bool = False
    wait_s: float = 20.0  # how long it waits for its peers

    def command(self, root: str, launcher: Sequence[str] = ()) -> List[str]:
        peers = ",".join(os.path.join(root, p) for p in self.peers)
        status = "fail" if self.fails else "ok"
        return [sys.executable, "-c", _FAKE_TRAIN, self.run_dir(root), peers, status, str(self.wait_s)]


def _fake_jobs(
    names: Sequence[str], peers: Sequence[str] = (), failing: Sequence[str] = ()
) -> List[_FakeJob]:
    jobs = []
    for name in names:
        job = _FakeJob(name, CONFIG, [])
        job.peers, job.fails = [p for p in peers if p != name], name in failing
        jobs.append(job)
    return jobs


def _seen(tmp_path, name: str) -> Dict[str, Any]:
    return json.loads((tmp_path / name / "seen.json").read_text())


def test_parallel_jobs_run_together_each_with_its_share_of_the_cores(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a CPU machine
    run_jobs(_fake_jobs(["a", "b"], peers=["a", "b"]), str(tmp_path), parallel=2)
    for name, peer in (("a", "b"), ("b", "a")):
        seen = _seen(tmp_path, name)
        assert seen["seen"] == [str(tmp_path / peer)], "the two jobs did not run at the same time"
        cores = len(os.sched_getaffinity(0))
        assert seen["env"]["OMP_NUM_THREADS"] == str(max(1, cores // 2))
    out = capsys.readouterr().out
    assert "[1/2]" in out and "[2/2]" in out and "test AUC 0.7500" in out


def test_one_job_at_a_time_by_default(tmp_path) -> None:
    """Each job waits a second for the other: run one after the other, only the second sees
    the first's marker."""
    jobs = _fake_jobs(["a", "b"], peers=["a", "b"])
    for job in jobs:
        job.wait_s = 1.0
    run_jobs(jobs, str(tmp_path))
    assert _seen(tmp_path, "a")["seen"] == []
    assert _seen(tmp_path, "b")["seen"] == [str(tmp_path / "a")]
    assert _seen(tmp_path, "a")["env"]["OMP_NUM_THREADS"] == os.environ.get("OMP_NUM_THREADS")


def test_a_failed_job_lets_the_running_ones_finish_and_starts_no_other(tmp_path) -> None:
    jobs = _fake_jobs(["bad", "slow", "never"], peers=["bad", "slow"], failing=["bad"])
    with pytest.raises(JobFailedError, match=r"job bad failed \(exit code 3\)"):
        run_jobs(jobs, str(tmp_path), parallel=2)
    assert jobs[1].finished(str(tmp_path))  # ran beside the failed one, to its end
    assert not (tmp_path / "never").exists()


def test_each_slot_gets_its_own_gpus() -> None:
    slots = slot_environments(2, {"CUDA_VISIBLE_DEVICES": "0,1,2,3", "OMP_NUM_THREADS": "4"})
    assert [(s["CUDA_VISIBLE_DEVICES"], s["OMP_NUM_THREADS"]) for s in slots] == [("0,2", "4"), ("1,3", "4")]
    assert slot_environments(1, None) == [None]  # one slot: the environment as is
    with pytest.raises(ConfigError, match=r"--parallel 3 needs a GPU per job, and 2 are visible"):
        slot_environments(3, {"CUDA_VISIBLE_DEVICES": "0,1"})
    with pytest.raises(ConfigError, match="--parallel must be >= 1"):
        slot_environments(0)
