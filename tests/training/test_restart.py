"""A rank SIGKILLed mid-epoch: torchrun restarts the job by itself and it ends as if never killed.

Two 2-rank CPU jobs (gloo, ``train.deterministic``) of ``worker.py`` run the same config: one
uninterrupted, one under ``torchrun --max-restarts 1`` whose rank 1 SIGKILLs itself in the
middle of the first epoch on the first attempt (``WORKER_SIGKILL``, see worker.py). The second
attempt must resume from the newest checkpoint and end with the uninterrupted run's parameters,
optimizer state, loader position, samples seen and losses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Dict, Tuple

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "worker.py")
GLOBAL_BATCH = 16  # worker.py's
# 12 train batches an epoch; checkpoints at 4, 8 and 12 (and 14, the end). log_every=3 is not a
# divisor of checkpoint_every: a checkpoint must still count the samples of every step it holds.
MAX_STEPS = 14
CONFIG = [f"train.max_steps={MAX_STEPS}", "train.checkpoint_every=4", "train.log_every=3"]
# Rank 1 dies when it fetches the batch of step 11, while step 9 runs: steps 1-8 are done, the
# newest complete checkpoint is step 8 (the pipeline pulls two batches ahead).
KILL = "1:11"
RESUME_STEP = 8
# what this job must not inherit from a surrounding one
_INHERITED = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RESTART_COUNT",
    "WORKER_SIGKILL",
)


def _torchrun(tmp: Any, name: str, env: Dict[str, str], max_restarts: int = 0) -> Tuple[Dict[str, Any], str]:
    """Runs worker.py on 2 ranks in ``tmp/name``; returns its result and the job's output."""
    out, run_dir = tmp / f"{name}.json", tmp / name
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        str(max_restarts),
        WORKER,
        str(out),
        f"train.run_dir={run_dir}",
        *CONFIG,
    ]
    job_env = {k: v for k, v in os.environ.items() if k not in _INHERITED}
    # as launch/components.py sets it: a fresh rendezvous store for the restarted attempt (the
    # shared one keeps the killed attempt's keys and a restarted rank may connect to a dead peer)
    job_env.update(
        {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    )
    job_env.update(env)
    proc = subprocess.run(cmd, env=job_env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    with open(out) as fh:
        return json.load(fh), output


def _final_checkpoint(run_dir: Any) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], Dict[str, Any]]:
    """The end-of-fit checkpoint: every tensor (model and optimizer, shards assembled), its
    meta.json and its ranks.json (the loader positions)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = run_dir / "checkpoints" / f"step_{MAX_STEPS}"
    dcp_to_torch_save(str(path), str(run_dir / "final.pt"))
    state = torch.load(run_dir / "final.pt", weights_only=False)

    def flat(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for key, value in tree.items():
            out.update(
                flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
            )
        return out

    with open(path / "meta.json") as fh, open(path / "ranks.json") as gh:
        return flat(state), json.load(fh), json.load(gh)


@pytest.mark.distributed
def test_sigkilled_rank_restarts_and_resumes_to_the_uninterrupted_result(tmp_path: Any) -> None:
    full, _ = _torchrun(tmp_path, "full", {})
    killed, output = _torchrun(tmp_path, "killed", {"WORKER_SIGKILL": KILL}, max_restarts=1)

    # one job, no human: the first attempt lost rank 1 to SIGKILL, torchrun started both again
    # and the second attempt resumed from the newest checkpoint the first one completed
    assert "exitcode: -9" in output and "local_rank: 1" in output, output[-4000:]
    assert (full["restart_count"], full["resumed_step"]) == (0, None)
    assert (killed["restart_count"], killed["resumed_step"]) == (1, RESUME_STEP)
    assert (
        f"resumed from {tmp_path / 'killed' / 'checkpoints' / f'step_{RESUME_STEP}'} (saved on 2 rank(s))"
        in output
    )

    assert killed["step"] == full["step"] == MAX_STEPS
    assert killed["samples_seen"] == full["samples_seen"] == MAX_STEPS * GLOBAL_BATCH
    # the log of the job (both attempts) is the uninterrupted one: the same steps and losses
    assert [s for s, _ in killed["losses"]] == [s for s, _ in full["losses"]]
    np.testing.assert_allclose([v for _, v in killed["losses"]], [v for _, v in full["losses"]], atol=1e-6)

    tensors_full, meta_full, ranks_full = _final_checkpoint(tmp_path / "full")
    tensors_killed, meta_killed, ranks_killed = _final_checkpoint(tmp_path / "killed")
    assert set(tensors_killed) == set(tensors_full)
    assert any(k.startswith("model.embedding_collection.") for k in tensors_full)
    assert any(k.startswith("optim.state.fused.") for k in tensors_full)  # the tables' optimizer
    for key, value in tensors_full.items():
        if isinstance(value, torch.Tensor):
            np.testing.assert_allclose(
                tensors_killed[key].float().numpy(), value.float().numpy(), atol=1e-6, err_msg=key
            )
        else:
            assert tensors_killed[key] == value, key
    assert (
        meta_killed["metadata"]["samples_seen"]
        == meta_full["metadata"]["samples_seen"]
        == MAX_STEPS * GLOBAL_BATCH
    )
    assert ranks_killed == ranks_full  # every rank's loader: the same epoch and batch
    for key, m in full["test"].items():
        assert killed["test"][key]["count"] == m["count"]
        assert killed["test"][key]["auc"] == pytest.approx(m["auc"], abs=1e-6)
