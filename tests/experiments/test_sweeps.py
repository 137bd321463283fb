"""``hta-sweep`` (Table 3) and ``scaling`` (Figure 4): the stack and size notations, the job
plans, and each command end to end on tiny data."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from mtfm_rec.config import ConfigError
from mtfm_rec.data.synthetic import generate
from mtfm_rec.experiments import hta_sweep, scaling
from mtfm_rec.experiments.__main__ import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "mtfm_small.yaml")
TINY = [
    "train.max_steps=12",
    "train.eval_every=6",
    "train.progress_bar=false",
    "train.plots=false",
    "train.tensorboard=false",
    "data.aggregation.progress=false",
    "model.d_model=16",
    "model.num_heads=2",
    "model.num_kv_heads=1",
]


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("sweep_raw"))
    generate(path, num_users=200, num_days=4, seed=3, shared_embeddings=False)
    return path


def test_stack_notation_and_its_errors() -> None:
    s = hta_sweep.Stack.parse("3:1x4/nogqa/batch2")
    assert (s.target_layers, s.full_layers, s.blocks, s.gqa, s.batch_factor) == (3, 1, 4, False, 2)
    assert s.overrides(num_heads=4, num_kv_heads=1, batch_size=32) == [
        "model.target_layers_per_block=3",
        "model.full_layers_per_block=1",
        "model.num_blocks=4",
        "model.num_kv_heads=4",
        "data.loader.batch_size=64",
    ]
    assert hta_sweep.Stack.parse("0:16x1").gqa and hta_sweep.Stack.parse("16:0x1").batch_factor == 1
    for bad in ("3:1", "0:0x2", "3:1x0", "3:1x4/fast", "3:1x4/batch0"):
        with pytest.raises(ConfigError, match="--stacks"):
            hta_sweep.Stack.parse(bad)


def test_size_notation_and_its_errors() -> None:
    assert scaling.size_overrides("64x2x4") == [
        "model.d_model=64",
        "model.num_blocks=2",
        "model.num_heads=4",
        "model.num_kv_heads=1",
    ]
    for bad in ("64x2", "64x0x4", "30x1x4"):
        with pytest.raises(ConfigError, match="--sizes"):
            scaling.size_overrides(bad)


def test_plans_train_every_row_on_the_same_data_and_budget(raw) -> None:
    common = [f"data.raw={raw}", "train.eval_every=10"]
    jobs = hta_sweep.plan(CONFIG, ["3:1x2", "3:1x2/batch2"], [0, 1], common)
    assert [j.name for j in jobs] == [
        "3-1x2/seed0",
        "3-1x2/seed1",
        "3-1x2_batch2/seed0",
        "3-1x2_batch2/seed1",
    ]
    assert all(j.overrides[:2] == common for j in jobs)
    assert jobs[2].labels["batch_size"] == str(2 * int(jobs[0].labels["batch_size"]))
    ladder = scaling.plan(CONFIG, ["16x1x1", "32x1x2"], [0], common)
    assert [j.name for j in ladder][:2] == ["mtfm_16x1x1/seed0", "mtfm_32x1x2/seed0"]
    assert [j.labels["scenario"] for j in ladder[2:]] == ["feed", "search", "coupon"]  # mmoe per scenario
    with pytest.raises(ConfigError, match="at least 2 sizes"):
        scaling.plan(CONFIG, ["16x1x1"], [0], common)


def test_hta_sweep_end_to_end(raw, tmp_path) -> None:
    argv = ["hta-sweep", "--config", CONFIG, "--stacks", "1:1x1,0:2x1/nogqa", "--runs-dir", str(tmp_path)]
    assert main([*argv, "--name", "sweep", f"data.raw={raw}", f"data.cache_dir={tmp_path}/cache", *TINY]) == 0
    report = json.loads((tmp_path / "sweep" / "hta_sweep.json").read_text())
    rows = {r["stack"]: r for r in report["rows"]}
    assert set(rows) == {"1:1x1", "0:2x1/nogqa"}
    for r in rows.values():
        assert 0.0 < r["auc_mean"] < 1.0 and r["samples_per_s_mean"] > 0 and math.isfinite(r["gauc_mean"])
        assert r["batch_size"] == 64 and len(r["runs"]) == 1  # mtfm_small.yaml's
    assert "| (0:2x1/nogqa) | 64 |" in (tmp_path / "sweep" / "hta_sweep.md").read_text()
    assert (tmp_path / "sweep" / "hta_sweep.png").stat().st_size > 0


def test_scaling_end_to_end(raw, tmp_path) -> None:
    argv = ["scaling", "--config", CONFIG, "--sizes", "8x1x1,32x2x2", "--baseline", ""]
    assert (
        main(
            [
                *argv,
                "--runs-dir",
                str(tmp_path),
                "--name",
                "scale",
                f"data.raw={raw}",
                f"data.cache_dir={tmp_path}/cache",
                *TINY,
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "scale" / "scaling.json").read_text())
    flops = [report["points"][s]["gflops_per_sample"] for s in ("8x1x1", "32x2x2")]
    assert flops == sorted(flops) and flops[0] > 0  # a bigger model costs more per sample
    assert set(report["slopes"]) == set(report["keys"]) and all(np.isfinite(list(report["slopes"].values())))
    curves = report["data_curves"]
    assert set(curves) == {"8x1x1", "32x2x2"}  # smallest, middle (= the largest of two), largest
    for points in curves.values():
        tokens = [t for t, _ in points]
        assert len(points) == 2 and tokens == sorted(tokens) and tokens[0] > 0  # evaluations at 6, 12
    for png in ("scaling_size.png", "scaling_data.png"):
        assert (tmp_path / "scale" / png).stat().st_size > 0
