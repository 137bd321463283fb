"""No silent wrong result and no lost data: a diverged run, an empty or NaN validation, bad
start settings and two jobs on one run directory each stop with a named error."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from typing import Any, Iterator, List, Optional, Tuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from mtfm_rec.config import ConfigError, load_config
from mtfm_rec.data import sample_format as fmt
from mtfm_rec.data.batch import Batch
from mtfm_rec.training.metrics import NonFiniteError
from mtfm_rec.training.run_checks import EmptySplitError, describe_time_range
from mtfm_rec.training.run_lock import LOCK_NAME, RunDirLockedError, RunLock
from mtfm_rec.training.trainer import Trainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from processes import file_store, init_rank, spawn_ranks  # noqa: E402
from standins import QUIET, SCHEMA, StandinLoader, StandinModel, make_table  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TABLE = make_table(256)  # 192 train rows: 12 batches of 16 per epoch


class PoisonedLoader(StandinLoader):
    """The stand-in loader; from the ``poison_from``-th training batch handed out on, the labels
    are NaN (the loss of those steps is NaN, as after a diverged update). ``valid_label``
    overwrites every validation label (0 leaves no key with both classes: AUC undefined);
    ``empty`` splits have no rows."""

    def __init__(
        self,
        split: str,
        poison_from: int = 10**9,
        valid_label: float = -1.0,
        empty: Tuple[str, ...] = (),
        handed: Optional[List[int]] = None,
    ) -> None:
        super().__init__(TABLE.slice(0, 0) if split in empty else TABLE, split, 16, 0, 1)
        self.split, self.poison_from, self.valid_label = split, poison_from, valid_label
        self.handed = handed if handed is not None else [0]

    def __iter__(self) -> Iterator[Batch]:
        for batch in super().__iter__():
            if self.split == "train":
                if self.handed[0] >= self.poison_from:
                    for labels in batch.labels.values():
                        labels.fill_(float("nan"))
                self.handed[0] += 1
            elif self.split == "valid" and self.valid_label >= 0:
                for labels in batch.labels.values():
                    labels.fill_(self.valid_label)
            yield batch


def make_trainer(run_dir: str, *overrides: str, **loader_kw: Any) -> Trainer:
    handed = [0]  # one count over the epochs' loaders of this trainer
    cfg = load_config(
        None,
        QUIET + [f"train.run_dir={run_dir}", "data.loader.batch_size=16", "train.eval_splits=[]", *overrides],
    )
    return Trainer(
        cfg,
        model_fn=lambda schema: StandinModel(schema),
        loader_fn=lambda split: PoisonedLoader(split, handed=handed, **loader_kw),
        schema=SCHEMA,
    )


def checkpoint_steps(run_dir: str) -> List[int]:
    return sorted(
        int(p.rsplit("_", 1)[1]) for p in glob.glob(f"{run_dir}/checkpoints/step_*") if p[-1].isdigit()
    )


# ---------------------------------------------------------------- non-finite training loss
@pytest.mark.parametrize(
    "overrides, poison_from, message, kept, best",
    [
        # read every 2 steps; NaN from step 6 on (the 6th batch): seen at step 6, window 5-6
        (
            [
                "train.log_every=2",
                "train.checkpoint_every=2",
                "train.keep_checkpoints=1",
                "train.eval_every=4",
            ],
            5,
            r"train/loss is nan at step 6: .* in steps 5-6 .*newest checkpoint, .*step_4, is kept",
            [4],
            4,
        ),
        # read every 100 steps, but a checkpoint step reads it too: NaN from step 5, seen at 6
        (["train.log_every=100", "train.checkpoint_every=3"], 4, r"at step 6: .* in steps 4-6", [3], None),
        # diverged from the first step: nothing was saved before, nothing is saved now
        (
            ["train.log_every=1"],
            0,
            r"at step 1: .* in step 1 .*no checkpoint was written before it",
            [],
            None,
        ),
    ],
)
def test_nan_loss_stops_without_saving_the_diverged_state(
    tmp_path, overrides, poison_from, message, kept, best
) -> None:
    run = f"{tmp_path}/run"
    trainer = make_trainer(run, "train.max_steps=12", *overrides, poison_from=poison_from)
    try:
        with pytest.raises(NonFiniteError, match=message):
            trainer.fit()
    finally:
        trainer.close()
    assert checkpoint_steps(run) == kept  # no checkpoint of the bad state, none pruned for it
    if best is None:
        assert not os.path.exists(f"{run}/checkpoints/BEST")
    else:
        with open(f"{run}/checkpoints/BEST") as fh:
            assert json.load(fh)["step"] == best  # the good validation stays the best


def test_nan_predictions_are_refused_by_evaluation(tmp_path) -> None:
    trainer = make_trainer(f"{tmp_path}/run", "train.max_steps=1")
    try:
        bias = dict(trainer.model.named_parameters())["towers.b.2.bias"]
        with torch.no_grad():
            bias.fill_(float("nan"))  # scenario b's output layer: every b score is NaN
        with pytest.raises(NonFiniteError) as info:
            trainer.evaluate("test")
        assert str(info.value).startswith(
            "evaluating the test split at step 0: AUC/GAUC/logloss are not computed"
        )
        counts = re.findall(
            r"scenario/task (\S+): (\d+) of (\d+) scores and 0 labels not finite", str(info.value)
        )
        assert [key for key, _, _ in counts] == ["b/click"] and counts[0][1] == counts[0][2] != "0"
    finally:
        trainer.close()


# ---------------------------------------------------------------- validation
def test_empty_validation_split_is_refused_before_training(tmp_path) -> None:
    run = f"{tmp_path}/run"
    trainer = make_trainer(
        run, "train.max_steps=6", "train.eval_every=2", "train.early_stopping_patience=1", empty=("valid",)
    )
    try:
        with pytest.raises(
            EmptySplitError,
            match=r"the valid split yields no batches: data.valid_after=None, data.eval_after=None .*"
            r"train.eval_every=2 validates to choose the best model and stops early on it",
        ):
            trainer.fit()
        assert trainer.step == 0
    finally:
        trainer.close()
    assert checkpoint_steps(run) == []


def test_nan_validation_score_is_never_the_best(tmp_path) -> None:
    run = f"{tmp_path}/run"
    # every validation label 0: no scenario/task has both classes, the AUC is undefined (NaN)
    trainer = make_trainer(
        run, "train.max_steps=6", "train.eval_every=2", "train.early_stopping_patience=1", valid_label=0.0
    )
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    assert summary["step"] == 6  # NaN is no evidence for early stopping
    assert summary["best"] is None
    assert not os.path.exists(f"{run}/checkpoints/BEST")


# ---------------------------------------------------------------- start checks
def test_run_dir_that_is_a_file_is_refused(tmp_path) -> None:
    path = tmp_path / "taken"
    path.write_text("not a directory\n")
    with pytest.raises(ConfigError, match=r"train.run_dir='.*taken' is an existing file, not a directory"):
        make_trainer(str(path))
    assert path.read_text() == "not a directory\n"


def test_a_run_dir_that_cannot_be_locked_is_a_config_error_not_a_lock_conflict(tmp_path, monkeypatch) -> None:
    def refuse(self: RunLock) -> RunLock:
        raise PermissionError(13, "Permission denied", os.path.join(self.run_dir, LOCK_NAME))

    monkeypatch.setattr(RunLock, "acquire", refuse)
    with pytest.raises(
        ConfigError, match=r"train.run_dir='.*run': cannot take the run lock there: .*Permission denied"
    ):
        make_trainer(f"{tmp_path}/run")


def test_resume_from_a_missing_checkpoint_is_refused(tmp_path) -> None:
    with pytest.raises(
        ConfigError, match=r"train.resume='.*step_7' does not exist: pass a checkpoint directory"
    ):
        make_trainer(f"{tmp_path}/run", f"train.resume={tmp_path}/run/checkpoints/step_7")
    os.makedirs(f"{tmp_path}/half/step_3")
    with pytest.raises(ConfigError, match=r"step_3' is not a complete checkpoint \(no COMPLETE marker\)"):
        make_trainer(f"{tmp_path}/run", f"train.resume={tmp_path}/half/step_3")


def test_cuda_device_without_a_gpu_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"train.device=cuda but PyTorch sees no GPU"):
        make_trainer(f"{tmp_path}/run", "train.device=cuda")


# the module and the console script setup.py installs (docs/LAUNCH.md) are one command line
TRAIN_COMMANDS = {
    "module": [sys.executable, "-m", "mtfm_rec.train"],
    "console_script": [os.path.join(os.path.dirname(sys.executable), "mtfm-train")],
}


@pytest.mark.parametrize("command", sorted(TRAIN_COMMANDS))
def test_cli_prints_one_named_error_line(tmp_path, command: str) -> None:
    path = tmp_path / "taken"
    path.write_text("x")
    out = subprocess.run(
        [*TRAIN_COMMANDS[command], f"train.run_dir={path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("[train] error")]
    assert lines == [
        f"[train] error: ConfigError: train.run_dir='{path}' is an existing file, not a directory: "
        "pass a directory (created if missing)"
    ]
    assert "Traceback" not in out.stderr


# ---------------------------------------------------------------- empty training split, real data
@pytest.fixture(scope="module")
def ms_dataset(tmp_path_factory: Any) -> str:
    """A synthetic raw dataset whose ts were rewritten in milliseconds while its dataset.yaml
    (time_unit, recommended_* boundaries) still says seconds."""
    from mtfm_rec.data.synthetic import generate

    raw = str(tmp_path_factory.mktemp("ms") / "raw")
    generate(raw, num_users=30, num_days=3, exposures_per_user_day=3.0, history_days=2, seed=3)
    for path in glob.glob(f"{raw}/**/*.parquet", recursive=True):
        table = pq.read_table(path)
        table = table.set_column(
            table.schema.get_field_index("ts"), "ts", pc.multiply(table.column("ts"), 1000)
        )
        pq.write_table(table, path)
    return raw


def _real_data_config(raw: str, tmp_path: Any, *overrides: str) -> Any:
    return load_config(
        None,
        QUIET
        + [
            f"data.raw={raw}",
            f"data.cache_dir={os.path.dirname(raw)}/cache",
            f"train.run_dir={tmp_path}/run",
            "data.aggregation.progress=false",
            "data.aggregation.num_workers=1",
            *overrides,
        ],
    )


def test_empty_training_split_names_the_time_range_and_the_boundaries(ms_dataset: str, tmp_path) -> None:
    with pytest.raises(EmptySplitError) as info:
        Trainer(_real_data_config(ms_dataset, tmp_path))
    text = str(info.value)
    assert text.startswith(
        "the train split yields no batches: data.valid_after=1704153600, data.eval_after=1704240000 "
        "(train is ts < 1704153600)"
    )
    assert "the aggregated exposures' ts run from 1704068" in text and "000 to 1704" in text
    assert "are they in a finer unit than s?" in text
    assert "these boundaries split them into train 0, valid 0, test" in text
    RunLock(f"{tmp_path}/run").acquire().release()  # the failed start released the run lock


def test_recommended_boundary_after_the_given_one_is_refused(ms_dataset: str, tmp_path) -> None:
    cfg = _real_data_config(ms_dataset, tmp_path, "data.valid_after=1704240000")
    with pytest.raises(
        ConfigError,
        match=r"data.valid_after=1704240000 must be earlier than data.eval_after=1704240000"
        r".*\(data.eval_after is the dataset's recommended_eval_after\)",
    ):
        Trainer(cfg)


def test_time_range_counts_exposures_by_split(tmp_path) -> None:
    columns = {
        fmt.exp_ts("a"): [[100, 250], [300]],
        fmt.exp_split("a"): [[-1, -1], [0]],  # 300: train by column
        fmt.exp_ts("b"): [[], [50]],
        fmt.exp_split("b"): [[], [-1]],
    }
    pq.write_table(pa.table(columns), str(tmp_path / "part-00000.parquet"))
    text = describe_time_range(str(tmp_path), SCHEMA, eval_after=200, valid_after=None)
    assert text == (
        "the aggregated exposures' ts run from 50 to 300 (in s by dataset.yaml); these boundaries split "
        "them into train 3, valid 0, test 1 (1 of them by the split column)"
    )


# ---------------------------------------------------------------- run directory lock
def test_run_lock_names_its_holder_and_is_released(tmp_path) -> None:
    first = RunLock(str(tmp_path)).acquire()
    record = json.loads((tmp_path / LOCK_NAME).read_text())
    assert (record["host"], record["pid"]) == (socket.gethostname(), os.getpid())
    assert abs(record["since"] - time.time()) < 60
    with pytest.raises(
        RunDirLockedError,
        match=rf"is in use by another training: host {socket.gethostname()}, "
        rf"pid {os.getpid()}, since \d{{4}}-\d\d-\d\dT.* \(this process",
    ):
        RunLock(str(tmp_path)).acquire()
    first.release()
    first.release()  # idempotent
    RunLock(str(tmp_path)).acquire().release()


_HOLDER = textwrap.dedent(
    """
    import os, sys, time
    from mtfm_rec.training.run_lock import RunLock
    lock = RunLock(sys.argv[1]).acquire()  # kept: a collected RunLock releases itself
    if sys.argv[2] == "fork-and-die":  # a forked child keeps the lock's file open; the holder dies
        if os.fork() == 0:
            print("ready", os.getpid(), flush=True)
            time.sleep(120)
        os._exit(0)
    print("ready", os.getpid(), flush=True)
    time.sleep(120)
    """
)


def _start_holder(run_dir: str, mode: str) -> Tuple[subprocess.Popen, int]:
    """A process holding ``run_dir``'s lock; returns it and the pid of the process that sleeps
    with the lock (the holder itself, or with ``fork-and-die`` its child)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, run_dir, mode], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    word, pid = proc.stdout.readline().split()
    assert word == "ready"
    return proc, int(pid)


