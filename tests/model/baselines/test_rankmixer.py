"""RankMixer: the token mixing is the token/head transpose, the per-token FFNs are independent,
the tokenization splits the input into T chunks, the d_model / mixer_tokens check, and training
through the Trainer."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from mtfm_rec.model.baselines.rankmixer import PerTokenFFN, RankMixerDense, RankMixerNetwork, token_mixing
from mtfm_rec.model.config import BaselineConfig, ModelConfig
from mtfm_rec.model.zoo import build_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baseline_helpers import assert_beats_constant, train_model  # noqa: E402


def test_token_mixing_gathers_head_h_of_every_token_into_token_h() -> None:
    # T = 2 tokens of D = 4, so H = 2 heads of width 2: token t = [head 0 | head 1]
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]])
    # token 0 <- head 0 of tokens 0 and 1; token 1 <- head 1 of tokens 0 and 1
    expected = torch.tensor([[[1.0, 2.0, 5.0, 6.0], [3.0, 4.0, 7.0, 8.0]]])
    torch.testing.assert_close(token_mixing(x), expected)


def test_token_mixing_is_the_token_head_transpose_and_its_own_inverse() -> None:
    n, tokens, d = 3, 4, 8
    x = torch.randn(n, tokens, d)
    out = token_mixing(x)
    heads = x.reshape(n, tokens, tokens, d // tokens)  # [n, token t, head h, D/H]
    for h in range(tokens):
        for t in range(tokens):
            torch.testing.assert_close(out[:, h].reshape(n, tokens, -1)[:, t], heads[:, t, h])
    torch.testing.assert_close(token_mixing(out), x)


def test_per_token_ffns_are_independent() -> None:
    torch.manual_seed(0)
    ffn = PerTokenFFN(tokens=4, d_model=6, hidden=12).eval()
    x = torch.randn(2, 4, 6)
    changed = x.clone()
    changed[:, 2] += torch.randn(2, 6)
    before, after = ffn(x), ffn(changed)
    torch.testing.assert_close(after[:, [0, 1, 3]], before[:, [0, 1, 3]])
    assert not torch.allclose(after[:, 2], before[:, 2])
    # token t goes through FFN t: by hand for token 1
    h = torch.nn.functional.gelu(x[:, 1] @ ffn.w1[1] + ffn.b1[1])
    torch.testing.assert_close(before[:, 1], h @ ffn.w2[1] + ffn.b2[1])


def test_tokenization_projects_chunk_t_into_token_t() -> None:
    torch.manual_seed(0)
    config = ModelConfig(d_model=8, num_heads=4, baseline=BaselineConfig(mixer_tokens=4))
    net = RankMixerNetwork(width=16, num_tasks=2, config=config)
    e = torch.randn(3, 16)
    tokens = net.tokenize(e)
    assert tokens.shape == (3, 4, 8)
    torch.testing.assert_close(tokens[:, 2], e[:, 8:12] @ net.proj_w[2] + net.proj_b[2])
    assert net(e).shape == (3, 2)


def test_d_model_must_be_divisible_by_mixer_tokens(schema) -> None:
    config = ModelConfig(name="rankmixer", d_model=16, num_heads=4, baseline=BaselineConfig(mixer_tokens=3))
    with pytest.raises(
        ValueError, match=r"model.d_model=16 must be divisible by model.baseline.mixer_tokens=3"
    ):
        build_model(schema, config)


def test_networks_are_per_scenario(schema) -> None:
    model = build_model(schema, ModelConfig(name="rankmixer", d_model=16, num_heads=4))
    assert isinstance(model.dense, RankMixerDense)
    nets = model.dense.networks
    assert len(nets) == len(schema.scenarios)
    assert [n.num_tasks for n in nets] == [len(s.tasks) for s in schema.scenarios]
    assert nets[0].proj_w is not nets[1].proj_w


def test_trains_and_beats_a_constant(baseline_raw, tmp_path) -> None:
    metrics, rates = train_model(baseline_raw, str(tmp_path), "rankmixer")
    assert_beats_constant(metrics, rates)
