"""PEPNet: trains on all scenarios through the Trainer; the Gate NU (eq. 1-2), EPNet (eq. 3) and
PPNet (eq. 4-5) on hand-sized inputs, their stop-gradients included."""

from __future__ import annotations

import math
import os
import sys

import torch

from mtfm_rec.model.baselines.pepnet import EPNet, GateNU, PPNet

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baseline_helpers import assert_beats_constant, train_model  # noqa: E402


def test_trains_on_all_scenarios_and_beats_a_constant(baseline_raw, tmp_path) -> None:
    # 40 steps: an epoch of this set is about 47; from the second PEPNet overfits (measured,
    # feed/click logloss against the constant's .6065: .602 / .599 at 40 steps for seeds 0 / 1,
    # .613 / .606 at 60)
    metrics, rates = train_model(baseline_raw, str(tmp_path), "pepnet", steps=40)
    assert_beats_constant(metrics, rates)
    for key in ("feed/click", "search/click", "coupon/click", "coupon/order"):
        assert metrics[key]["count"] > 0, metrics  # one model predicts every scenario


def _set(param: torch.nn.Parameter, value: list) -> None:
    with torch.no_grad():
        param.copy_(torch.tensor(value))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def test_gate_nu_is_two_times_a_sigmoid_of_a_relu_mlp() -> None:
    gate = GateNU(in_dim=2, hidden=2, out_dim=1)
    _set(gate.fc1.weight, [[1.0, -1.0], [0.5, 0.5]])
    _set(gate.fc1.bias, [0.0, -1.0])
    _set(gate.fc2.weight, [[2.0, -2.0]])
    _set(gate.fc2.bias, [0.5])
    out = gate(torch.tensor([[2.0, 1.0], [-2.0, 1.0]]))
    # row 0: W1 x + b1 = [1, 0.5] -> relu [1, 0.5] -> 2 - 1 + 0.5 = 1.5
    # row 1: W1 x + b1 = [-3, -1.5] -> relu [0, 0] -> 0.5
    expected = torch.tensor([[2 * _sigmoid(1.5)], [2 * _sigmoid(0.5)]])
    assert torch.allclose(out, expected)


def test_gate_nu_lies_in_zero_to_gamma_and_can_amplify() -> None:
    torch.manual_seed(0)
    gate = GateNU(in_dim=6, hidden=8, out_dim=5)
    out = gate(torch.randn(200, 6) * 3)
    assert bool((out > 0).all()) and bool((out < 2).all())
    with torch.no_grad():
        gate.fc2.bias.fill_(3.0)
    amplified = gate(torch.randn(200, 6))
    assert bool((amplified > 1.5).all()) and bool((amplified < 2).all())  # a plain sigmoid stays < 1


def test_epnet_scales_each_field_and_its_gate_input_gets_no_gradient() -> None:
    torch.manual_seed(0)
    epnet = EPNet(num_fields=2, field_dim=3, domain_dim=4)
    fields = torch.randn(5, 2, 3, requires_grad=True)
    domain = torch.randn(5, 4, requires_grad=True)
    with torch.no_grad():
        delta = epnet.gate(torch.cat([domain, fields.flatten(1)], dim=-1))  # [5, 2]
    out = epnet(fields, domain)
    assert torch.allclose(out, delta[:, :, None] * fields)  # O_ep = delta_domain (x) E
    out.sum().backward()
    # d sum(delta * E) / dE = delta alone: nothing flows back through the gate's copy of E
    assert fields.grad is not None and torch.allclose(fields.grad, delta[:, :, None].expand(5, 2, 3))
    assert domain.grad is not None and float(domain.grad.abs().sum()) > 0  # the domain prior learns


def _hand_ppnet() -> PPNet:
    torch.manual_seed(0)
    return PPNet(in_dim=4, prior_dim=3, hidden=[5], num_tasks=2)


def test_ppnet_scales_each_hidden_layer_by_its_gate() -> None:
    net = _hand_ppnet()
    o_ep, prior = torch.randn(3, 4), torch.randn(3, 3)
    gates = net.gates[0](torch.cat([prior, o_ep], dim=-1)).view(3, 2, 5)
    for k in range(2):  # tower k: w_out . (delta_k (x) relu(o_ep W_k + b_k)) + b_out
        hidden = torch.relu(o_ep @ net.weights[0][k] + net.biases[0][k])
        ref = (gates[:, k] * hidden) @ net.out_weight[k] + net.out_bias[k]
        assert torch.allclose(net(o_ep, prior)[:, k], ref, atol=1e-6)


def test_ppnet_gate_path_sends_no_gradient_to_o_ep() -> None:
    net = _hand_ppnet()
    with torch.no_grad():  # the tower no longer reads o_ep: H = relu(0 + 1) = 1, only the gate varies
        net.weights[0].zero_()
        net.biases[0].fill_(1.0)
    o_ep = torch.randn(3, 4, requires_grad=True)
    prior = torch.randn(3, 3, requires_grad=True)
    net(o_ep, prior).sum().backward()
    assert o_ep.grad is not None and torch.equal(o_ep.grad, torch.zeros(3, 4))  # stop-gradient
    assert prior.grad is not None and float(prior.grad.abs().sum()) > 0  # the prior still learns


def test_ppnet_main_path_trains_o_ep() -> None:
    net = _hand_ppnet()
    o_ep = torch.randn(3, 4, requires_grad=True)
    net(o_ep, torch.randn(3, 3)).sum().backward()
    assert o_ep.grad is not None and float(o_ep.grad.abs().sum()) > 0
