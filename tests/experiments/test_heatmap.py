"""Attention heatmaps (paper Figure 5): the recording hook against the reference kernel, its
absence of side effects, the match of candidate and sequence ids, and the ``heatmap`` command on
a tiny trained synthetic run."""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any, Dict, Tuple

import numpy as np
import pyarrow as pa
import pytest
import torch

from mtfm_rec.data.batch import Batch, collate
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.data.synthetic import generate
from mtfm_rec.experiments import heatmap as hm
from mtfm_rec.kernels.hstu_attention.reference import hstu_attention_reference
from mtfm_rec.model import MTFM
from mtfm_rec.model.attention_probe import record_attention
from mtfm_rec.model.examples import demo_schema, random_batch, random_table, small_config
from mtfm_rec.model.mask import dense_mask

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _model(backend: str = "auto", seed: int = 0, **overrides: Any) -> Tuple[MTFM, DatasetSchema]:
    schema = demo_schema(num_scenarios=3)
    torch.manual_seed(seed)
    model = MTFM(schema, small_config(attention_backend=backend, **overrides))
    model.eval()
    return model, schema


def _capture(model: MTFM, batch: Batch, index: int) -> Tuple[Any, ...]:
    """``(q, k, v, out, layout, target)`` of layer ``index``'s attention, through the bare hook."""
    got: Dict[str, Tuple[Any, ...]] = {}
    layer = model.dense.hta.layers[index]
    layer._recorder = lambda _layer, *args: got.setdefault("call", args)
    try:
        with torch.no_grad():
            model(batch)
    finally:
        layer._recorder = None
    return got["call"]


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_recorded_weights_reproduce_the_reference_kernel(backend: str) -> None:
    """weights @ v equals the reference kernel's output for every recorded T query, and the
    recorded mask is the layout's dense mask (ties between R and T timestamps included)."""
    model, schema = _model(backend)
    batch = random_batch(schema, batch_size=5, seq_len=(0, 9), exposures=(0, 4), ts_pool=6, seed=2)
    with torch.no_grad(), record_attention(model, [0, -1], samples=[0, 2, 4]) as rec:
        model(batch)
    assert rec.layers == [0, 1] and [len(rec.records[i]) for i in (0, 1)] == [3, 3]
    for index in (0, 1):
        q, k, v, out, layout, target = _capture(model, batch, index)
        ref = hstu_attention_reference(
            q, k, v, layout.queries(target), layout.keys, model.dense.hta.layers[index].alpha
        )
        mask = dense_mask(layout, target)
        for r in rec.records[index]:
            lo, hi = int(layout.target.offsets[r.sample]), int(layout.target.offsets[r.sample + 1])
            q_index = torch.arange(lo, hi) if target else r.query_rows
            rebuilt = torch.einsum("hqk,khd->qhd", r.weights, r.values)
            torch.testing.assert_close(rebuilt, ref[q_index], rtol=1e-5, atol=1e-6)
            assert r.reconstruction_error() < 1e-5  # against the backend's own output
            start = int(layout.keys.offsets[r.sample])
            local = torch.arange(hi - lo) if target else r.query_rows - start
            assert torch.equal(r.visible, mask[r.sample, local, : len(r.key_rows)])
            assert (r.weights[:, ~r.visible] == 0).all() and r.kind == ("target" if target else "full")


def test_recorded_weights_follow_the_segment_normalisation() -> None:
    """With ``model.attention_normalisation: segment`` the recorded weights still rebuild the
    layer's output (each key over its own segment's count), and they differ from the
    ``visible`` weights wherever a query sees history and other keys both."""
    model, schema = _model(attention_normalisation="segment")
    batch = random_batch(schema, batch_size=5, seq_len=(1, 9), exposures=(1, 4), ts_pool=6, seed=2)
    with torch.no_grad(), record_attention(model, [0, -1]) as rec:
        model(batch)
    for index in (0, 1):
        for r in rec.records[index]:
            assert r.reconstruction_error() < 1e-5
    layer = model.dense.hta.layers[0]
    layer.segment_norm = False
    with torch.no_grad(), record_attention(model, [0]) as plain:
        model(batch)
    assert any(not torch.allclose(a.weights, b.weights) for a, b in zip(rec.records[0], plain.records[0]))


