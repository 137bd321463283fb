"""The model zoo: ``model.name`` builds each model, MMoE and MTGR train through the Trainer, and
``data.scenarios`` restricts a job to one scenario."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from mtfm_rec.config import ConfigError, load_config
from mtfm_rec.model.config import MODEL_NAMES, ModelConfig
from mtfm_rec.model.examples import random_batch
from mtfm_rec.model.mtfm import MTFM
from mtfm_rec.model.zoo import build_model, mtgr_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baseline_helpers import assert_beats_constant, train_model  # noqa: E402


def test_unknown_model_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="model.name='dcn' unknown"):
        load_config(None, ["model.name=dcn"])


def test_mtgr_is_mtfm_with_full_layers_and_no_gqa(schema) -> None:
    config = ModelConfig(num_blocks=2, target_layers_per_block=3, full_layers_per_block=1, num_kv_heads=1)
    mtgr = mtgr_config(config)
    assert mtgr.layer_kinds == ["full"] * 8
    assert mtgr.num_kv_heads == mtgr.num_heads
    model = build_model(schema, ModelConfig(name="mtgr"))
    assert isinstance(model, MTFM) and model.config.layer_kinds == ["full"] * 8


@pytest.mark.parametrize("name", ["mmoe", "mtgr"])
def test_trains_and_beats_a_constant(baseline_raw, tmp_path, name) -> None:
    metrics, rates = train_model(baseline_raw, str(tmp_path), name)
    assert_beats_constant(metrics, rates)


def test_one_scenario_job_sees_only_its_scenario(baseline_raw, tmp_path) -> None:
    metrics, _ = train_model(baseline_raw, str(tmp_path), "mmoe", ["data.scenarios=[search]"], steps=20)
    assert metrics["search/click"]["count"] > 0
    for key in ("feed/click", "coupon/order"):
        assert metrics[key]["count"] == 0 and math.isnan(metrics[key]["auc"]), metrics


def test_unknown_scenario_is_refused(baseline_raw, tmp_path) -> None:
    with pytest.raises(Exception, match=r"data.scenarios: unknown scenario\(s\) \['serach'\]"):
        train_model(baseline_raw, str(tmp_path), "mmoe", ["data.scenarios=[serach]"], steps=1)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_a_batch_without_some_scenario_trains(schema, name) -> None:
    """A one-scenario job (data.scenarios) or a sparse scenario leaves a scenario with no
    exposure in a batch: every model must still give a finite loss and gradients."""
    batch = random_batch(schema, batch_size=4, only_scenario={b: schema.scenarios[0].name for b in range(4)})
    assert all(batch.labels[s.name].shape[0] == 0 for s in schema.scenarios[1:])
    model = build_model(schema, ModelConfig(name=name, d_model=16, num_heads=2, expert_dim=8, tower_dim=8))
    loss, out = model(batch)
    loss.backward()
    assert torch.isfinite(loss) and all(out[s.name].shape[0] == 0 for s in schema.scenarios[1:])
