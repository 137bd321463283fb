"""The learning-rate schedule: its shape, its config checks, and that the trainer follows it.

The unit tests pin :func:`lr_factor` and :class:`LRSchedule`. The integration tests train the
stand-in model (whose TorchRec tables are updated by the fused, in-backward embedding optimizer)
with the real :class:`Trainer` on the CPU, on the pipelined and the plain path: both the fused
embedding update and the dense Adam update must scale with the factor, ``log.csv`` must record
the factors and a resumed run must continue them.
"""

from __future__ import annotations

import copy
import os
import sys
from typing import Dict, Iterator, List, Tuple

import pytest
import torch
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from mtfm_rec.config import ConfigError, load_config
from mtfm_rec.training.config import TrainConfig
from mtfm_rec.training.logger import read_log
from mtfm_rec.training.schedule import LR_DECAYS, LRSchedule, lr_factor
from mtfm_rec.training.trainer import Trainer, _TrackedIterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from standins import QUIET, SCHEMA, StandinLoader, StandinModel, make_table  # noqa: E402

BATCH = 16
TABLE = make_table(128, seed=1)  # 96 train rows: 6 batches of 16 an epoch


# ----------------------------------------------------------------------------- lr_factor
def test_warmup_is_linear_and_reaches_one_at_warmup_steps() -> None:
    for decay in LR_DECAYS:
        factors = [lr_factor(s, 100, 8, decay, 0.1) for s in range(1, 9)]
        assert factors == pytest.approx([s / 8 for s in range(1, 9)]), decay
        assert factors[-1] == 1.0


@pytest.mark.parametrize("decay", ["cosine", "linear"])
@pytest.mark.parametrize("warmup", [0, 5])
def test_decays_end_at_min_ratio_and_stay_there(decay: str, warmup: int) -> None:
    max_steps, floor = 40, 0.2
    assert lr_factor(max_steps, max_steps, warmup, decay, floor) == pytest.approx(floor)
    # steps past max_steps (a run extended without a new schedule) keep the floor
    for step in (max_steps + 1, 2 * max_steps, 10 * max_steps):
        assert lr_factor(step, max_steps, warmup, decay, floor) == pytest.approx(floor)
    assert lr_factor(max_steps - 1, max_steps, warmup, decay, floor) > floor


@pytest.mark.parametrize("warmup", [0, 3])
def test_cosine_starts_at_one_after_warmup_and_never_rises(warmup: int) -> None:
    max_steps = 50
    factors = [lr_factor(s, max_steps, warmup, "cosine", 0.0) for s in range(warmup + 1, max_steps + 5)]
    # the first decay step has progress 1 / (max_steps - warmup): within a hair of 1
    assert factors[0] == pytest.approx(1.0, abs=1e-2) and factors[0] <= 1.0
    assert all(b <= a for a, b in zip(factors, factors[1:]))
    # the midpoint of a cosine is half-way between 1 and the floor
    assert lr_factor(warmup + (max_steps - warmup) // 2, max_steps, warmup, "cosine", 0.0) == pytest.approx(
        0.5, abs=0.05
    )


def test_linear_decay_falls_by_equal_steps() -> None:
    factors = [lr_factor(s, 10, 0, "linear", 0.0) for s in range(1, 11)]
    assert factors == pytest.approx([1.0 - s / 10 for s in range(1, 11)])


def test_no_decay_without_warmup_is_always_one() -> None:
    assert {lr_factor(s, 20, 0, "none", 0.3) for s in range(0, 60)} == {1.0}
    # also when max_steps <= warmup leaves no room to decay
    assert lr_factor(10, 4, 4, "cosine", 0.0) == 1.0


