"""Checkpoint integrity: manifests, damaged checkpoints on resume, a full disk, and a resumed
run's log (each step once in ``log.csv``, TensorBoard purged)."""

from __future__ import annotations

import csv
import errno
import logging
import os
import re
import sys
from typing import Callable, Dict, List

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_fs

import mtfm_rec.training.checkpoint as ckpt
import mtfm_rec.training.checkpoint_files as ckpt_files
from mtfm_rec.config import load_config
from mtfm_rec.training.checkpoint import CheckpointManager, load_checkpoint, save_checkpoint
from mtfm_rec.training.checkpoint_files import (
    COMPLETE,
    CheckpointCorruptError,
    CheckpointWriteError,
    latest_checkpoint,
    list_checkpoints,
    read_manifest,
    select_checkpoint,
    verify_checkpoint,
)
from mtfm_rec.training.logger import CSV_NAME, RunLogger, read_log

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from standins import QUIET, SCHEMA, StandinLoader, StandinModel, make_table  # noqa: E402


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # 64x64 weights: a .distcp of about 20 KB
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 1))


def _distcp(path: str) -> str:
    return os.path.join(path, next(n for n in sorted(os.listdir(path)) if n.endswith(".distcp")))


def _flip_4k(path: str) -> None:
    """Inverts 4 KB in the middle of a file (same size, other bytes)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.seek(size // 2 - 2048)
        data = fh.read(4096)
        fh.seek(size // 2 - 2048)
        fh.write(bytes(b ^ 0xFF for b in data))


def _truncate(path: str) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(100)


def _overwrite(text: str) -> Callable[[str], None]:
    def write(path: str) -> None:
        with open(path, "w") as fh:
            fh.write(text)

    return write


# damage name -> (file to damage, what to do to it, the problem line expected)
DAMAGES: Dict[str, tuple] = {
    "distcp deleted": (_distcp, os.remove, r"__0_0\.distcp: missing"),
    "distcp truncated": (
        _distcp,
        _truncate,
        r"__0_0\.distcp: size differs \(manifest \d+ bytes, on disk 100\)",
    ),
    "4 KB flipped": (_distcp, _flip_4k, r"__0_0\.distcp: checksum differs"),
    ".metadata deleted": (lambda p: os.path.join(p, ".metadata"), os.remove, r"\.metadata: missing"),
    "meta.json broken": (
        lambda p: os.path.join(p, "meta.json"),
        _overwrite("{broken"),
        r"meta\.json: size differs",
    ),
    "manifest broken": (
        lambda p: os.path.join(p, COMPLETE),
        _overwrite('{"files": '),
        r"COMPLETE: manifest unreadable",
    ),
}


@pytest.fixture
def two_checkpoints(tmp_path) -> tuple:
    """step_1 and step_2 of different weights under one root."""
    root = str(tmp_path / "ckpt")
    first, second = _model(1), _model(2)
    p1 = save_checkpoint(root, 1, first, rank_state={"epoch": 0})
    p2 = save_checkpoint(root, 2, second, rank_state={"epoch": 0})
    return root, p1, p2, first.state_dict()


def test_manifest_lists_every_file_with_size_and_sha256(two_checkpoints) -> None:
    _, _, p2, _ = two_checkpoints
    manifest = read_manifest(p2)
    assert manifest is not None and manifest["step"] == 2
    on_disk = sorted(n for n in os.listdir(p2) if n != COMPLETE)
    assert (
        sorted(manifest["files"])
        == on_disk
        == [".metadata", "__0_0.distcp", "meta.json", "ranks.json", "rng.pt"]
    )
    for name, entry in manifest["files"].items():
        assert entry["size"] == os.path.getsize(os.path.join(p2, name))
        assert entry["sha256"] == ckpt_files.sha256_file(os.path.join(p2, name))
    assert verify_checkpoint(p2) == []


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_newest_checkpoint_is_reported_and_the_newest_good_one_resumes(
    two_checkpoints, damage, caplog
) -> None:
    root, p1, p2, first_state = two_checkpoints
    target, act, problem = DAMAGES[damage]
    act(target(p2))
    [line] = verify_checkpoint(p2)  # one line, naming the file and what is wrong with it
    assert re.fullmatch(problem + r".*", line), line
    with pytest.raises(CheckpointCorruptError, match=rf"step_2 fails verification.*{problem}"):
        load_checkpoint(p2, _model(3))
    with caplog.at_level(logging.WARNING, logger="mtfm_rec.training.checkpoint"):
        chosen = select_checkpoint(root)
    assert chosen == p1
    assert any(
        "step_2 fails verification" in r.message and re.search(problem, r.message) for r in caplog.records
    ), caplog.text
    # set aside, files kept: no longer the latest, never pruned
    assert os.path.isdir(f"{p2}.damaged") and not os.path.exists(p2)
    assert latest_checkpoint(root) == p1
    fresh = _model(3)
    assert load_checkpoint(chosen, fresh).step == 1
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, first_state[key]), key


def test_no_checkpoint_verifies_raises_listing_each_and_keeps_them(two_checkpoints) -> None:
    root, p1, p2, _ = two_checkpoints
    os.remove(_distcp(p1))
    _flip_4k(_distcp(p2))
    with pytest.raises(
        CheckpointCorruptError, match=r"no checkpoint under .* verifies.*not restarted from step 0"
    ) as err:
        select_checkpoint(root)
    assert "step_2: __0_0.distcp: checksum differs" in str(err.value)
    assert "step_1: __0_0.distcp: missing" in str(err.value)
    assert set(err.value.problems) == {p1, p2}
    assert [p for _, p in list_checkpoints(root)] == [p1, p2]  # nothing renamed or deleted
    mgr = CheckpointManager(root)
    with pytest.raises(CheckpointCorruptError, match="no checkpoint under"):
        mgr.resume_path("auto")
    with pytest.raises(CheckpointCorruptError, match=r"step_1 fails verification.*__0_0\.distcp: missing"):
        mgr.resume_path(p1)  # an explicit path is never swapped for another one
    assert mgr.resume_path("never") is None
    assert CheckpointManager(str(os.path.join(root, "empty"))).resume_path("auto") is None


def test_checkpoint_without_manifest_loads_with_a_warning(two_checkpoints, caplog) -> None:
    root, _, p2, _ = two_checkpoints
    with open(os.path.join(p2, COMPLETE), "w") as fh:
        fh.write("2\n")  # the marker as written before manifests
    assert read_manifest(p2) is None
    with caplog.at_level(logging.WARNING, logger="mtfm_rec.training.checkpoint"):
        assert select_checkpoint(root) == p2
        assert load_checkpoint(p2, _model(3)).step == 2
    assert "has no manifest" in caplog.text and "unverified" in caplog.text


# ---------------------------------------------------------------- disk full
def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _assert_only_step_1(root: str) -> None:
    assert sorted(set(os.listdir(root)) - {"BEST"}) == ["step_1"]  # no partial step_2 or step_2.tmp
    assert latest_checkpoint(root) == os.path.join(root, "step_1")
    assert verify_checkpoint(os.path.join(root, "step_1")) == []
    assert select_checkpoint(root) == os.path.join(root, "step_1")


def test_disk_full_in_dcp_write_names_the_checkpoint_and_keeps_earlier_ones(tmp_path, monkeypatch) -> None:
    root = str(tmp_path)
    save_checkpoint(root, 1, _model(1))
    monkeypatch.setattr(dcp_fs, "_write_item", _disk_full)  # every tensor write of DCP
    with pytest.raises(
        CheckpointWriteError,
        match=r"checkpoint .*step_2 was not written: the disk is full "
        r"\(No space left on device; \d+ bytes free .*earlier checkpoints are intact "
        r"\(newest: .*step_1\)",
    ) as err:
        save_checkpoint(root, 2, _model(2))
    assert err.value.errno == errno.ENOSPC and err.value.path == os.path.join(root, "step_2")
    _assert_only_step_1(root)


@pytest.mark.parametrize("file", ["rng.pt", "meta.json", COMPLETE])
def test_disk_full_in_side_files_or_manifest_leaves_no_partial_checkpoint(
    tmp_path, monkeypatch, file
) -> None:
    root = str(tmp_path)
    mgr = CheckpointManager(root, keep_last=3, best_metric="valid/auc")
    mgr.save(1, _model(1), metric_value=0.6)
    write = ckpt_files.write_bytes

    def full_for(path: str, data: bytes) -> None:
        if os.path.basename(path) == file:
            with open(f"{path}.tmp", "wb") as fh:  # the disk fills up half-way through
                fh.write(data[: len(data) // 2])
            _disk_full()
        write(path, data)

    monkeypatch.setattr(ckpt_files, "write_bytes", full_for)  # meta.json and COMPLETE (write_json)
    monkeypatch.setattr(ckpt, "write_bytes", full_for)  # rng.pt
    with pytest.raises(CheckpointWriteError, match=r"step_2 was not written: the disk is full"):
        mgr.save(2, _model(2), metric_value=0.9)
    _assert_only_step_1(root)
    assert mgr.best()["step"] == 1


# ---------------------------------------------------------------- log.csv on resume
def _csv_rows(run_dir: str) -> List[List[str]]:
    with open(os.path.join(run_dir, CSV_NAME), newline="") as fh:
        return list(csv.reader(fh))


@pytest.mark.parametrize("first_writer_uid", [None, 9])
def test_resume_from_drops_later_rows_and_purges_tensorboard(tmp_path, monkeypatch, first_writer_uid) -> None:
    """``first_writer_uid=9``: the two writers' file names then differ only in ``.9`` / ``.10``
    when opened in the same second, which sort the wrong way as text (a full test run, whose
    earlier tests opened writers, hit it)."""
    if first_writer_uid is not None:
        from tensorboard.summary.writer import event_file_writer

        monkeypatch.setattr(
            event_file_writer, "_global_uid", event_file_writer.AtomicCounter(first_writer_uid)
        )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = str(tmp_path)
    first = RunLogger(run)
    for step in range(1, 6):
        first.log(step, {"train/loss": step / 10})
    first.close()
    with open(os.path.join(run, CSV_NAME), "a") as fh:
        fh.write("6,train/lo")  # the line a crash cut short
    resumed = RunLogger(run)
    assert resumed.resume_from(3) == 3  # steps 4, 5 and the cut line
    for step in (4, 5, 6):
        resumed.log(step, {"train/loss": step})
    resumed.close()
    rows = _csv_rows(run)
    assert rows[0] == ["step", "tag", "value", "time"]
    assert [(int(r[0]), float(r[2])) for r in rows[1:]] == [
        (1, 0.1),
        (2, 0.2),
        (3, 0.3),
        (4, 4),
        (5, 5),
        (6, 6),
    ]
    assert read_log(run)["train/loss"] == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 4.0), (5, 5.0), (6, 6.0)]
    events = EventAccumulator(os.path.join(run, "tb"))
    events.Reload()
    scalars = [(e.step, round(e.value, 6)) for e in events.Scalars("train/loss")]
    assert scalars == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 4), (5, 5), (6, 6)]


def test_trainer_skips_a_damaged_checkpoint_and_logs_each_step_once(tmp_path, caplog) -> None:
    from mtfm_rec.training.trainer import Trainer

    table = make_table(128, seed=1)
    run = f"{tmp_path}/run"
    common = QUIET + [
        f"train.run_dir={run}",
        "train.eval_splits=[]",
        "data.loader.batch_size=16",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=5",
    ]

    def fit(max_steps: int) -> Trainer:
        trainer = Trainer(
            load_config(None, common + [f"train.max_steps={max_steps}"]),
            model_fn=lambda schema: StandinModel(schema),
            loader_fn=lambda split: StandinLoader(table, split, 16, 0, 1),
            schema=SCHEMA,
        )
        try:
            trainer.fit()
        finally:
            trainer.close()
        return trainer

    fit(4)  # checkpoints at steps 2 and 4, log rows of steps 1-4
    _flip_4k(_distcp(f"{run}/checkpoints/step_4"))
    with caplog.at_level(logging.WARNING):
        resumed = fit(6)
    assert "step_4 fails verification, skipped: __0_0.distcp: checksum differs" in caplog.text
    assert os.path.isdir(f"{run}/checkpoints/step_4.damaged")
    assert resumed.step == 6 and resumed.samples_seen == 6 * 16  # resumed at step 2, not 4
    keys = [(int(r[0]), r[1]) for r in _csv_rows(run)[1:]]
    assert len(keys) == len(set(keys))  # each step and tag once
    assert [s for s, _ in read_log(run)["train/loss"]] == [1, 2, 3, 4, 5, 6]


def test_resuming_before_the_best_checkpoint_rewinds_best(tmp_path) -> None:
    root = str(tmp_path)
    mgr = CheckpointManager(root, keep_last=5, best_metric="valid/auc", mode="max")
    for step, auc in [(1, 0.6), (2, 0.7), (3, 0.65), (4, 0.9)]:
        mgr.save(step, _model(step), metric_value=auc)
    assert mgr.best()["step"] == 4
    _flip_4k(_distcp(os.path.join(root, "step_4")))
    assert mgr.resume_path("auto") == os.path.join(root, "step_3")
    # the validation of step 4 is of the abandoned run: BEST is the best up to step 3
    best = mgr.best()
    assert best is not None and (best["step"], best["value"]) == (2, 0.7)
    mgr.resume_path(os.path.join(root, "step_1"))  # explicitly further back
    assert (mgr.best()["step"], mgr.best()["value"]) == (1, 0.6)
