"""The dynamic mask (paper 3.2.2, Figure 2) as a per-query visible-key prefix.

Rules, for a query token i and a key token j of the same sample:

1. H tokens are visible to every token;
2. an R token is visible only to tokens with a strictly later timestamp;
3. a T token is visible only to itself.

A sample's tokens are laid out ``(H; R; T)`` with R sorted by ascending ts (see
``mtfm_rec.data.batch``), so the keys visible to query i are a *prefix* of the sample's H+R block
plus, for a T query, the query itself::

    local key j   0 1 2 3 4 | 5 6 7 8 | 9 10 11        (H = 0..4, R = 5..8 by ts, T = 9..11)
    kind          H H H H H | R R R R | T  T  T
    R ts                      3 5 5 8
    T ts                                4  6  9
    query 10 (T, ts 6) sees   x x x x x | x x x . | .  x  .     prefix_len = 5 + #{R ts < 6} = 8
                                                                 plus itself (self_local = 10)

so each query is encoded by two ints: ``prefix_len`` (keys ``[0, prefix_len)`` are visible) and
``self_local`` (its own local index if it is a T token, else -1). The prefix length is one batched
``searchsorted`` over a per-sample key array that is sorted by construction:
``-inf`` for H, ``ts`` for R, ``+inf`` for T and padding. Nothing N x N is stored; the dense
mask is materialised only by :func:`dense_mask` (tests, debugging).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtfm_rec.data.batch import TOKEN_HISTORY, TOKEN_REALTIME, TOKEN_TARGET, Batch

_INT64_MIN = torch.iinfo(torch.int64).min
_INT64_MAX = torch.iinfo(torch.int64).max


def jagged_to_padded_index(offsets: torch.Tensor, total: int, max_len: int) -> torch.Tensor:
    """Flat index of each jagged row in a padded ``[B * max_len]`` layout.

    Row r of sample b (``offsets[b] <= r < offsets[b+1]``) goes to ``b * max_len + (r - offsets[b])``.
    ``total`` (= ``offsets[-1]``) is passed as a host int so no device sync is needed.
    """
    lengths = offsets[1:] - offsets[:-1]
    sample = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=offsets.device), lengths, output_size=total
    )
    return sample * max_len + torch.arange(total, device=offsets.device) - offsets[sample]


@dataclass
class AttentionLayout:
    """Everything the attention layers of one batch need, computed once per forward.

    Two query sets share the same keys (all N tokens, jagged by ``token_offsets``):

    * full layers: every token is a query (``token_offsets``, ``max_tokens``);
    * target layers: the T tokens only (``target_rows`` / ``target_offsets``, ``max_targets``).

    ``*_self`` are global token rows (-1: no self key), as the kernel op expects;
    ``*_prefix`` and ``*_self_local`` are the prefix encoding (sample-local key indices);
    ``*_pad_index`` place jagged rows into ``[B * max_len]`` padded buffers.
    """

    token_offsets: torch.Tensor  # [B+1]
    token_ts: torch.Tensor  # [N]
    token_kind: torch.Tensor  # [N]
    token_group: torch.Tensor  # [N]
    target_rows: torch.Tensor  # [T]
    target_offsets: torch.Tensor  # [B+1]
    target_ts: torch.Tensor  # [T]
    full_self: torch.Tensor  # [N] row of the token itself if T else -1
    full_prefix: torch.Tensor  # [N]
    full_self_local: torch.Tensor  # [N]
    target_prefix: torch.Tensor  # [T]
    target_self_local: torch.Tensor  # [T]
    token_pad_index: torch.Tensor  # [N] into [B * max_tokens]
    target_pad_index: torch.Tensor  # [T] into [B * max_targets]
    batch_size: int
    num_tokens: int
    max_tokens: int
    num_targets: int
    max_targets: int


def visible_prefix(
    token_offsets: torch.Tensor,
    token_kind: torch.Tensor,
    token_ts: torch.Tensor,
    query_ts: torch.Tensor,
    query_offsets: torch.Tensor,
    max_tokens: int,
    max_queries: int,
    token_pad_index: torch.Tensor,
    query_pad_index: torch.Tensor,
) -> torch.Tensor:
    """Per query, the number of keys of its sample's H+R block it may see (rules 1 and 2).

    Returns ``[num_queries]`` int64 ``prefix_len = L_H + #{R tokens with ts < query ts}``.
    Assumes the Batch layout: H block, then R block sorted by ascending ts, then T block.
    """
    batch = token_offsets.numel() - 1
    kind = token_kind.to(torch.int64)
    key = torch.where(
        kind == TOKEN_HISTORY,
        torch.full_like(token_ts, _INT64_MIN),
        torch.where(kind == TOKEN_REALTIME, token_ts, torch.full_like(token_ts, _INT64_MAX)),
    )
    keys = token_ts.new_full((batch * max_tokens,), _INT64_MAX).index_copy(0, token_pad_index, key)
    queries = query_ts.new_full((batch * max_queries,), _INT64_MAX)
    queries = queries.index_copy(0, query_pad_index, query_ts)
    prefix = torch.searchsorted(keys.view(batch, max_tokens), queries.view(batch, max_queries))
    return prefix.reshape(-1)[query_pad_index]


def build_layout(batch: Batch) -> AttentionLayout:
    """The :class:`AttentionLayout` of a Batch's full (H; R; T) token sequence."""
    n, t = batch.num_tokens, int(batch.target_rows.shape[0])
    offsets = batch.token_offsets
    rows = torch.arange(n, device=offsets.device)
    is_target = batch.token_kind.to(torch.int64) == TOKEN_TARGET
    full_self = torch.where(is_target, rows, torch.full_like(rows, -1))
    lengths = offsets[1:] - offsets[:-1]
    token_start = torch.repeat_interleave(offsets[:-1], lengths, output_size=n)
    token_pad = jagged_to_padded_index(offsets, n, batch.max_tokens)
    target_pad = jagged_to_padded_index(batch.target_offsets, t, batch.max_targets)
    target_ts = batch.token_ts[batch.target_rows]
    full_prefix = visible_prefix(
        offsets,
        batch.token_kind,
        batch.token_ts,
        batch.token_ts,
        offsets,
        batch.max_tokens,
        batch.max_tokens,
        token_pad,
        token_pad,
    )
    target_prefix = visible_prefix(
        offsets,
        batch.token_kind,
        batch.token_ts,
        target_ts,
        batch.target_offsets,
        batch.max_tokens,
        batch.max_targets,
        token_pad,
        target_pad,
    )
    return AttentionLayout(
        token_offsets=offsets,
        token_ts=batch.token_ts,
        token_kind=batch.token_kind,
        token_group=batch.token_group,
        target_rows=batch.target_rows,
        target_offsets=batch.target_offsets,
        target_ts=target_ts,
        full_self=full_self,
        full_prefix=full_prefix,
        full_self_local=torch.where(is_target, rows - token_start, full_self),
        target_prefix=target_prefix,
        target_self_local=batch.target_rows - token_start[batch.target_rows],
        token_pad_index=token_pad,
        target_pad_index=target_pad,
        batch_size=batch.batch_size,
        num_tokens=n,
        max_tokens=batch.max_tokens,
        num_targets=t,
        max_targets=batch.max_targets,
    )