@pytest.mark.parametrize("warmup", [0, 2])
def test_step_decay_is_torch_step_lr_stepped_every_batch(warmup: int) -> None:
    """After the warm-up, optimizer step s has StepLR's lr of batch s - warmup - 1."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    step_lr = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.85)
    expected = []
    for _ in range(20):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        step_lr.step()
    steps = range(warmup + 1, warmup + 21)
    ours = [lr_factor(s, 10, warmup, "step", 0.0, step_every=3, gamma=0.85) for s in steps]
    assert ours == pytest.approx(expected)
    # the floor holds it, and max_steps plays no part (a step decay has no end)
    floor = [lr_factor(s, 10, warmup, "step", 0.5, step_every=3, gamma=0.85) for s in steps]
    assert floor == pytest.approx([max(0.5, e) for e in expected]) and min(floor) == 0.5


# ----------------------------------------------------------------------------- LRSchedule
def _keyed_adam(lrs: List[float]) -> CombinedOptimizer:
    """A CombinedOptimizer of keyed Adams (the Trainer's optimizer type), one group each."""
    parts = []
    for i, lr in enumerate(lrs):
        params = {f"w{i}": torch.nn.Parameter(torch.randn(3))}
        parts.append((f"p{i}", KeyedOptimizerWrapper(params, lambda p, lr=lr: torch.optim.Adam(p, lr=lr))))
    return CombinedOptimizer(parts)


def test_schedule_sets_every_group_from_the_bases_at_construction() -> None:
    opt = _keyed_adam([0.1, 0.02])
    schedule = LRSchedule(opt, max_steps=10, warmup_steps=4, decay="linear", min_ratio=0.0)
    assert schedule.active and schedule.base_lrs == pytest.approx([0.1, 0.02])
    for step in (1, 4, 7, 10, 1):  # out of order on purpose: a pure function of the step
        factor = schedule.apply(step)
        assert factor == lr_factor(step, 10, 4, "linear", 0.0)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * factor, 0.02 * factor])
    # something else lowers a group's lr: the next apply starts from the base again, not from it
    opt.param_groups[0]["lr"] = 123.0
    factor = schedule.apply(6)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * factor, 0.02 * factor])


def test_schedule_survives_loading_an_optimizer_state() -> None:
    opt = _keyed_adam([0.1, 0.02])
    schedule = LRSchedule(opt, max_steps=10, warmup_steps=0, decay="cosine", min_ratio=0.1)
    for p in opt.params.values():
        p.grad = torch.ones_like(p)
    opt.step()  # materialise the Adam state, as training does before a checkpoint
    opt.save_param_groups(True)  # a saved lr (of some step) then comes back with the state
    schedule.apply(9)
    saved = copy.deepcopy(opt.state_dict())
    schedule.apply(2)
    opt.load_state_dict(saved)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(
        [0.1 * lr_factor(9, 10, 0, "cosine", 0.1), 0.02 * lr_factor(9, 10, 0, "cosine", 0.1)]
    )
    factor = schedule.apply(3)  # the loaded lr is overwritten from the bases, in the same groups
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * factor, 0.02 * factor])


def test_inactive_schedule_and_unknown_decay() -> None:
    opt = _keyed_adam([0.1])
    assert not LRSchedule(opt, 10, 0, "none", 0.1).active
    assert LRSchedule(opt, 10, 1, "none", 0.1).active
    with pytest.raises(
        ValueError, match=r"'exp' unknown; choose one of \('none', 'cosine', 'linear', 'step'\)"
    ):
        LRSchedule(opt, 10, 0, "exp", 0.1)
    with pytest.raises(ValueError, match="step decay needs step_every >= 1, got 0"):
        LRSchedule(opt, 10, 0, "step", 0.1)


def test_train_config_rejects_bad_schedule_settings() -> None:
    with pytest.raises(
        ConfigError, match=r"lr_decay must be one of \('none', 'cosine', 'linear', 'step'\), got 'exp'"
    ):
        load_config(None, ["train.lr_decay=exp"])
    with pytest.raises(ConfigError, match=r"lr_warmup_steps must be >= 0 .* got -1, 0\.1"):
        load_config(None, ["train.lr_warmup_steps=-1"])
    for ratio in ("-0.1", "1.5"):
        with pytest.raises(ConfigError, match=rf"lr_min_ratio in \[0, 1\], got 0, {ratio}"):
            load_config(None, [f"train.lr_min_ratio={ratio}"])
    for ratio in (0.0, 1.0):  # the ends are allowed
        assert TrainConfig(lr_min_ratio=ratio, lr_decay="cosine").lr_min_ratio == ratio
    for bad in (["train.lr_step_every=0"], ["train.lr_step_every=4", "train.lr_step_gamma=1.5"]):
        with pytest.raises(
            ConfigError, match=r"lr_decay=step needs lr_step_every >= 1 and lr_step_gamma in \(0, 1\]"
        ):
            load_config(None, ["train.lr_decay=step", *bad])
    cfg = load_config(None, ["train.lr_warmup_steps=5", "train.lr_decay=linear", "train.lr_min_ratio=0.0"])
    assert (cfg.train.lr_warmup_steps, cfg.train.lr_decay, cfg.train.lr_min_ratio) == (5, "linear", 0.0)