def test_second_process_is_refused_and_a_killed_holder_frees_the_lock(tmp_path) -> None:
    holder, _ = _start_holder(str(tmp_path), "hold")
    try:
        with pytest.raises(RunDirLockedError, match=rf"pid {holder.pid}, since .*; lock file .*{LOCK_NAME}"):
            RunLock(str(tmp_path)).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    messages: List[str] = []
    RunLock(str(tmp_path), log=messages.append).acquire().release()  # the kernel dropped the lock
    assert messages == []


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path) -> None:
    holder, child = _start_holder(str(tmp_path), "fork-and-die")
    dead_pid = holder.pid
    holder.wait()  # reaped: the pid is gone, its forked child still holds the locked file
    try:
        messages: List[str] = []
        lock = RunLock(str(tmp_path), log=messages.append).acquire()
        assert len(messages) == 1
        assert f"taking over the stale lock of host {socket.gethostname()}, pid {dead_pid}" in messages[0]
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(RunDirLockedError, match=rf"pid {os.getpid()}"):
            RunLock(str(tmp_path)).acquire()  # taken over means held: the next one is refused
        lock.release()
    finally:
        os.kill(child, signal.SIGKILL)


def test_two_trainers_on_one_run_dir(tmp_path) -> None:
    run = f"{tmp_path}/run"
    first = make_trainer(run, "train.max_steps=2")
    try:
        locked = rf"{run} is in use by another training: host .*, pid {os.getpid()}"
        with pytest.raises(RunDirLockedError, match=locked):
            make_trainer(run, "train.max_steps=2")
        first.fit()
    finally:
        first.close()
    second = make_trainer(run, "train.max_steps=4")  # closed: the run dir is free again
    try:
        assert second.fit()["step"] == 4
    finally:
        second.close()


