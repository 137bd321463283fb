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
``-inf`` for H, ``ts`` for R, ``+inf`` for T and padding (``mtfm_rec.kernels.jagged.visible_prefix``,
``QuerySet.with_prefix``). Nothing N x N is stored; the dense mask is materialised only by
:func:`dense_mask` (tests, debugging).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from mtfm_rec.data.batch import Batch
from mtfm_rec.kernels.jagged import KeySet, QuerySet, TokenKind


@dataclass(frozen=True)
class AttentionLayout:
    """Everything the attention layers of one batch need, computed once per forward.

    Two query sets share the same keys (all N tokens, jagged by ``keys.offsets``):

    * ``full``: every token is a query (full layers);
    * ``target``: the T tokens only (target layers; their token rows are ``target_rows``).

    Both carry the prefix encoding of their mask (``prefix``, ``self_local``) besides the kinds /
    timestamps view (``ts``, ``self_rows``), so every attention backend reads what it needs.
    """

    keys: KeySet  # all N tokens: offsets [B+1], kind [N], ts [N], max_len = max tokens per sample
    full: QuerySet  # [N] queries; self_rows: the token's own row if T else -1
    target: QuerySet  # [T] queries; self_rows = target_rows
    token_group: torch.Tensor  # [N] norm group of each token
    target_rows: torch.Tensor  # [T] token row of each T token
    batch_size: int
    num_tokens: int
    num_targets: int

    def queries(self, target: bool) -> QuerySet:
        """The query set of a target (``True``) or full (``False``) layer."""
        return self.target if target else self.full


def build_layout(batch: Batch) -> AttentionLayout:
    """The :class:`AttentionLayout` of a Batch's full (H; R; T) token sequence."""
    n, t = batch.num_tokens, int(batch.target_rows.shape[0])
    offsets = batch.token_offsets
    rows = torch.arange(n, device=offsets.device)
    is_target = batch.token_kind.to(torch.int64) == TokenKind.TARGET
    keys = KeySet.create(offsets, batch.token_kind, batch.token_ts, batch.max_tokens)
    full_self = torch.where(is_target, rows, torch.full_like(rows, -1))
    full = QuerySet.create(offsets, batch.token_ts, full_self, batch.max_tokens)
    target_ts = batch.token_ts[batch.target_rows]
    target = QuerySet.create(batch.target_offsets, target_ts, batch.target_rows, batch.max_targets)
    return AttentionLayout(
        keys=keys,
        full=full.with_prefix(keys),
        target=target.with_prefix(keys),
        token_group=batch.token_group,
        target_rows=batch.target_rows,
        batch_size=batch.batch_size,
        num_tokens=n,
        num_targets=t,
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
    ts = batch.token_ts[batch.target_rows]
    kind = torch.full_like(batch.token_kind[batch.target_rows], TokenKind.TARGET)
    keys = KeySet.create(offsets, kind, ts, batch.max_targets)
    # every query sees no H/R prefix and only itself: the encoding is known without a search
    queries = QuerySet(
        offsets, ts, rows, batch.max_targets, keys.pad_index, torch.zeros_like(rows), rows - start
    )
    return AttentionLayout(
        keys=keys,
        full=queries,
        target=queries,
        token_group=batch.token_group[batch.target_rows],
        target_rows=rows,
        batch_size=batch.batch_size,
        num_tokens=t,
        num_targets=t,
    )


def model_layout(batch: Batch, use_sequences: bool) -> Tuple[AttentionLayout, Dict[str, torch.Tensor]]:
    """The layout a model attends over, and per scenario the layout row of each exposure.

    With sequences, the batch's full (H; R; T) layout and ``batch.target_positions``; without
    (the feature-only ablation), :func:`build_target_only_layout`, whose row i is the batch's T
    token ``target_rows[i]``.
    """
    if use_sequences:
        return build_layout(batch), batch.target_positions
    layout = build_target_only_layout(batch)
    t = layout.num_tokens
    inverse = torch.zeros(batch.num_tokens, dtype=torch.int64, device=batch.target_rows.device)
    inverse = inverse.index_copy(0, batch.target_rows, torch.arange(t, device=inverse.device))
    return layout, {name: inverse[pos] for name, pos in batch.target_positions.items()}


def dense_mask(layout: AttentionLayout, target_queries: bool) -> torch.Tensor:
    """Materialises ``[B, max_q, max_tokens]`` (bool) from the prefix encoding (tests, debugging).

    ``target_queries``: rows are the T tokens (a target layer's ``M_T``, eq. 12) instead of
    all tokens (a full layer's ``M``). Padded query rows are all False.
    """
    queries = layout.queries(target_queries)
    prefix, self_local = queries.prefix_encoding("dense_mask")
    max_q, max_kv = queries.max_len, layout.keys.max_len
    j = torch.arange(max_kv, device=prefix.device)
    rows = (j[None, :] < prefix[:, None]) | (j[None, :] == self_local[:, None])
    out = rows.new_zeros(layout.batch_size * max_q, max_kv)
    out[queries.pad_index] = rows
    return out.view(layout.batch_size, max_q, max_kv)