# ----------------------------------------------------------------------------- trainer
def _trainer(run_dir: str, *overrides: str) -> Trainer:
    """The stand-in model and data in the real Trainer (one CPU rank)."""
    cfg = load_config(
        None,
        QUIET
        + [
            f"train.run_dir={run_dir}",
            "train.eval_splits=[]",
            f"data.loader.batch_size={BATCH}",
            "train.resume=never",
            *overrides,
        ],
    )
    return Trainer(
        cfg,
        model_fn=lambda schema: StandinModel(schema),
        loader_fn=lambda split: StandinLoader(TABLE, split, BATCH, 0, 1),
        schema=SCHEMA,
    )


def _start(trainer: Trainer) -> None:
    """What fit() sets up before its loop: the tracked iterator, the pipeline and its feed."""
    trainer.model.train()
    trainer._iter = _TrackedIterator(trainer.train_loader, lambda: "", None)
    trainer._pipeline = trainer._make_pipeline() if trainer.config.train.pipeline else None
    trainer._feed: Iterator = trainer._iter


def _stop(trainer: Trainer) -> None:
    if trainer._pipeline is not None:
        trainer._pipeline.detach()
        trainer._pipeline = None
    trainer.close()


def _weights(trainer: Trainer) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Copies of (embedding tables, dense parameters); tables are this rank's shard."""
    emb, dense = {}, {}
    for key, value in trainer.model.state_dict().items():
        if hasattr(value, "local_shards"):
            emb[key] = value.local_shards()[0].tensor.detach().clone()
        elif value.is_floating_point():
            dense[key] = value.detach().clone()
    assert emb and dense, "the stand-in must have fused tables and dense layers"
    return emb, dense


