"""The trainer's distributed behaviour: world-size parity, exact resume, resharded resume.

Each job runs in a subprocess (torchrun for 2 ranks) so process groups never leak between
tests; the job itself is ``worker.py`` (stand-in model and data, global batch 16).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "worker.py")


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_job(
    tmp_path: Any, name: str, nproc: int, *overrides: str, env: Optional[Mapping[str, str]] = None
) -> Dict[str, Any]:
    out = str(tmp_path / f"{name}.json")
    if nproc == 1:
        cmd = [sys.executable, WORKER, out]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            WORKER,
            out,
        ]
    proc = subprocess.run(
        cmd + list(overrides), env={**_env(), **(env or {})}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    with open(out) as fh:
        return json.load(fh)


def _losses(result: Dict[str, Any]) -> List[float]:
    return [v for _, v in result["losses"]]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: Any) -> Dict[str, Any]:
    tmp = tmp_path_factory.mktemp("two_rank")
    result = run_job(tmp, "two", 2, f"train.run_dir={tmp}/run", "train.max_steps=4")
    result["run_dir"] = f"{tmp}/run"
    return result


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory: Any) -> Dict[str, Any]:
    tmp = tmp_path_factory.mktemp("one_rank")
    return run_job(tmp, "one", 1, f"train.run_dir={tmp}/run", "train.max_steps=6")


def test_two_ranks_match_one_rank_with_the_same_global_batch(
    two_rank_run: Dict[str, Any], one_rank_run: Dict[str, Any]
) -> None:
    one, two = one_rank_run, two_rank_run
    assert two["step"] == 4 and two["samples_seen"] == 4 * 16
    # Step 1 sees the same samples with the same initial weights: the same loss up to float
    # reduction order. Later steps differ slightly because each rank's loss is a mean over its
    # own labelled exposures (DDP averages those means), not the global mean: 5e-3 bounds it.
    l1, l2 = _losses(one)[:4], _losses(two)
    assert len(l1) == len(l2) == 4
    assert l1[0] == pytest.approx(l2[0], abs=1e-5)
    np.testing.assert_allclose(l1, l2, atol=5e-3)


def test_killed_run_resumes_to_the_same_parameters_and_samples(
    one_rank_run: Dict[str, Any], tmp_path: Any
) -> None:
    full = one_rank_run
    # "killed" after 3 steps (its last checkpoint is step 3), then resumed to 6.
    run_job(tmp_path, "part1", 1, f"train.run_dir={tmp_path}/part", "train.max_steps=3")
    resumed = run_job(tmp_path, "part2", 1, f"train.run_dir={tmp_path}/part", "train.max_steps=6")
    assert resumed["step"] == full["step"] == 6
    assert resumed["samples_seen"] == full["samples_seen"] == 6 * 16
    assert set(resumed["params"]) == set(full["params"])
    for key, value in full["params"].items():
        np.testing.assert_allclose(resumed["params"][key], value, atol=1e-6, err_msg=key)
    # the resumed run's log continues the killed one: the same 6 losses
    np.testing.assert_allclose(_losses(resumed), _losses(full), atol=1e-6)


def test_two_rank_checkpoint_resumes_on_one_rank(two_rank_run: Dict[str, Any], tmp_path: Any) -> None:
    # Resume the 2-rank run on 1 rank: right after loading, the model must give exactly the
    # 2-rank run's test metrics; then it trains on, with the sample count carried over.
    run_dir = two_rank_run["run_dir"]
    one = run_job(
        tmp_path,
        "reshard",
        1,
        f"train.run_dir={run_dir}",
        "train.max_steps=6",
        env={"WORKER_EVAL_AT_RESUME": "1"},
    )
    assert one["resumed_step"] == 4
    for key, m in two_rank_run["test"].items():
        assert one["test_at_resume"][key]["count"] == m["count"]
        assert one["test_at_resume"][key]["auc"] == pytest.approx(m["auc"], abs=1e-6)
        assert one["test_at_resume"][key]["logloss"] == pytest.approx(m["logloss"], abs=1e-6)
    assert one["step"] == 6 and one["samples_seen"] == 6 * 16


def test_fsdp2_and_table_wise_plan_match_ddp_and_row_wise(
    two_rank_run: Dict[str, Any], tmp_path: Any
) -> None:
    # Same data, same initial values (copied into whatever shards the plan makes): FSDP2
    # (reduce-scatter) with table-wise tables gives the losses of DDP (all-reduce) with the
    # planner's row-wise tables, up to float reduction order. Validation passes between steps
    # (which take the model out of the pipeline and back) must not change a thing either.
    fsdp = run_job(
        tmp_path,
        "fsdp",
        2,
        f"train.run_dir={tmp_path}/run",
        "train.max_steps=4",
        "train.dense_parallel=fsdp",
        "train.sharding.sharding_types=[table_wise]",
        "train.eval_every=1",
    )
    assert "table_wise" in fsdp["plan"] and "row_wise" not in fsdp["plan"]
    assert "row_wise" in two_rank_run["plan"]
    np.testing.assert_allclose(_losses(fsdp), _losses(two_rank_run), atol=1e-5)
    assert fsdp["samples_seen"] == two_rank_run["samples_seen"]


def test_bf16_autocast_trains_close_to_fp32(one_rank_run: Dict[str, Any], tmp_path: Any) -> None:
    bf16 = run_job(
        tmp_path, "bf16", 1, f"train.run_dir={tmp_path}/run", "train.max_steps=2", "train.bf16=true"
    )
    # bf16 matmuls (8-bit mantissa) move the first loss by ~1e-3, not more than 1e-2
    assert _losses(bf16)[0] == pytest.approx(_losses(one_rank_run)[0], abs=1e-2)
    assert all(math.isfinite(v) for v in _losses(bf16))
    assert bf16["test"]["b/click"]["count"] == one_rank_run["test"]["b/click"]["count"]


def test_early_stopping_on_validation_keeps_the_best_step(tmp_path: Any) -> None:
    # With zero learning rates validation never improves after its first pass: patience 1 stops
    # at the second validation (step 4) and the best step stays the first (step 2).
    result = run_job(
        tmp_path,
        "early",
        1,
        f"train.run_dir={tmp_path}/run",
        "train.max_steps=20",
        "train.eval_every=2",
        "train.early_stopping_patience=1",
        "train.lr=0",
        "train.embedding_lr=0",
    )
    assert result["step"] == 4 and result["samples_seen"] == 4 * 16
    assert result["best"]["step"] == 2
    with open(f"{tmp_path}/run/checkpoints/BEST") as fh:
        assert json.load(fh)["step"] == 2