def _locked_rank(rank: int, store: str, run_dir: str) -> None:
    import torch.distributed as dist

    init_rank(rank, 2, store)
    try:
        cfg = load_config(
            None, QUIET + [f"train.run_dir={run_dir}", "train.eval_splits=[]", "data.loader.batch_size=8"]
        )
        loader_fn = lambda split: StandinLoader(TABLE, split, 16, rank, 2)  # noqa: E731
        try:
            Trainer(cfg, model_fn=StandinModel, loader_fn=loader_fn, schema=SCHEMA)
            result = "started"
        except RunDirLockedError as exc:
            result = f"RunDirLockedError: {exc}"
        with open(f"{run_dir}/rank{rank}.txt", "w") as fh:
            fh.write(result)
    finally:
        dist.destroy_process_group()


def test_every_rank_stops_when_rank_0_cannot_lock(tmp_path) -> None:
    run = str(tmp_path)
    held = RunLock(run).acquire()  # another job's lock
    try:
        spawn_ranks(_locked_rank, (file_store(tmp_path), run))  # a rank left waiting fails it
    finally:
        held.release()
    for rank in range(2):
        text = (tmp_path / f"rank{rank}.txt").read_text()
        assert text.startswith(f"RunDirLockedError: {run} is in use by another training: host "), (rank, text)
        assert f"pid {os.getpid()}" in text