def _deltas(before: Dict[str, torch.Tensor], after: Dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([(after[k] - before[k]).flatten() for k in sorted(before)])


@pytest.mark.parametrize("pipeline", [True, False], ids=["pipelined", "plain"])
def test_fused_embedding_and_dense_updates_stop_at_factor_zero(tmp_path, pipeline: bool) -> None:
    # linear decay to 0 at max_steps=4: the schedule itself gives 0 at step 4, 0.75 at step 1
    trainer = _trainer(
        str(tmp_path),
        "train.max_steps=4",
        "train.lr_decay=linear",
        "train.lr_min_ratio=0",
        f"train.pipeline={str(pipeline).lower()}",
    )
    try:
        _start(trainer)
        # 0 first (the kernel's lr from construction must not be used), up, then down again
        # (the fused kernel re-reads the group's lr every step, not once)
        for step, moves in ((4, False), (1, True), (4, False)):
            factor = trainer.schedule.apply(step)
            assert (factor > 0) == moves
            (emb0, dense0), _ = _weights(trainer), trainer._train_step()
            emb1, dense1 = _weights(trainer)
            for name, before, after in (("embedding", emb0, emb1), ("dense", dense0, dense1)):
                changed = float(_deltas(before, after).abs().max())
                assert (changed > 0) == moves, (name, step, factor, changed)
    finally:
        _stop(trainer)


@pytest.mark.parametrize("pipeline", [True, False], ids=["pipelined", "plain"])
def test_first_update_is_proportional_to_the_factor(tmp_path, pipeline: bool) -> None:
    # Two identical trainers take their first step on the same batch at factors 0.75 and 0.25:
    # Adam's and Adagrad's first update is lr times a function of the gradient, so every
    # weight's change must be 3x in the first (a fused kernel on its own lr would give 1x).
    deltas = []
    for i, step in enumerate((1, 3)):
        trainer = _trainer(
            str(tmp_path / str(i)),
            "train.max_steps=4",
            "train.lr_decay=linear",
            "train.lr_min_ratio=0",
            f"train.pipeline={str(pipeline).lower()}",
        )
        try:
            _start(trainer)
            assert trainer.schedule.apply(step) == pytest.approx(1 - step / 4)
            emb0, dense0 = _weights(trainer)
            trainer._train_step()
            emb1, dense1 = _weights(trainer)
            deltas.append((_deltas(emb0, emb1), _deltas(dense0, dense1), emb0, dense0))
        finally:
            _stop(trainer)
    (emb_hi, dense_hi, e0, d0), (emb_lo, dense_lo, e1, d1) = deltas
    for k in e0:  # same start: the comparison is of the updates alone
        assert torch.equal(e0[k], e1[k])
    for k in d0:
        assert torch.equal(d0[k], d1[k])
    for name, hi, lo in (("embedding", emb_hi, emb_lo), ("dense", dense_hi, dense_lo)):
        assert float(lo.abs().max()) > 0, name
        torch.testing.assert_close(hi, 3 * lo, rtol=1e-3, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


SCHEDULE = ["train.max_steps=6", "train.lr_warmup_steps=2", "train.lr_decay=cosine", "train.lr_min_ratio=0.1"]


def _logged_factors(run_dir: str) -> List[Tuple[int, float]]:
    return read_log(run_dir)["train/lr_factor"]


def test_log_records_the_factor_of_each_logged_step(tmp_path) -> None:
    trainer = _trainer(str(tmp_path), *SCHEDULE, "train.log_every=2")
    try:
        trainer.fit()
        bases = trainer.schedule.base_lrs
        last = [g["lr"] for g in trainer.optimizer.param_groups]
    finally:
        trainer.close()
    logged = _logged_factors(str(tmp_path))
    assert [s for s, _ in logged] == [2, 4, 6]
    for step, value in logged:
        assert value == pytest.approx(lr_factor(step, 6, 2, "cosine", 0.1), rel=1e-5), step
    # the optimizer ends at the lr of the last step: the floor
    assert last == pytest.approx([0.1 * b for b in bases])


def test_resumed_run_continues_the_schedule(tmp_path) -> None:
    full = _trainer(
        str(tmp_path / "full"),
        *SCHEDULE,
        "train.log_every=1",
        "train.checkpoint_every=3",
        "train.keep_checkpoints=0",
    )
    try:
        full.fit()
        full_emb, full_dense = _weights(full)
    finally:
        full.close()
    mid = tmp_path / "full" / "checkpoints" / "step_3"
    assert mid.is_dir(), sorted(os.listdir(tmp_path / "full" / "checkpoints"))
    resumed = _trainer(str(tmp_path / "resumed"), *SCHEDULE, "train.log_every=1", f"train.resume={mid}")
    try:
        assert resumed.maybe_resume() and resumed.step == 3
        assert len(resumed.schedule.base_lrs) == len(list(resumed.optimizer.param_groups))
        resumed.fit()
        emb, dense = _weights(resumed)
    finally:
        resumed.close()
    full_log, resumed_log = (
        _logged_factors(str(tmp_path / "full")),
        _logged_factors(str(tmp_path / "resumed")),
    )
    assert [s for s, _ in resumed_log] == [4, 5, 6]
    assert [v for _, v in resumed_log] == [v for s, v in full_log if s > 3]
    for step, value in resumed_log:  # log.csv keeps 6 significant digits
        assert value == pytest.approx(lr_factor(step, 6, 2, "cosine", 0.1), rel=1e-5), step
    # steps 4-6 trained at the same lrs as in the uninterrupted run: the same weights
    for key in full_emb:
        torch.testing.assert_close(emb[key], full_emb[key], rtol=1e-5, atol=1e-6)
    for key in full_dense:
        torch.testing.assert_close(dense[key], full_dense[key], rtol=1e-5, atol=1e-6)


def test_schedule_follows_a_plain_optimizer_through_load_state_dict() -> None:
    """torch.optim.Optimizer.load_state_dict replaces its group dicts; the schedule must still set them."""
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([p], lr=0.1)
    schedule = LRSchedule(opt, 10, 0, "linear", 0.0)
    opt.load_state_dict(opt.state_dict())
    assert schedule.apply(10) == 0.0
    assert opt.param_groups[0]["lr"] == 0.0
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.2})
    with pytest.raises(ValueError, match="2 parameter groups"):
        schedule.apply(3)
