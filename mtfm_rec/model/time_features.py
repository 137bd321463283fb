"""Each token's own time as angles: the home of MTFM's two leak-free time inputs.

* :class:`mtfm_rec.model.tokenizer.TimeEncoding` adds sinusoids of each token's time to ``X(0)``;
* :class:`TimeRotary` rotates pairs of query and key dimensions in the attention by them, so that
  ``q . k`` depends on how far apart in time the query and the key are, not on when they are.

Both read only a token's own timestamp: a later action or exposure never changes an earlier
token's score (a reference point shared by the sample, such as its latest token, would let a
future click move every score: docs/TRAINING.md, "Model quality", finding 8). Angles are taken
from the phase ``t mod P`` in int64, exact however large epoch timestamps are.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def period_ticks(count: int, min_period_s: float, max_period_s: float, ticks_per_second: int) -> torch.Tensor:
    """``[count]`` int64 periods geometric from ``min_period_s`` to ``max_period_s``, in ticks."""
    periods_s = torch.logspace(math.log10(min_period_s), math.log10(max_period_s), count, dtype=torch.float64)
    return torch.round(periods_s * ticks_per_second).clamp(min=1).to(torch.int64)


def time_angles(ts: torch.Tensor, periods: torch.Tensor) -> torch.Tensor:
    """``[M, P]`` float64 angles ``2 pi (t mod P_i) / P_i`` of int64 timestamps ``ts [M]``."""
    phase = torch.remainder(ts[:, None], periods[None, :]).to(torch.float64)
    return (2 * math.pi) * phase / periods[None, :].to(torch.float64)


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
        cos, sin = torch.cos(angle), torch.sin(angle)
        h = x[:, :turned]
        a, b, rest = h[..., :p], h[..., p : 2 * p], h[..., 2 * p :]
        rotated = torch.cat([a * cos - b * sin, a * sin + b * cos, rest], dim=-1)
        return torch.cat([rotated, x[:, turned:]], dim=1) if turned < x.shape[1] else rotated
