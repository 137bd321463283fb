"""Shared low-level definitions of the jagged token layout: token kinds, padding, query/key sets.

A batch of B samples is laid out jagged (values + offsets, no global padding): sample b owns rows
``offsets[b]:offsets[b+1]`` of every per-token tensor. Attention runs a set of queries over a set
of keys of the same samples; the two sets are described by :class:`QuerySet` and
:class:`KeySet`, which every HSTU attention implementation (``mtfm_rec.kernels.hstu_attention``)
and the dynamic-mask op take as ``(q, k, v, queries, keys, alpha)``.

The dynamic mask (paper 3.2.2, Figure 2) is derived from the keys' kinds and timestamps and the
queries' timestamps and own rows. Key j is visible to query i (same sample) when

    keys.kind[j] == HISTORY                                       (visible to everyone)
    or keys.kind[j] == REALTIME and keys.ts[j] < queries.ts[i]    (only to strictly later tokens)
    or j == queries.self_rows[i]                                  (a T token sees itself; -1: none)

With the ``(H; R by ts; T)`` layout of ``mtfm_rec.data.batch`` the visible keys of a query are a
prefix of its sample's keys plus the query itself, so two ints per query encode its mask
(:func:`visible_prefix`, :meth:`QuerySet.with_prefix`); the fused C++ kernel and the padded
``prefix`` path read that encoding (``mtfm_rec.model.mask`` explains it).

This module imports nothing of the project: the data layer, the model and every kernel share it.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

_INT64_MIN = torch.iinfo(torch.int64).min
_INT64_MAX = torch.iinfo(torch.int64).max


class TokenKind(enum.IntEnum):
    """The kind of a token (``Batch.token_kind``, ``KeySet.kind``): stored as int8 values."""

    HISTORY = 0  # H: long-term history, visible to every token
    REALTIME = 1  # R: real-time actions, visible to strictly later tokens
    TARGET = 2  # T: an exposure to score, visible only to itself


def row_samples(offsets: torch.Tensor, total: int) -> torch.Tensor:
    """The sample of each jagged row: ``b`` for ``offsets[b] <= r < offsets[b+1]``; ``[total]`` int64.
    ``total`` (= ``offsets[-1]``) is passed as a host int so no device sync is needed."""
    lengths = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(
        torch.arange(lengths.numel(), device=offsets.device), lengths, output_size=total
    )


def padded_index(offsets: torch.Tensor, total: int, max_len: int) -> torch.Tensor:
    """Flat index of each jagged row in a padded ``[B * max_len]`` layout.

    Row r of sample b (``offsets[b] <= r < offsets[b+1]``) goes to ``b * max_len + (r - offsets[b])``.
    ``total`` (= ``offsets[-1]``) is passed as a host int so no device sync is needed.
    """
    sample = row_samples(offsets, total)
    return sample * max_len + torch.arange(total, device=offsets.device) - offsets[sample]


def pad(x: torch.Tensor, offsets: torch.Tensor, max_len: int, fill: float = 0) -> torch.Tensor:
    """Jagged ``[total, ...]`` -> padded ``[B, max_len, ...]`` (``fill`` in the padding)."""
    batch = offsets.numel() - 1
    out = x.new_full((batch * max_len,) + tuple(x.shape[1:]), fill)
    out[padded_index(offsets, x.shape[0], max_len)] = x
    return out.view((batch, max_len) + tuple(x.shape[1:]))


def unpad(x: torch.Tensor, offsets: torch.Tensor, total: int) -> torch.Tensor:
    """Padded ``[B, max_len, ...]`` -> jagged ``[total, ...]``."""
    flat = x.reshape((x.shape[0] * x.shape[1],) + tuple(x.shape[2:]))
    return flat[padded_index(offsets, total, x.shape[1])]


@dataclass(frozen=True)
class KeySet:
    """The keys (and values) of jagged attention: every token of each sample.

    Build with :meth:`create`, which derives ``pad_index``.
    """

    offsets: torch.Tensor  # [B+1] sample b's keys are rows offsets[b]:offsets[b+1]
    kind: torch.Tensor  # [total_kv] TokenKind values
    ts: torch.Tensor  # [total_kv] timestamps
    max_len: int  # host-side maximum of the per-sample key counts
    pad_index: torch.Tensor  # [total_kv] flat index into a padded [B * max_len] buffer

    @classmethod
    def create(cls, offsets: torch.Tensor, kind: torch.Tensor, ts: torch.Tensor, max_len: int) -> KeySet:
        return cls(offsets, kind, ts, max_len, padded_index(offsets, kind.shape[0], max_len))

    @property
    def batch_size(self) -> int:
        return self.offsets.numel() - 1


@dataclass(frozen=True)
class QuerySet:
    """The queries of jagged attention: all tokens (full layers) or the T tokens (target layers).

    Build with :meth:`create`; :meth:`with_prefix` adds the prefix encoding of the mask, which
    the ``cpp`` and ``prefix`` implementations need (the others read ``ts`` / ``self_rows``).
    """

    offsets: torch.Tensor  # [B+1] sample b's queries are rows offsets[b]:offsets[b+1]
    ts: torch.Tensor  # [total_q] timestamps
    self_rows: torch.Tensor  # [total_q] the query's own key row (global), -1 if not a T token
    max_len: int  # host-side maximum of the per-sample query counts
    pad_index: torch.Tensor  # [total_q] flat index into a padded [B * max_len] buffer
    prefix: Optional[torch.Tensor] = None  # [total_q] keys [0, prefix) of the sample are visible
    self_local: Optional[torch.Tensor] = None  # [total_q] self_rows as a sample-local key index

    @classmethod
    def create(
        cls, offsets: torch.Tensor, ts: torch.Tensor, self_rows: torch.Tensor, max_len: int
    ) -> QuerySet:
        return cls(offsets, ts, self_rows, max_len, padded_index(offsets, ts.shape[0], max_len))

    def with_prefix(self, keys: KeySet) -> QuerySet:
        """This set with ``prefix`` and ``self_local`` filled in; exact only for keys in the
        ``(H; R by ts; T)`` layout (:func:`visible_prefix`)."""
        return dataclasses.replace(
            self, prefix=visible_prefix(self, keys), self_local=local_self_rows(self, keys)
        )

    def prefix_encoding(self, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(prefix, self_local)``; a ``ValueError`` naming ``backend`` (the implementation that
        needs them) if this set was built without them."""
        if self.prefix is None or self.self_local is None:
            raise ValueError(
                f"attention backend {backend!r} needs the prefix-encoded mask: build the queries with "
                "QuerySet.with_prefix (mtfm_rec.model.mask.build_layout does)"
            )
        return self.prefix, self.self_local


