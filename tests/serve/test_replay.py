"""End to end: a run trained by ``mtfm_rec.train`` on a raw dataset with history and real-time
sequences, multi-hot and dense features; its test split replayed request by request through the
serving path reproduces the run's ``metrics.json`` and ``predictions.parquet``."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from mtfm_rec.serve.compress import prune_2to4, to_bf16
from mtfm_rec.serve.predictor import Predictor, eager_scorer, load_run
from mtfm_rec.serve.replay import replay_split
from mtfm_rec.serve.subgraph import extract_subgraph

DAY = 86400


def _write_raw(root: str, users: int = 40, seed: int = 0) -> None:
    """Two scenarios over 4 days; clicks follow the user's history item (a learnable signal)."""
    rng = np.random.default_rng(seed)
    schema: Dict[str, Any] = {
        "name": "serve_e2e",
        "time_unit": "s",
        "sequences": [
            {"name": "orders", "kind": "history", "max_len": 6, "features": {"item": 8, "cat": 3}},
            {"name": "clicks", "kind": "realtime", "max_len": 5, "features": {"item": 8}},
        ],
        "scenarios": [
            {
                "name": "a",
                "user_features": {"city": 4},
                "item_features": {"item": 8, "tags": {"size": 5, "pooling": "mean"}},
                "dense_features": ["price"],
                "tasks": ["click", "order"],
            },
            {
                "name": "b",
                "item_features": {"item": 8, "genres": {"size": 4, "pooling": "sum"}},
                "tasks": ["click"],
            },
        ],
    }
    taste = rng.integers(0, 8, users)
    n_act = users * 12
    act_user, act_ts = rng.integers(0, users, n_act), rng.integers(0, 4 * DAY, n_act)
    act_item = np.where(rng.random(n_act) < 0.7, taste[act_user], rng.integers(0, 8, n_act))
    tables: Dict[str, pa.Table] = {
        "behaviors/orders": pa.table(
            {"user_id": act_user, "ts": act_ts, "item": act_item, "cat": act_item % 3}
        ),
        "behaviors/clicks": pa.table({"user_id": act_user[::-1].copy(), "ts": act_ts + 60, "item": act_item}),
    }
    for name, n in (("a", users * 10), ("b", users * 6)):
        user, item = rng.integers(0, users, n), rng.integers(0, 8, n)
        click = ((item == taste[user]) | (rng.random(n) < 0.15)).astype(np.int64)
        ids: List[List[int]] = [list(rng.integers(0, 6, rng.integers(0, 3))) for _ in range(n)]
        cols: Dict[str, Any] = {
            "user_id": user,
            "ts": rng.integers(DAY, 4 * DAY, n),
            "item": item,
            "click": click,
        }
        if name == "a":
            cols.update(city=user % 4, price=rng.random(n) * 50, tags=pa.array(ids, pa.list_(pa.int64())))
            cols["order"] = click * (rng.random(n) < 0.5)
        else:
            cols["genres"] = pa.array(ids, pa.list_(pa.int64()))
        tables[f"exposures/{name}"] = pa.table(cols)
    for folder, table in tables.items():
        os.makedirs(f"{root}/{folder}")
        pq.write_table(table, f"{root}/{folder}/part-0.parquet")
    with open(f"{root}/dataset.yaml", "w") as fh:
        yaml.safe_dump(schema, fh, sort_keys=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from mtfm_rec.train import main

    tmp = tmp_path_factory.mktemp("serve_e2e")
    _write_raw(str(tmp / "raw"))
    main(
        [
            f"data.raw={tmp}/raw",
            f"data.cache_dir={tmp}/cache",
            f"data.eval_after={3 * DAY}",
            f"data.valid_after={int(2.5 * DAY)}",
            "data.aggregation.window_seconds=21600",
            "data.aggregation.realtime_lookback_seconds=21600",
            "data.aggregation.num_workers=1",
            "data.loader.batch_size=16",
            "model.embedding_dim=8",
            "model.d_model=16",
            "model.tokenizer_hidden=[16]",
            "model.num_blocks=1",
            "model.target_layers_per_block=1",
            "model.full_layers_per_block=1",
            "model.num_heads=2",
            "model.num_kv_heads=1",
            "model.num_experts=2",
            "model.expert_dim=8",
            "model.tower_dim=8",
            f"train.run_dir={tmp}/run",
            "train.max_steps=30",
            "train.eval_every=15",
            "train.checkpoint_every=15",
            "train.save_predictions=true",
            "train.progress_bar=false",
            "train.tensorboard=false",
            "train.plots=false",
            "train.sharding.print_plan=false",
        ]
    )
    return str(tmp / "run")


def test_replay_through_the_serving_path_reproduces_metrics_and_predictions(
    run_dir: str, tmp_path: Any
) -> None:
    predictor = Predictor.from_run(run_dir, micro_batch=2, max_batch_requests=5)
    run = load_run(run_dir)
    out = str(tmp_path / "scores.parquet")
    metrics = replay_split(predictor, run.config, "test", out)
    with open(os.path.join(run_dir, "metrics.json")) as fh:
        expected = json.load(fh)
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert metrics[key]["count"] == value["count"] > 0, key
        assert metrics[key]["auc"] == pytest.approx(value["auc"], abs=1e-6), key
        assert metrics[key]["logloss"] == pytest.approx(value["logloss"], abs=1e-6), key
    served = pq.read_table(out).to_pandas()
    trained = pq.read_table(os.path.join(run_dir, "predictions.parquet")).to_pandas()
    keys = ["scenario", "task", "user_id", "ts", "label"]
    assert (served[keys].values == trained[keys].values).all()
    np.testing.assert_allclose(served.score.values, trained.score.values, atol=1e-5, rtol=0)


def test_bf16_and_2to4_subgraphs_stay_close_and_keep_the_pattern(run_dir: str) -> None:
    run = load_run(run_dir)
    fp32 = extract_subgraph(run.model, "a")
    pruned = extract_subgraph(run.model, "a")
    masks = prune_2to4(pruned)
    assert len(masks) == 3 * len(pruned.layers)  # uq, kv and f2 of every layer
    originals = dict(fp32.named_modules())
    for name, linear in ((n, m) for n, m in pruned.named_modules() if n in masks):
        mask = masks[name]
        assert (mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all(), name  # 2 of every 4 inputs
        assert not linear.weight[~mask].any(), name  # the pruned weights are zero ...
        kept = originals[name].weight[mask]
        torch.testing.assert_close(linear.weight[mask], kept)  # ... the others untouched
        magnitude = originals[name].weight.abs().reshape(mask.shape[0], -1, 4)
        group_mask = mask.reshape(magnitude.shape)
        largest_dropped = magnitude.masked_fill(group_mask, 0).amax(-1)
        smallest_kept = magnitude.masked_fill(~group_mask, float("inf")).amin(-1)
        assert (largest_dropped <= smallest_kept).all(), name  # magnitude pruning
    predictor = Predictor.from_run(run_dir, scenarios=["a"])
    requests = _some_requests(run)
    reference = np.concatenate(predictor.score(requests))
    for model, tol in ((to_bf16(fp32), 0.05), (pruned, 0.5)):
        got = np.concatenate(Predictor(run.schema, {"a": eager_scorer(model)}).score(requests))
        assert got.shape == reference.shape and np.isfinite(got).all()
        assert np.abs(got - reference).max() < tol


def _some_requests(run: Any) -> list:
    from mtfm_rec.data.loader import ResumableLoader
    from mtfm_rec.serve.request import requests_from_batch

    loader = ResumableLoader.from_config(run.dataset_dir, run.config.data, split="test", rank=0, world_size=1)
    return requests_from_batch(next(iter(loader)), run.schema, "a")[0]


def test_the_replay_command_writes_the_predictions_and_prints_the_metrics(
    run_dir: str, tmp_path: Any, capsys: Any
) -> None:
    from mtfm_rec.serve.__main__ import main

    out = str(tmp_path / "cli.parquet")
    main(["replay", "--run-dir", run_dir, "--scenario", "b", "--micro-batch", "3", "--out", out])
    printed = capsys.readouterr().out
    metrics = json.loads(printed[printed.index("{") : printed.rindex("}") + 1])
    with open(os.path.join(run_dir, "metrics.json")) as fh:
        expected = json.load(fh)
    assert set(metrics) == {"b/click"}
    assert metrics["b/click"]["auc"] == pytest.approx(expected["b/click"]["auc"], abs=1e-6)
    assert set(pq.read_table(out).column("scenario").to_pylist()) == {"b"}
