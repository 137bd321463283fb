"""A job's run directory is reused only by the same job: ``Job.check_unchanged``."""

from __future__ import annotations

import os

import pytest
import yaml

from mtfm_rec.config import load_config, to_dict
from mtfm_rec.experiments.jobs import Job, JobChangedError

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
