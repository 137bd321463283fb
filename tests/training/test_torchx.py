"""The torchx component, and end to end: the real model on a small synthetic dataset, launched
by torchx on 2 CPU ranks.

The component (``launch/components.py:train``) must hand torchrun its restart count
(``--max-restarts``), as torchx's CLI builds it. One torchx job (``dist.ddp -j 1x2 --script
mtfm_rec/train.py``, gloo) trains MTFM for a few steps; its ``metrics.json`` must equal what one
process computes from its ``predictions.parquet``, and it must leave the run directory complete.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import subprocess
import sys
from typing import List

import pytest
import torch.distributed.run as torchrun

from mtfm_rec.data.synthetic import generate
from mtfm_rec.training.logger import read_log
from mtfm_rec.training.metrics import metrics_from_predictions, read_metrics_json

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORCHX = shutil.which("torchx", path=os.path.dirname(sys.executable)) or shutil.which("torchx")
COMPONENT = os.path.join(REPO, "launch", "components.py")
ARGS = ["--config", "configs/synthetic.yaml", "train.max_steps=10"]


def _component_app(cli_args: List[str]):  # -> torchx.specs.AppDef
    """The AppDef that ``torchx run <scheduler> launch/components.py:train <cli_args>`` runs."""
    finder = pytest.importorskip("torchx.specs.finder")
    from torchx.specs.builders import materialize_appdef

    component = finder.get_component(f"{COMPONENT}:train")  # raises on docstring/type errors
    return materialize_appdef(component.fn, cli_args)


def _torchrun_args(app):  # -> argparse.Namespace
    """The role's ``bash -c "torchrun ..."`` command, parsed by torchrun's own parser."""
    role = app.roles[0]
    assert role.entrypoint == "bash" and role.args[0] == "-c", role.args
    cmd = shlex.split(role.args[1])
    assert cmd[0] == "torchrun", cmd
    return torchrun.parse_args(cmd[1:])


def test_component_has_torchrun_restart_failed_ranks() -> None:
    app = _component_app(["-j", "1x2", "--max_restarts", "2", "--max_retries", "1", "--", *ARGS])
    assert "torchrun --max-restarts 2 " in app.roles[0].args[1]
    args = _torchrun_args(app)
    assert args.max_restarts == 2
    assert args.module and args.training_script == "mtfm_rec.train" and args.training_script_args == ARGS
    assert args.nproc_per_node == "2"
    assert app.roles[0].max_retries == 1  # the scheduler's whole-job retries stay separate
    # every attempt gets a fresh rendezvous store (a shared one keeps the killed attempt's keys)
    assert app.roles[0].env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"


def test_component_restarts_by_default_and_refuses_a_negative_count() -> None:
    assert _torchrun_args(_component_app(["--", *ARGS])).max_restarts == 3
    assert _torchrun_args(_component_app(["--max_restarts", "0", "--", *ARGS])).max_restarts == 0
    with pytest.raises(ValueError, match="max_restarts must be >= 0, got -1"):
        _component_app(["--max_restarts", "-1", "--", *ARGS])


def test_component_refuses_a_dist_ddp_command_it_cannot_extend() -> None:
    import importlib.util

    specs = pytest.importorskip("torchx.specs")
    spec = importlib.util.spec_from_file_location("mtfm_rec_launch_components", COMPONENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    role = specs.Role(name="train", image="img", entrypoint="python", args=["-m", "torch.distributed.run"])
    with pytest.raises(
        RuntimeError, match=r"unexpected command python .*cannot add \['--max-restarts', '1'\]"
    ):
        module._add_torchrun_flags(role, ["--max-restarts", "1"])


@pytest.mark.skipif(TORCHX is None, reason="torchx is not installed")
def test_torchx_two_cpu_ranks_metrics_match_predictions(tmp_path) -> None:
    raw = str(tmp_path / "raw")
    generate(raw, num_users=80, num_days=4, seed=3)
    run_dir = tmp_path / "run"
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore",
            "PATH": os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
        }
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        TORCHX,
        "run",
        "-s",
        "local_cwd",
        "dist.ddp",
        "-j",
        "1x2",
        "--rdzv_port",
        "29517",
        "--script",
        "mtfm_rec/train.py",
        "--",
        "--config",
        "configs/synthetic.yaml",
        f"data.raw={raw}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"train.run_dir={run_dir}",
        "data.loader.batch_size=8",
        "train.max_steps=4",
        "train.log_every=2",
        "train.eval_every=0",
        "train.save_predictions=true",
        "train.progress_bar=false",
        "train.tensorboard=false",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert "2 rank(s), gloo" in proc.stdout + proc.stderr  # the printed plan

    metrics = read_metrics_json(str(run_dir / "metrics.json"))
    recomputed = metrics_from_predictions(str(run_dir / "predictions.parquet"))
    assert (
        set(metrics)
        == set(recomputed)
        == {"feed/click", "feed/order", "search/click", "coupon/click", "coupon/order"}
    )
    for key, m in metrics.items():
        for name in ("auc", "gauc", "logloss", "count"):
            a, b = m[name], recomputed[key][name]
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12), (key, name)
    assert metrics["feed/click"]["count"] > 0
    assert os.path.exists(run_dir / "valid_metrics.json")
    assert [s for s, _ in read_log(str(run_dir))["train/loss"]] == [2, 4]
    assert (run_dir / "curves.png").exists()
    assert (run_dir / "checkpoints" / "step_4" / "COMPLETE").exists()
