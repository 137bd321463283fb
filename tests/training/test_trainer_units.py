"""Unit tests of the trainer's parts that need no process group."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mtfm_rec.config import ConfigError, load_config
from mtfm_rec.train import format_table
from mtfm_rec.training.config import ShardingConfig, TrainConfig
from mtfm_rec.training.logger import RunLogger, plot_curves, read_log
from mtfm_rec.training.optimizers import resolve_embedding_optimizer
from mtfm_rec.training.run_checks import EmptySplitError
from mtfm_rec.training.sharding import _fsdp_units, make_constraints
from mtfm_rec.training.trainer import _TrackedIterator, summarize

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from standins import QUIET, SCHEMA, StandinLoader, StandinModel, make_table  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_tracked_iterator_pairs_each_batch_with_the_loader_state_after_it() -> None:
    table = make_table(64)  # 48 train rows -> 3 batches of 16 per epoch
    loader = StandinLoader(table, "train", 16, 0, 1)
    it = _TrackedIterator(loader)
    for _ in range(4):  # the pipeline reads ahead: 4 batches out, none trained yet
        next(it)
    assert it.epochs_started == 2
    states = [it.pop()[:2] for _ in range(4)]
    assert [(s["epoch"], s["batches_in_epoch"]) for s, _ in states] == [(0, 1), (0, 2), (0, 3), (1, 1)]
    assert all(n == 16 for _, n in states)
    # a loader restored from the state of the 2nd trained batch yields the 3rd batch next
    fresh = StandinLoader(table, "train", 16, 0, 1)
    fresh.load_state_dict(states[1][0])
    third = next(iter(fresh))
    again = StandinLoader(table, "train", 16, 0, 1)
    batches = iter(again)
    next(batches), next(batches)
    assert torch.equal(third.user_id, next(batches).user_id)


def test_tracked_iterator_rejects_an_empty_training_split() -> None:
    loader = StandinLoader(make_table(8), "train", 16, 0, 1)  # 6 rows < one batch
    with pytest.raises(EmptySplitError, match="the training split yields no batches"):
        next(_TrackedIterator(loader))
    with pytest.raises(EmptySplitError, match="^boundaries and time range$"):
        next(_TrackedIterator(loader, explain=lambda: "boundaries and time range"))


def test_constraints_from_config_with_prefix_patterns() -> None:
    model = StandinModel(SCHEMA)
    cfg = ShardingConfig(sharding_types=["row_wise"], table_sharding_types={"exp__a__*": ["table_wise"]})
    constraints = make_constraints(model, cfg)
    assert constraints["exp__a__user__u"].sharding_types == ["table_wise"]
    assert constraints["cat_table"].sharding_types == ["row_wise"]
    assert constraints["exp__b__item__item"].sharding_types == ["row_wise"]
    assert make_constraints(model, ShardingConfig()) == {}
    with pytest.raises(ValueError, match="matches no table"):
        make_constraints(model, ShardingConfig(table_sharding_types={"nope": ["row_wise"]}))


def test_fsdp_units_skip_containers_and_sharded_modules() -> None:
    model = StandinModel(SCHEMA)
    ignored = set(model.embedding_collection.parameters())
    units = _fsdp_units(model, ignored)
    assert units == list(model.towers.values())  # the ModuleDict itself has no forward


def test_embedding_optimizer_resolution() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_embedding_optimizer(TrainConfig(), cpu) == ("adagrad", 0.01)
    assert resolve_embedding_optimizer(TrainConfig(), gpu) == ("adam", 3e-4)
    assert resolve_embedding_optimizer(TrainConfig(embedding_lr=0.5), cpu) == ("adagrad", 0.5)
    with pytest.raises(ValueError, match="needs a GPU"):
        resolve_embedding_optimizer(TrainConfig(embedding_optimizer="adam"), cpu)


def test_train_config_rejects_unknown_choices() -> None:
    with pytest.raises(ConfigError, match="dense_parallel"):
        load_config(None, ["train.dense_parallel=zero3"])
    # "gpu" used to train on the CPU without a word
    with pytest.raises(
        ConfigError, match=r"config\.train\.device must be one of \('auto', 'cpu', 'cuda'\), got 'gpu'"
    ):
        load_config(None, ["train.device=gpu"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, ["train.max_step=3"])
    for name in ("synthetic", "ml1m_genre", "ml1m_swr"):
        cfg = load_config(os.path.join(REPO, "configs", f"{name}.yaml"))
        assert cfg.train.lr > 0 and cfg.train.run_dir.startswith("runs/")


def test_summary_and_table() -> None:
    metrics = {
        "a/click": {"auc": 0.7, "gauc": 0.6, "logloss": 0.5, "count": 10},
        "b/click": {"auc": 0.5, "gauc": float("nan"), "logloss": 0.7, "count": 3},
    }
    assert summarize(metrics) == pytest.approx({"auc": 0.6, "gauc": 0.6, "logloss": 0.6})
    text = format_table({"test": metrics, "valid": {"a/click": metrics["a/click"]}})
    lines = text.splitlines()
    assert "test AUC" in lines[0] and "valid GAUC" in lines[0]
    assert lines[2].split() == ["a/click", "0.7000", "0.6000", "0.7000", "0.6000", "10", "10"]
    assert lines[3].split() == ["b/click", "0.5000", "-", "-", "-", "3", "0"]


def test_run_logger_csv_round_trip_and_curves(tmp_path) -> None:
    logger = RunLogger(str(tmp_path), tensorboard=False)
    logger.log(10, {"train/loss": 0.7})
    logger.log(20, {"train/loss": 0.6, "valid/auc": 0.55})
    logger.close()
    resumed = RunLogger(str(tmp_path), tensorboard=False)  # a resumed run appends
    resumed.log(30, {"train/loss": 0.5})
    resumed.close()
    series = read_log(str(tmp_path))
    assert series["train/loss"] == [(10, 0.7), (20, 0.6), (30, 0.5)]
    assert series["valid/auc"] == [(20, 0.55)]
    path = plot_curves(str(tmp_path))
    assert path is not None and os.path.getsize(path) > 1000
    assert not RunLogger(str(tmp_path / "other"), enabled=False).enabled
    assert not os.path.exists(tmp_path / "other")


def test_train_script_runs_as_a_file_without_shadowing() -> None:
    # As `--script mtfm_rec/train.py`, sys.path[0] is mtfm_rec/ (holding config.py, data/,
    # ...): the script must take it off sys.path before importing anything else.
    probe = (
        "import os, runpy, sys\n"
        "here = os.path.abspath('mtfm_rec')\n"
        "sys.path.insert(0, here); sys.argv = ['mtfm_rec/train.py', '--help']\n"
        "try:\n    runpy.run_path('mtfm_rec/train.py', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print('SHADOWED' if here in [os.path.abspath(p or '.') for p in sys.path] else 'CLEAN')\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--config" in out.stdout and out.stdout.strip().endswith("CLEAN")


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path) -> None:
    from mtfm_rec.training.trainer import Trainer

    table = make_table(128, seed=1)
    common = QUIET + [
        f"train.run_dir={tmp_path}/run",
        "train.max_steps=2",
        "train.eval_splits=[]",
        "data.loader.batch_size=16",
    ]

    def trainer(*overrides: str) -> Trainer:
        return Trainer(
            load_config(None, common + list(overrides)),
            model_fn=lambda schema: StandinModel(schema, use_sequences=True),
            loader_fn=lambda split: StandinLoader(table, split, 16, 0, 1),
            schema=SCHEMA,
        )

    first = trainer()
    try:
        first.fit()
    finally:
        first.close()
    changed = trainer("model.d_model=48", "train.max_steps=4")
    try:
        with pytest.raises(RuntimeError, match=r"model\.d_model: checkpoint 64, now 48.*train\.resume=never"):
            changed.fit()
    finally:
        changed.close()
    # the same model resumes, also on another attention implementation (same function)
    same = trainer("train.max_steps=4", "model.attention_backend=reference")
    try:
        assert same.maybe_resume() and same.step == 2
    finally:
        same.close()
