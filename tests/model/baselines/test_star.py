"""STAR: trains on all scenarios through the Trainer; the star topology layer (eq. 4-5) and the
partitioned normalisation (eq. 3) on hand-sized inputs."""

from __future__ import annotations

import os
import sys

import torch

from mtfm_rec.model.baselines.inputs import TaskColumns
from mtfm_rec.model.baselines.star import PartitionedNorm, StarFCN, StarLinear

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baseline_helpers import assert_beats_constant, train_model  # noqa: E402


def test_trains_on_all_scenarios_and_beats_a_constant(baseline_raw, tmp_path) -> None:
    metrics, rates = train_model(baseline_raw, str(tmp_path), "star")
    assert_beats_constant(metrics, rates)
    for key in ("feed/click", "search/click", "coupon/click", "coupon/order"):
        assert metrics[key]["count"] > 0, metrics  # one model predicts every scenario


def _set(param: torch.nn.Parameter, value: list) -> None:
    with torch.no_grad():
        param.copy_(torch.tensor(value))


def test_star_layer_weight_is_scenario_times_shared() -> None:
    layer = StarLinear(num_partitions=2, in_dim=2, out_dim=2)
    _set(layer.weight, [[1.0, 2.0], [3.0, 4.0]])
    _set(layer.bias, [0.5, -0.5])
    _set(layer.partition_weight, [[[2.0, 0.0], [1.0, -1.0]], [[1.0, 1.0], [1.0, 1.0]]])
    _set(layer.partition_bias, [[1.0, 0.0], [0.0, 2.0]])
    x = torch.tensor([[1.0, 1.0]])
    # scenario 0: W_0 (.) W = [[2, 0], [3, -4]]; x @ it = [5, -4]; + b_0 + b = [6.5, -4.5]
    assert torch.equal(layer(x, 0), torch.tensor([[6.5, -4.5]]))
    # scenario 1: W_1 = ones -> W; x @ W = [4, 6]; + b_1 + b = [4.5, 7.5]
    assert torch.equal(layer(x, 1), torch.tensor([[4.5, 7.5]]))


def test_every_scenario_starts_from_the_shared_network() -> None:
    torch.manual_seed(0)
    fcn = StarFCN(num_partitions=3, widths=[4, 5, 2])
    x = torch.randn(6, 4)
    first = fcn(x, 0)
    for p in (1, 2):
        assert torch.equal(fcn(x, p), first)  # W_p = 1, b_p = 0 at init
    with torch.no_grad():
        fcn.layers[0].partition_weight[2, 0, 0] += 1.0
    assert not torch.allclose(fcn(x, 2), first)  # a scenario's own weights change only its output
    assert torch.equal(fcn(x, 1), first)


def test_task_columns_share_a_column_per_task_name(schema) -> None:
    tasks = TaskColumns(schema)  # tasks [click], [click, order], [click, order, pay]
    assert tasks.names == ["click", "order", "pay"]
    assert [tasks.columns(i).tolist() for i in range(3)] == [[0], [0, 1], [0, 1, 2]]
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    assert tasks(logits, 0).tolist() == [[1.0]] and tasks(logits, 2).tolist() == [[1.0, 2.0, 3.0]]


def _hand_norm() -> PartitionedNorm:
    norm = PartitionedNorm(num_partitions=2, dim=2, eps=0.0)
    _set(norm.weight, [2.0, 1.0])
    _set(norm.bias, [0.0, 1.0])
    _set(norm.partition_weight, [[0.5, 3.0], [1.0, 1.0]])
    _set(norm.partition_bias, [[1.0, -1.0], [0.0, 0.0]])
    return norm


def test_partitioned_norm_uses_each_scenarios_own_batch_statistics() -> None:
    norm = _hand_norm().train()
    a = torch.tensor([[1.0, 0.0], [3.0, 4.0]])  # mean [2, 2], biased var [1, 4]
    # (a - mean) / std = [[-1, -1], [1, 1]]; gamma * gamma_0 = [1, 3]; beta + beta_0 = [1, 0]
    expected = torch.tensor([[0.0, -3.0], [2.0, 3.0]])
    out_a, _ = norm([a, torch.tensor([[100.0, -7.0], [50.0, 9.0], [0.0, 1.0]])])
    assert torch.allclose(out_a, expected)
    other_a, out_b = norm([a, torch.tensor([[-3.0, 2.0], [8.0, 8.0]])])
    assert torch.allclose(other_a, expected)  # B's rows never enter A's statistics
    # B: mean [2.5, 5], std [5.5, 3] -> [[-1, -1], [1, 1]]; gamma * gamma_1 = [2, 1]; shift [0, 1]
    assert torch.allclose(out_b, torch.tensor([[-2.0, 0.0], [2.0, 2.0]]))


def test_partitioned_norm_keeps_moving_averages_per_scenario_for_eval() -> None:
    norm = _hand_norm().train()
    a = torch.tensor([[1.0, 0.0], [3.0, 4.0]])  # mean [2, 2], unbiased var [2, 8]
    b = torch.tensor([[-3.0, 2.0], [8.0, 8.0]])  # mean [2.5, 5], unbiased var [60.5, 18]
    norm([a, b])
    assert torch.allclose(norm.running_mean, torch.tensor([[0.2, 0.2], [0.25, 0.5]]))
    assert torch.allclose(norm.running_var, torch.tensor([[1.1, 1.7], [6.95, 2.7]]))
    norm.eval()
    x = torch.tensor([[0.0, 1.0]])
    out_a, out_b = norm([x, x])
    # eval: (x - running_mean_p) / sqrt(running_var_p) * (gamma * gamma_p) + (beta + beta_p)
    ref_a = (x - torch.tensor([0.2, 0.2])) / torch.tensor([1.1, 1.7]).sqrt() * torch.tensor([1.0, 3.0])
    ref_b = (x - torch.tensor([0.25, 0.5])) / torch.tensor([6.95, 2.7]).sqrt() * torch.tensor([2.0, 1.0])
    assert torch.allclose(out_a, ref_a + torch.tensor([1.0, 0.0]))
    assert torch.allclose(out_b, ref_b + torch.tensor([0.0, 1.0]))


def test_partitioned_norm_falls_back_to_moving_averages_below_two_rows() -> None:
    norm = PartitionedNorm(num_partitions=2, dim=3).train()
    with torch.no_grad():
        norm.running_mean.copy_(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]))
        norm.running_var.copy_(torch.tensor([[4.0, 4.0, 4.0], [1.0, 1.0, 1.0]]))
    before = norm.running_mean.clone(), norm.running_var.clone()
    one, empty = norm([torch.tensor([[3.0, 2.0, 1.0]]), torch.zeros(0, 3)])
    assert torch.allclose(one, torch.tensor([[1.0, 0.0, -1.0]]), atol=1e-5)  # (x - 1..3) / 2
    assert empty.shape == (0, 3)
    assert torch.equal(norm.running_mean, before[0]) and torch.equal(norm.running_var, before[1])