def test_recording_changes_nothing_and_leaves_no_trace() -> None:
    model, schema = _model()
    batch = random_batch(schema, batch_size=4, seq_len=(1, 8), exposures=(1, 3), seed=1)
    layers = model.dense.hta.layers
    with torch.no_grad():
        loss, out = model(batch)
        with record_attention(model, [1, 0]) as rec:
            loss_rec, out_rec = model(batch)
            model(batch)
    assert torch.equal(loss, loss_rec) and out.keys() == out_rec.keys()
    assert all(torch.equal(out[key], out_rec[key]) for key in out)
    assert all(layer._recorder is None for layer in layers)
    assert [r.call for r in rec.records[0]] == [0] * 4 + [1] * 4  # every sample, both forwards
    with pytest.raises(KeyError), record_attention(model, [0]):
        raise KeyError("the block fails")
    assert all(layer._recorder is None for layer in layers)
    with record_attention(model, [0]), pytest.raises(RuntimeError, match="already being recorded"):
        with record_attention(model, [-2]):
            pass
    with pytest.raises(ValueError, match="index 2 out of range for a stack of 2"):
        with record_attention(model, [2]):
            pass
    with pytest.raises(ValueError, match="needs an MTFM-family model"):
        with record_attention(torch.nn.Linear(2, 2), [0]):
            pass
    assert all(layer._recorder is None for layer in layers)


def _multi_hot_batch() -> Tuple[DatasetSchema, Batch]:
    """demo_schema with a multi-hot item feature ``tags`` (9 ids, like the sequences' ``cat``)
    on sc0 and sc2; random bags, some empty, some with the missing id 9."""
    raw = demo_schema(num_scenarios=3).to_dict()
    for s in raw["scenarios"]:
        if s["name"] != "sc1":
            s["item_features"]["tags"] = {"size": 9, "pooling": "mean"}
    schema = DatasetSchema.from_dict(raw)
    table = random_table(demo_schema(num_scenarios=3), 6, seq_len=(1, 10), exposures=(1, 4), seed=4)
    rng = np.random.default_rng(0)
    for s in ("sc0", "sc2"):
        counts = [len(x) for x in table.column(f"exp/{s}/ts").to_pylist()]
        bags = [[rng.integers(0, 10, rng.integers(0, 4)).tolist() for _ in range(n)] for n in counts]
        table = table.append_column(f"exp/{s}/item/tags", pa.array(bags, pa.list_(pa.list_(pa.int64()))))
    return schema, collate(table, schema)


def _held(batch: Batch, key: str, scenario: str, i: int) -> set:
    """The ids of exposure ``i`` of ``scenario`` under ``key``, read plainly from the KJTs."""
    if key.startswith("bag/"):
        before = sum(len(batch.target_positions[s]) for s in ("sc0", "sc1", "sc2")[: int(scenario[-1])])
        jt = batch.bag_features[key]
        start = int(jt.lengths()[: before + i].sum())
        ids = jt.values()[start : start + int(jt.lengths()[before + i])].tolist()
    else:
        ids = [int(batch.sparse_features[key].values()[i])]
    return {x for x in ids if x < 9}


@pytest.mark.parametrize("spec", ["exp/*/item/cat=cat", "bag/*/item/tags=seq/orders/cat"])
def test_match_marks_the_keys_whose_id_the_candidate_holds(spec: str) -> None:
    schema, batch = _multi_hot_batch()
    matches = hm.resolve_matches(schema, "", [spec])
    assert sorted(matches) == ["sc0", "sc2"]
    torch.manual_seed(0)
    model = MTFM(schema, small_config())
    model.eval()
    views = hm.collect_views(model, [batch], schema, [0, 1], 3, matches, None, table_samples=6)
    seq_keys = matches["sc0"].sequence_keys
    assert seq_keys == (
        ("seq/clicks_rt/cat", "seq/orders/cat") if spec.startswith("exp") else ("seq/orders/cat",)
    )
    checked = 0
    for view in views:
        start = int(batch.token_offsets[view.sample])
        key_id = {}  # token row -> its sequence id, the missing id left out
        for key in seq_keys:
            rows, values = batch.sequence_positions[key.split("/")[1]], batch.sparse_features[key].values()
            key_id.update({int(r): int(x) for r, x in zip(rows, values) if x < 9})
        for s in ("sc0", "sc2"):
            # the sample's exposures of s, in KJT order = the order of its T tokens of s
            mine = np.flatnonzero(batch.exposure_sample[s].numpy() == view.sample)
            for q, i in zip(np.flatnonzero(view.scenarios == s), mine):
                held = _held(batch, matches[s].candidate_key, s, int(i))
                want = [key_id.get(start + j, -1) in held for j in range(len(view.kinds))]
                assert view.match[q].tolist() == want
                checked += int(any(want))
    assert checked > 0
    for layer in (0, 1):
        table = hm.match_means(views, layer)
        assert set(table) <= {"sc0", "sc2"}
        assert all(
            math.isfinite(m["match"]) and m["queries"] > 0 for kinds in table.values() for m in kinds.values()
        )


