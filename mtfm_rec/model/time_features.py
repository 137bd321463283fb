"""Each token's own time as angles: the home of MTFM's leak-free time inputs.

* :class:`mtfm_rec.model.tokenizer.TimeEncoding` adds sinusoids of each token's time to ``X(0)``;
* :class:`TimeRotary` rotates pairs of query and key dimensions in the attention by them, so that
  ``q . k`` depends on how far apart in time the query and the key are, not on when they are;
* :class:`TimeBias` appends channels to every head's queries and keys instead, whose share of
  ``q . k`` is a learned function of the same gap (a relative-time bias), leaving the content
  dimensions as they are.

All three read only a token's own timestamp: a later action or exposure never changes an earlier
token's score (a reference point shared by the sample, such as its latest token, would let a
future click move every score: docs/TRAINING.md, "Model quality", finding 8). Angles are taken
from the phase ``t mod P`` in int64, exact however large epoch timestamps are.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from mtfm_rec.model.config import TIME_BIAS_SOURCES


def period_ticks(count: int, min_period_s: float, max_period_s: float, ticks_per_second: int) -> torch.Tensor:
    """``[count]`` int64 periods geometric from ``min_period_s`` to ``max_period_s``, in ticks."""
    periods_s = torch.logspace(math.log10(min_period_s), math.log10(max_period_s), count, dtype=torch.float64)
    return torch.round(periods_s * ticks_per_second).clamp(min=1).to(torch.int64)


def time_angles(ts: torch.Tensor, periods: torch.Tensor) -> torch.Tensor:
    """``[M, P]`` float64 angles ``2 pi (t mod P_i) / P_i`` of int64 timestamps ``ts [M]``."""
    phase = torch.remainder(ts[:, None], periods[None, :]).to(torch.float64)
    return (2 * math.pi) * phase / periods[None, :].to(torch.float64)


def rotate_pairs(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Turns pairs ``(x[..., j], x[..., P + j])`` of ``x [..., 2P]`` by ``angle [..., P]`` (broadcast)."""
    p = angle.shape[-1]
    a, b = x[..., :p], x[..., p:]
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class TimeRotary(nn.Module):
    """Rotates the first ``2 * num_pairs`` dims of each head by the token's time (a time RoPE).

    Dims ``(j, num_pairs + j)`` of every head form pair ``j``, rotated by ``2 pi t / P_j``. For a
    query at ``t_q`` and a key at ``t_k`` the pair's share of ``q . k`` becomes
    ``|q_j| |k_j| cos(phi_j + 2 pi (t_q - t_k) / P_j)``: a function of the gap only, which lets
    the attention learn a recency profile (an action two minutes before an exposure against one
    five hours before, what a same-day intent turns on) that a set of unordered keys cannot show.
    Periods run from 1 minute to 2 days; the remaining ``head_dim - 2 * num_pairs`` dims are left
    as they are (content alone). No parameters: the projections that make q and k learn to use it.
    Off by default: on the synthetic benchmark it lifts the intent-driven scenario's AUC by .003
    and costs the history-driven sparse one .006 (docs/TRAINING.md, "Model quality", finding 11).

    ``head_share`` keeps the other heads content-only: with ``num_kv_heads`` G, the rotary turns
    the first ``G * head_share`` key-value heads and their query heads only (a time head beside
    content heads, so that keys days old keep their content in the others).

    Args:
        num_pairs: rotated dim pairs per head (0: the identity).
        head_dim: the attention's per-head dim (``>= 2 * num_pairs``).
        ticks_per_second: the dataset's time unit (``DatasetSchema.ticks_per_second``).
        head_share: the share of heads rotated, in (0, 1].
    """

    MIN_PERIOD_S, MAX_PERIOD_S = 60.0, 2 * 86400.0

    def __init__(self, num_pairs: int, head_dim: int, ticks_per_second: int, head_share: float = 1.0) -> None:
        super().__init__()
        if num_pairs < 0 or 2 * num_pairs > head_dim:
            raise ValueError(
                f"model.time_rotary_pairs={num_pairs} must be in [0, head_dim / 2 = {head_dim // 2}]"
            )
        if not 0.0 < head_share <= 1.0:
            raise ValueError(f"model.time_rotary_head_share={head_share} must be in (0, 1]")
        self.num_pairs, self.head_share = num_pairs, head_share
        self.periods: torch.Tensor  # [num_pairs] int64 ticks
        periods = period_ticks(num_pairs, self.MIN_PERIOD_S, self.MAX_PERIOD_S, ticks_per_second)
        self.register_buffer("periods", periods, persistent=False)

    def forward(self, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        """``x``: ``[M, heads, head_dim]`` queries or keys at int64 times ``ts [M]``."""
        if self.num_pairs == 0:
            return x
        p, turned = self.num_pairs, round(x.shape[1] * self.head_share)
        angle = time_angles(ts, self.periods).to(x.dtype)[:, None, :]  # [M, 1, P]: every head alike
        h = x[:, :turned]
        rotated = torch.cat([rotate_pairs(h[..., : 2 * p], angle), h[..., 2 * p :]], dim=-1)
        return torch.cat([rotated, x[:, turned:]], dim=1) if turned < x.shape[1] else rotated


class TimeBias(nn.Module):
    """A learned relative-time bias of each query, as ``2 * num_pairs`` channels appended to q and k.

    Pair ``j`` has the period ``P_j`` (1 minute to 2 days, as :class:`TimeRotary`) and the angle
    ``theta_j(t) = 2 pi t / P_j``. A key at ``t_k`` gets the channels
    ``(cos theta_j(t_k), sin theta_j(t_k))`` in every kv head; a query at ``t_q`` gets
    coefficients ``(a_j, b_j)`` (one set per query head) turned by ``theta_j(t_q)``. Their share
    of ``q . k`` is then::

        bias(t_q - t_k) = sum_j  a_j cos(2 pi (t_q - t_k) / P_j)  -  b_j sin(2 pi (t_q - t_k) / P_j)

    a Fourier series of the query-key gap. ``source`` says where the coefficients come from:

    * ``"query"``: ``(a, b) = W x``, a projection of the query's normalised input ``x``, so each
      query chooses its own profile; ``W`` is shared by every token group, so a sparse scenario's
      queries start from the profile the dense ones trained;
    * ``"group"``: one learned ``(a, b)`` per token group (each scenario's T tokens, each
      sequence), HSTU's relative attention bias (Zhai et al. 2024) per group: a scenario's
      profile gets the gradient of that scenario's loss only.

    Unlike the rotary, the ``head_dim`` content dims stay untouched (the history's taste keeps all
    of them); the kernels see q and k of ``head_dim + 2 * num_pairs`` dims and v of ``head_dim``.
    The coefficients start at zero, so a model starts as it would without them. Off by default:
    on the synthetic benchmark four pairs lift the intent-driven scenario by .003 and cost the
    sparse one .002-.004 (docs/TRAINING.md, "Model quality", finding 11).

    Args:
        num_pairs: channel pairs (0: off, q and k returned as they are).
        d_model: the width of the normalised input.
        num_heads: query heads (each gets its own coefficients).
        ticks_per_second: the dataset's time unit (``DatasetSchema.ticks_per_second``).
        source: ``"query"`` or ``"group"`` (``model.time_bias_source``).
        num_groups: token groups (the Group LayerNorm's), for ``source="group"``.
    """

    def __init__(
        self,
        num_pairs: int,
        d_model: int,
        num_heads: int,
        ticks_per_second: int,
        source: str = "query",
        num_groups: int = 1,
    ) -> None:
        super().__init__()
        if num_pairs < 0:
            raise ValueError(f"model.time_bias_pairs={num_pairs} must be >= 0")
        if source not in TIME_BIAS_SOURCES:
            raise ValueError(f"model.time_bias_source={source!r} must be one of {TIME_BIAS_SOURCES}")
        self.num_pairs, self.num_heads = num_pairs, num_heads
        width = num_heads * 2 * num_pairs
        self.coefficients: Optional[nn.Linear] = None
        self.group_coefficients: Optional[nn.Parameter] = None
        if num_pairs and source == "query":
            self.coefficients = nn.Linear(d_model, width)
            nn.init.zeros_(self.coefficients.weight)
            nn.init.zeros_(self.coefficients.bias)
        elif num_pairs:
            self.group_coefficients = nn.Parameter(torch.zeros(num_groups, width))
        self.periods: torch.Tensor  # [num_pairs] int64 ticks
        periods = period_ticks(num_pairs, TimeRotary.MIN_PERIOD_S, TimeRotary.MAX_PERIOD_S, ticks_per_second)
        self.register_buffer("periods", periods, persistent=False)

    @property
    def channels(self) -> int:
        """The dims appended to each head of q and k."""
        return 2 * self.num_pairs

    def query(
        self, q: torch.Tensor, x_norm: torch.Tensor, ts: torch.Tensor, group: torch.Tensor
    ) -> torch.Tensor:
        """``q [..., H, D]`` of inputs ``x_norm [..., d_model]`` at ``ts [...]`` in token groups
        ``group`` (``[...]``, or one that broadcasts to it) -> ``[..., H, D + 2P]``."""
        if self.num_pairs == 0:
            return q
        if self.coefficients is not None:
            coef = self.coefficients(x_norm)
        else:
            assert self.group_coefficients is not None
            coef = self.group_coefficients[group].expand(*x_norm.shape[:-1], -1)
        angle = self._angles(ts, q.dtype)[..., None, :]  # [..., 1, P]: every head alike
        coef = coef.to(q.dtype).unflatten(-1, (self.num_heads, self.channels))
        return torch.cat([q, rotate_pairs(coef, angle)], dim=-1)

    def key(self, k: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        """``k [..., G, D]`` at ``ts [...]`` -> ``[..., G, D + 2P]``."""
        if self.num_pairs == 0:
            return k
        angle = self._angles(ts, k.dtype)
        unit = torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1)[..., None, :]
        return torch.cat([k, unit.expand(*k.shape[:-1], self.channels)], dim=-1)

    def _angles(self, ts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return time_angles(ts.reshape(-1), self.periods).to(dtype).view(*ts.shape, self.num_pairs)
