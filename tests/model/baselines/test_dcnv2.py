"""DCN-V2: the cross layer's equations (full rank and low rank) on hand-sized inputs, the stacked
and parallel structures, and training through the Trainer."""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pyarrow.parquet as pq
import torch

from mtfm_rec.model.baselines.dcnv2 import CrossLayer, DCNv2Dense, DCNv2Network
from mtfm_rec.model.config import BaselineConfig, ModelConfig
from mtfm_rec.model.zoo import build_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baseline_helpers import assert_beats_constant, train_model  # noqa: E402

X0 = torch.tensor([[1.0, 2.0, -1.0]])
XL = torch.tensor([[0.5, -1.0, 2.0]])


def test_full_rank_cross_layer_is_eq_1() -> None:
    layer = CrossLayer(3, rank=0)
    w = torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 0.0], [1.0, 1.0, 1.0]])
    b = torch.tensor([0.5, 0.0, -1.0])
    with torch.no_grad():
        layer.project.weight.copy_(w)
        layer.project.bias.copy_(b)
    # by hand: W x_l = [0.5 + 4, 1, 0.5 - 1 + 2] = [4.5, 1, 1.5]; + b = [5, 1, 0.5]
    # x0 * (.) = [5, 2, -0.5]; + x_l = [5.5, 1, 1.5]
    expected = torch.tensor([[5.5, 1.0, 1.5]])
    torch.testing.assert_close(layer(X0, XL), expected)
    torch.testing.assert_close(layer(X0, XL), X0 * (XL @ w.T + b) + XL)


def test_low_rank_cross_layer_is_eq_2() -> None:
    layer = CrossLayer(3, rank=1)
    v = torch.tensor([[1.0, 1.0, 1.0]])  # V^T: [r=1, D=3]
    u = torch.tensor([[1.0], [0.0], [-2.0]])  # U: [D=3, r=1]
    b = torch.tensor([0.0, 1.0, 0.0])
    with torch.no_grad():
        layer.project[0].weight.copy_(v)
        layer.project[1].weight.copy_(u)
        layer.project[1].bias.copy_(b)
    # by hand: V^T x_l = 1.5; U (.) = [1.5, 0, -3]; + b = [1.5, 1, -3]
    # x0 * (.) = [1.5, 2, 3]; + x_l = [2, 1, 5]
    torch.testing.assert_close(layer(X0, XL), torch.tensor([[2.0, 1.0, 5.0]]))
    assert sum(p.numel() for p in layer.parameters()) == 3 + 3 + 3  # V, U, b: 2 D r + D
    assert sum(p.numel() for p in CrossLayer(3, rank=0).parameters()) == 9 + 3


def _network(structure: str) -> DCNv2Network:
    torch.manual_seed(0)
    baseline = BaselineConfig(hidden=[5, 4], cross_layers=2, cross_structure=structure, cross_rank=2)
    return DCNv2Network(6, num_tasks=3, baseline=baseline).eval()


def test_stacked_feeds_the_cross_network_into_the_deep_one() -> None:
    net = _network("stacked")
    x0 = torch.randn(7, 6)
    features = net.features(x0)
    assert features.shape == (7, 4)  # the deep network's last width
    torch.testing.assert_close(features, net.deep(net.cross_network(x0)))
    assert net(x0).shape == (7, 3)


def test_parallel_concatenates_the_cross_and_deep_networks() -> None:
    net = _network("parallel")
    x0 = torch.randn(7, 6)
    features = net.features(x0)
    assert features.shape == (7, 6 + 4)  # cross width D + the deep network's last width
    torch.testing.assert_close(features[:, :6], net.cross_network(x0))
    torch.testing.assert_close(features[:, 6:], net.deep(x0))
    assert net(x0).shape == (7, 3)


def test_cross_network_chains_its_layers_on_x0() -> None:
    net = _network("stacked")
    x0 = torch.randn(2, 6)
    x1 = net.cross[0](x0, x0)
    torch.testing.assert_close(net.cross_network(x0), net.cross[1](x0, x1))


def test_networks_are_per_scenario(schema) -> None:
    model = build_model(schema, ModelConfig(name="dcnv2", d_model=16, num_heads=4))
    assert isinstance(model.dense, DCNv2Dense)
    nets = model.dense.networks
    assert len(nets) == len(schema.scenarios)
    assert [n.head.out_features for n in nets] == [len(s.tasks) for s in schema.scenarios]
    assert nets[0].cross[0].project.weight is not nets[1].cross[0].project.weight


def test_trains_and_beats_a_constant(baseline_raw, tmp_path) -> None:
    metrics, rates = train_model(baseline_raw, str(tmp_path), "dcnv2")
    assert_beats_constant(metrics, rates)


def test_parallel_low_rank_trains_to_finite_probabilities(baseline_raw, tmp_path) -> None:
    overrides = ["model.baseline.cross_structure=parallel", "model.baseline.cross_rank=4"]
    metrics, _ = train_model(baseline_raw, str(tmp_path), "dcnv2", overrides, steps=20)
    assert metrics["feed/click"]["count"] > 0 and math.isfinite(metrics["feed/click"]["logloss"]), metrics
    scores = pq.read_table(os.path.join(tmp_path, "run", "predictions.parquet"))["score"].to_numpy()
    assert len(scores) > 0 and np.isfinite(scores).all() and ((scores > 0) & (scores < 1)).all()
