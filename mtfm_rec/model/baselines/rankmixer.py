"""RankMixer (Zhu et al., "RankMixer: Scaling Up Ranking Models in Industrial Recommenders",
2025), a scaled ranking backbone of the paper's Table 2.

Feature tokenization (section 3.2): the input vector ``e`` of width ``W`` is split into ``T``
chunks, each projected to a ``D``-wide token by its own map::

    x_t = Proj_t(e[t W/T : (t+1) W/T]),   t = 1..T              (T = model.baseline.mixer_tokens)

Each of the ``L`` layers (``model.baseline.mixer_layers``, section 3.3, eq. 1)::

    S = LN(TokenMixing(X) + X)        # multi-head token mixing, parameter-free
    X = LN(PFFN(S) + S)               # per-token FFN: v_t = W_{t,2} GELU(W_{t,1} s_t + b_{t,1}) + b_{t,2}

TokenMixing splits every token into ``H = T`` heads of ``D/H`` and gathers head ``h`` of every
token into output token ``h``: ``out[h] = concat_t x_t^h``, a transpose of the token and head
axes (so applying it twice is the identity). Each token has its own FFN weights (hidden
``k D``, ``k = 4``, section 3.3.2). The output tokens are mean-pooled into one ``D`` vector
read by a two-layer tower per task. The paper's Sparse-MoE variant of the PFFN (ReLU routing,
DTSI) is not implemented: dense PFFN only.

Input ``e``: the flattened exposure fields of :mod:`mtfm_rec.model.baselines.inputs` (the
candidate's features and its target-attention pooled history), ``W = num_fields * d_model``, so
``D = d_model`` divisible by ``T`` makes ``W`` divisible too. The networks are per scenario, as
the paper trains one model per scenario; the inputs are shared.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.model.baselines.inputs import PerScenarioDense
from mtfm_rec.model.config import ModelConfig
from mtfm_rec.model.heads import _Towers

FFN_EXPANSION = 4  # per-token FFN hidden width = FFN_EXPANSION * d_model


def token_mixing(x: torch.Tensor) -> torch.Tensor:
    """``[n, T, D]`` -> ``[n, T, D]`` with ``H = T`` heads: ``out[:, h, t-th D/T chunk] =
    x[:, t, h-th D/T chunk]`` (module docstring); ``D % T == 0``."""
    n, tokens, d = x.shape
    return x.reshape(n, tokens, tokens, d // tokens).transpose(1, 2).reshape(n, tokens, d)


def _uniform(shape: Tuple[int, ...], fan_in: int) -> nn.Parameter:
    """``nn.Linear``'s default weight init, for batched per-token weights."""
    return nn.Parameter(torch.empty(shape).uniform_(-(fan_in**-0.5), fan_in**-0.5))


class PerTokenFFN(nn.Module):
    """``T`` independent two-layer GELU FFNs, token ``t`` through FFN ``t`` (one batched einsum)."""

    def __init__(self, tokens: int, d_model: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.w1 = _uniform((tokens, d_model, hidden), d_model)
        self.b1 = nn.Parameter(torch.zeros(tokens, hidden))
        self.w2 = _uniform((tokens, hidden, d_model), hidden)
        self.b2 = nn.Parameter(torch.zeros(tokens, d_model))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, T, D]`` -> ``[n, T, D]``."""
        h = F.gelu(torch.einsum("ntd,tdh->nth", x, self.w1) + self.b1)
        return self.dropout(torch.einsum("nth,thd->ntd", h, self.w2) + self.b2)


class RankMixerLayer(nn.Module):
    """Token mixing and the per-token FFN, each with a residual and a LayerNorm."""

    def __init__(self, tokens: int, d_model: int, dropout: float = 0.0, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.mix_norm = nn.LayerNorm(d_model, eps=norm_eps)
        self.ffn = PerTokenFFN(tokens, d_model, FFN_EXPANSION * d_model, dropout)
        self.ffn_norm = nn.LayerNorm(d_model, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.mix_norm(token_mixing(x) + x)
        return self.ffn_norm(self.ffn(s) + s)


class RankMixerNetwork(nn.Module):
    """One scenario's RankMixer: ``e [n, W]`` -> tokens -> layers -> mean -> raw logits ``[n, num_tasks]``."""

    def __init__(self, width: int, num_tasks: int, config: ModelConfig) -> None:
        super().__init__()
        tokens, d = config.baseline.mixer_tokens, config.d_model
        self.tokens, self.num_tasks = tokens, num_tasks
        # tokenization: chunk t of e -> token t, each chunk through its own projection
        self.proj_w = _uniform((tokens, width // tokens, d), width // tokens)
        self.proj_b = nn.Parameter(torch.zeros(tokens, d))
        layers = config.baseline.mixer_layers
        self.layers = nn.ModuleList(
            RankMixerLayer(tokens, d, config.dropout, config.norm_eps) for _ in range(layers)
        )
        self.towers = _Towers(num_tasks, d, config.tower_dim)

    def tokenize(self, e: torch.Tensor) -> torch.Tensor:
        """``[n, W]`` -> ``[n, T, D]``."""
        chunks = e.reshape(e.shape[0], self.tokens, e.shape[1] // self.tokens)  # also for 0 rows
        return torch.einsum("ntc,tcd->ntd", chunks, self.proj_w) + self.proj_b

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        x = self.tokenize(e)
        for layer in self.layers:
            x = layer(x)
        pooled = x.mean(dim=1)
        return self.towers(pooled.unsqueeze(1).expand(-1, self.num_tasks, -1))


class RankMixerDense(PerScenarioDense):
    """Exposure fields -> flattened -> the scenario's RankMixer -> per-task towers -> loss.

    Raises:
        ValueError: ``model.d_model`` is not divisible by ``model.baseline.mixer_tokens`` (the
            token mixing splits each token into that many heads).
    """

    def __init__(self, schema: DatasetSchema, config: ModelConfig) -> None:
        tokens = config.baseline.mixer_tokens
        if config.d_model % tokens:
            raise ValueError(
                f"RankMixer: model.d_model={config.d_model} must be divisible by "
                f"model.baseline.mixer_tokens={tokens} (each token splits into that many heads)"
            )
        super().__init__(schema, config, lambda width, tasks: RankMixerNetwork(width, tasks, config))