def test_match_specs_are_checked() -> None:
    schema = demo_schema(num_scenarios=3)
    with pytest.raises(ValueError, match="expected KEY=FEATURE"):
        hm.parse_match("exp/sc0/item/cat", schema)
    with pytest.raises(ValueError, match="no sequence has feature 'genre'"):
        hm.parse_match("exp/sc0/item/cat=genre", schema)
    with pytest.raises(ValueError, match="scenario 'sc1' has no feature 'exp/sc1/item/cat'"):
        hm.parse_match("exp/sc1/item/cat=cat", schema)
    with pytest.raises(ValueError, match="has 51 ids but"):  # sc1's item: vocab 50 + 1
        hm.parse_match("exp/sc1/item/item=item", schema)
    with pytest.raises(ValueError, match="matched twice"):
        hm.resolve_matches(schema, "", ["exp/*/item/cat=cat", "exp/sc0/item/item=item"])
    assert hm.resolve_matches(schema, "", []) == {}  # no shared_embeddings, not synthetic


# ------------------------------------------------------------------ a tiny trained run
@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Tuple[str, str]:
    from mtfm_rec.train import main

    root = tmp_path_factory.mktemp("heatmap")
    raw, run_dir = str(root / "raw"), str(root / "run")
    generate(raw, num_users=120, num_days=3, seed=3)
    overrides = [
        f"data.raw={raw}",
        f"data.cache_dir={root}/cache",
        f"train.run_dir={run_dir}",
        "train.max_steps=4",
        "train.eval_every=0",
        "train.eval_splits=[]",
        "train.max_minutes=0",
        "train.early_stopping_patience=0",
        "train.save_predictions=false",
        "train.peak_gflops=1",
        "train.tensorboard=false",
        "train.progress_bar=false",
        "train.plots=false",
        "data.aggregation.progress=false",
    ]
    main(["--config", os.path.join(REPO, "configs", "synthetic.yaml"), *overrides])
    return raw, run_dir


def test_heatmap_of_a_trained_synthetic_run(run: Tuple[str, str], tmp_path) -> None:
    raw, run_dir = run
    out = str(tmp_path / "hm")
    result = hm.heatmap(run_dir, out, [0, -1], 2, group_by="category", table_samples=12)
    names = ["layer0.png", "layer1.png", "summary.png", "heatmap.md", "heatmap.json"]
    assert all(os.path.getsize(os.path.join(out, n)) > 0 for n in names)
    with open(os.path.join(out, "heatmap.json")) as fh:  # strict JSON: no NaN / Infinity
        assert json.loads(fh.read(), parse_constant=lambda c: pytest.fail(f"{c} in heatmap.json")) == result
    assert [layer["kind"] for layer in result["layers"]] == ["full", "target"]
    assert len(result["samples"]) == 2 and result["table_samples"] == 12
    assert all(len(s["targets"]) >= 2 and s["history"] > 0 for s in result["samples"])
    sources = {s: m["source"] for s, m in result["match"].items()}
    assert sources == {
        "feed": "shared_embeddings",
        "search": "synthetic truth",
        "coupon": "shared_embeddings",
    }
    for layer in ("0", "1"):
        assert result["reconstruction_error"][layer] < 1e-5  # the weights the kernel used
        cells = [c for row in result["block_means"][layer].values() for c in row.values()]
        assert cells and all(math.isfinite(c["mean"]) and c["samples"] > 0 for c in cells)
        assert "H: orders category=0" in result["block_means"][layer]["feed"]
        assert result["match_means"][layer]["feed"]["H"]["queries"] > 0
    assert "## Layer 1 (target)" in open(os.path.join(out, "heatmap.md")).read()


def test_synthetic_truth_aligns_each_scenario_category_with_the_global_one(run: Tuple[str, str]) -> None:
    raw, _ = run
    schema = DatasetSchema.load(raw)
    truth = hm.synthetic_truth_matches(schema, raw, skip=[])
    assert {s: m.candidate_key for s, m in truth.items()} == {
        "feed": "exp/feed/item/category",
        "search": "exp/search/item/poi_cat",
        "coupon": "exp/coupon/item/category",
    }
    identity = np.arange(16)
    translate = {s: m.translate for s, m in truth.items() if m.translate is not None}
    assert np.array_equal(translate["feed"], identity) and np.array_equal(translate["coupon"], identity)
    perm = translate["search"]  # search's poi_cat is a permutation of the global category
    assert sorted(perm.tolist()) == identity.tolist() and not np.array_equal(perm, identity)


def test_command_line_errors_are_one_line(run: Tuple[str, str], tmp_path, capsys) -> None:
    _, run_dir = run
    parser = argparse.ArgumentParser()
    hm.add_arguments(parser)
    for argv, message in (
        (["--layers", "5"], "index 5 out of range for a stack of 2 HTA layers"),
        (["--layers", "a"], "expected comma-separated layer indices"),
        (["--group-by", "genre"], "no sequence has that feature"),
        (["--samples", "100000"], "the split has only"),
    ):
        args = parser.parse_args(["--run-dir", run_dir, "--out", str(tmp_path), *argv])
        assert hm.run_from_args(args) == 2
        assert message in capsys.readouterr().err
