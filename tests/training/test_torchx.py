"""End to end: the real model on a small synthetic dataset, launched by torchx on 2 CPU ranks.

One torchx job (``dist.ddp -j 1x2 --script mtfm_rec/train.py``, gloo) trains MTFM for a few
steps; its ``metrics.json`` must equal what one process computes from its
``predictions.parquet``, and it must leave the run directory complete.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import pytest

from mtfm_rec.data.synthetic import generate
from mtfm_rec.training.logger import read_log
from mtfm_rec.training.metrics import metrics_from_predictions, read_metrics_json

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORCHX = shutil.which("torchx", path=os.path.dirname(sys.executable)) or shutil.which("torchx")


@pytest.mark.skipif(TORCHX is None, reason="torchx is not installed")
def test_torchx_two_cpu_ranks_metrics_match_predictions(tmp_path) -> None:
    raw = str(tmp_path / "raw")
    generate(raw, num_users=80, num_days=4, seed=3)
    run_dir = tmp_path / "run"
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PATH": os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")})
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        TORCHX, "run", "-s", "local_cwd", "dist.ddp", "-j", "1x2", "--rdzv_port", "29517",
        "--script", "mtfm_rec/train.py", "--",
        "--config", "configs/synthetic.yaml",
        f"data.raw={raw}", f"data.cache_dir={tmp_path / 'cache'}", f"train.run_dir={run_dir}",
        "data.loader.batch_size=8", "train.max_steps=4", "train.log_every=2", "train.eval_every=0",
        "train.save_predictions=true", "train.progress_bar=false", "train.tensorboard=false",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert "2 rank(s), gloo" in proc.stdout + proc.stderr  # the printed plan

    metrics = read_metrics_json(str(run_dir / "metrics.json"))
    recomputed = metrics_from_predictions(str(run_dir / "predictions.parquet"))
    assert set(metrics) == set(recomputed) == {"feed/click", "feed/order", "search/click", "coupon/click", "coupon/order"}
    for key, m in metrics.items():
        for name in ("auc", "gauc", "logloss", "count"):
            a, b = m[name], recomputed[key][name]
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12), (key, name)
    assert metrics["feed/click"]["count"] > 0
    assert os.path.exists(run_dir / "valid_metrics.json")
    assert [s for s, _ in read_log(str(run_dir))["train/loss"]] == [2, 4]
    assert (run_dir / "curves.png").exists()
    assert (run_dir / "checkpoints" / "step_4" / "COMPLETE").exists()