def build_target_only_layout(batch: Batch) -> AttentionLayout:
    """Layout of the feature-only baseline: each sample's T tokens alone, no H or R.

    Token row i of this layout is ``batch.target_rows[i]``; every T token sees only itself.
    """
    t = int(batch.target_rows.shape[0])
    offsets = batch.target_offsets
    rows = torch.arange(t, device=offsets.device)
    lengths = offsets[1:] - offsets[:-1]
    start = torch.repeat_interleave(offsets[:-1], lengths, output_size=t)
    pad = jagged_to_padded_index(offsets, t, batch.max_targets)
    zeros = torch.zeros_like(rows)
    return AttentionLayout(
        token_offsets=offsets,
        token_ts=batch.token_ts[batch.target_rows],
        token_kind=torch.full_like(batch.token_kind[batch.target_rows], TOKEN_TARGET),
        token_group=batch.token_group[batch.target_rows],
        target_rows=rows,
        target_offsets=offsets,
        target_ts=batch.token_ts[batch.target_rows],
        full_self=rows,
        full_prefix=zeros,
        full_self_local=rows - start,
        target_prefix=zeros,
        target_self_local=rows - start,
        token_pad_index=pad,
        target_pad_index=pad,
        batch_size=batch.batch_size,
        num_tokens=t,
        max_tokens=batch.max_targets,
        num_targets=t,
        max_targets=batch.max_targets,
    )


def dense_mask(layout: AttentionLayout, target_queries: bool) -> torch.Tensor:
    """Materialises ``[B, max_q, max_tokens]`` (bool) from the prefix encoding (tests, debugging).

    ``target_queries``: rows are the T tokens (a target layer's ``M_T``, eq. 12) instead of
    all tokens (a full layer's ``M``). Padded query rows are all False.
    """
    if target_queries:
        prefix, self_local = layout.target_prefix, layout.target_self_local
        pad, max_q = layout.target_pad_index, layout.max_targets
    else:
        prefix, self_local = layout.full_prefix, layout.full_self_local
        pad, max_q = layout.token_pad_index, layout.max_tokens
    j = torch.arange(layout.max_tokens, device=prefix.device)
    rows = (j[None, :] < prefix[:, None]) | (j[None, :] == self_local[:, None])
    out = rows.new_zeros(layout.batch_size * max_q, layout.max_tokens)
    out[pad] = rows
    return out.view(layout.batch_size, max_q, layout.max_tokens)
