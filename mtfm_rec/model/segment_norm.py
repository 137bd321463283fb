"""Segment-wise normalisation of HSTU attention (``model.attention_normalisation: segment``).

HSTU divides the pointwise weights by the query's visible-key count (``visible``, the paper's
default)::

    a_q = sum_{j visible} silu(alpha q.k_j) v_j / n_visible(q)

so a candidate that sees 64 history orders and a burst of 2 real-time clicks gives the burst
2/67 of the normalisation's mass, whatever the history's length. ``segment`` normalises each
segment of the visible keys by its own count instead: the history H, and the rest (the visible
R actions and, for a T query, itself)::

    a_q = sum_{j in H} w_j v_j / n_H(q)  +  sum_{j in R, T visible} w_j v_j / n_rest(q)

It runs on any attention backend unchanged: the values are split into two channel halves (H keys'
values in the first, the others' in the second, zeros elsewhere), one attention call computes both
segments' sums over ``n_visible``, and :func:`merge_segments` rescales each half by
``n_visible / n_segment`` and adds them. The counts come from the prefix encoding of the mask
(``QuerySet.with_prefix``): ``n_visible = prefix + [T query]`` and ``n_H = min(prefix, L_H)``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from mtfm_rec.kernels.backends import AttentionBackend
from mtfm_rec.kernels.hstu_attention import hstu_attention
from mtfm_rec.kernels.jagged import KeySet, QuerySet, TokenKind


def hstu_attention_by_segment(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    queries: QuerySet,
    keys: KeySet,
    alpha: Optional[float],
    backend: Union[AttentionBackend, str],
) -> torch.Tensor:
    """:func:`~mtfm_rec.kernels.hstu_attention.hstu_attention` with the history and the other
    visible keys each normalised by their own count (module docstring); ``[total_q, H, Dv]``.
    ``queries`` must carry the prefix encoding of the mask."""
    prefix, self_local = queries.prefix_encoding("segment normalisation")
    scales = segment_scales(keys.kind, keys.offsets, queries.offsets, prefix, self_local)
    both = hstu_attention(q, k, split_values(v, keys.kind), queries, keys, alpha, backend)
    return merge_segments(both, scales)


def split_values(v: torch.Tensor, key_kind: torch.Tensor) -> torch.Tensor:
    """``v [N, G, Dv]`` -> ``[N, G, 2 Dv]``: history keys' values in the first half, every other
    key's in the second, zeros in the other half."""
    history = (key_kind == TokenKind.HISTORY).to(v.dtype)[:, None, None]
    return torch.cat([v * history, v * (1 - history)], dim=-1)


@torch.fx.wrap
def segment_scales(
    key_kind: torch.Tensor,
    key_offsets: torch.Tensor,
    query_offsets: torch.Tensor,
    prefix: torch.Tensor,
    self_local: torch.Tensor,
) -> torch.Tensor:
    """``[total_q, 2]``: ``n_visible / n_H`` and ``n_visible / n_rest`` per query (a count of 0
    counts as 1: its segment's sum is 0 then)."""
    is_history = (key_kind == TokenKind.HISTORY).to(torch.int64)
    cumulative = torch.cat([is_history.new_zeros(1), is_history.cumsum(0)])
    history_per_sample = cumulative[key_offsets[1:]] - cumulative[key_offsets[:-1]]
    query_counts = query_offsets[1:] - query_offsets[:-1]
    history_len = history_per_sample.repeat_interleave(query_counts, output_size=prefix.shape[0])
    n_visible = prefix + (self_local >= 0).to(prefix.dtype)
    n_history = torch.minimum(prefix, history_len)
    n_rest = n_visible - n_history
    counts = torch.stack([n_history, n_rest], dim=-1).clamp(min=1)
    return n_visible[:, None].to(torch.float32) / counts.to(torch.float32)


def merge_segments(out: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``out [Q, H, 2 Dv]`` of :func:`split_values`'s values, ``scales [Q, 2]`` of
    :func:`segment_scales` -> ``[Q, H, Dv]``: each segment's sum over its own count."""
    history, rest = out.chunk(2, dim=-1)
    scales = scales.to(out.dtype)[:, None, :, None]
    return history * scales[:, :, 0] + rest * scales[:, :, 1]


def visible_counts(visible: torch.Tensor, history: torch.Tensor, segment: bool) -> torch.Tensor:
    """The count each visible key's weight is divided by, for weights recomputed densely (the
    attention probes): ``visible [..., L]`` the mask, ``history`` (broadcastable to it) the keys
    that are H tokens. ``segment``: the count of the key's own segment; else ``n_visible``.
    Returns ``[..., L]`` int64, at least 1."""
    n_visible = visible.sum(-1, keepdim=True)
    if not segment:
        return n_visible.clamp(min=1).expand_as(visible)
    n_history = (visible & history).sum(-1, keepdim=True)
    return torch.where(history, n_history, n_visible - n_history).clamp(min=1)