def local_self_rows(queries: QuerySet, keys: KeySet) -> torch.Tensor:
    """``queries.self_rows`` as sample-local key indices (-1 stays -1)."""
    q_lengths = queries.offsets[1:] - queries.offsets[:-1]
    start = keys.offsets[:-1].repeat_interleave(q_lengths, output_size=queries.ts.shape[0])
    return torch.where(queries.self_rows >= 0, queries.self_rows - start, queries.self_rows)


def visible_prefix(queries: QuerySet, keys: KeySet) -> torch.Tensor:
    """Per query, the number of keys of its sample's H+R block it may see (the H and R rules).

    Returns ``[total_q]`` int64 ``prefix_len = L_H + #{R keys with ts < query ts}``: one batched
    ``searchsorted`` over a per-sample key array that is sorted by construction (``-inf`` for H,
    ``ts`` for R, ``+inf`` for T and padding). Assumes the ``(H; R by ts; T)`` key layout.
    """
    batch = keys.batch_size
    kind = keys.kind.to(torch.int64)
    key = torch.where(
        kind == TokenKind.HISTORY,
        torch.full_like(keys.ts, _INT64_MIN),
        torch.where(kind == TokenKind.REALTIME, keys.ts, torch.full_like(keys.ts, _INT64_MAX)),
    )
    sorted_keys = keys.ts.new_full((batch * keys.max_len,), _INT64_MAX).index_copy(0, keys.pad_index, key)
    padded = queries.ts.new_full((batch * queries.max_len,), _INT64_MAX)
    padded = padded.index_copy(0, queries.pad_index, queries.ts)
    prefix = torch.searchsorted(sorted_keys.view(batch, keys.max_len), padded.view(batch, queries.max_len))
    return prefix.reshape(-1)[queries.pad_index]


__all__ = [
    "KeySet",
    "QuerySet",
    "TokenKind",
    "local_self_rows",
    "pad",
    "padded_index",
    "unpad",
    "visible_prefix",
]
