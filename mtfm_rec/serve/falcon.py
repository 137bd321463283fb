"""M-Falcon (paper 3.3.3): the context once per request, the candidates against its cache.

The dynamic mask makes the context independent of the candidates: no H or R token ever sees a T
token, and a T token sees only the context and itself. So each HSTU layer's context keys and
values are computed once per request and cached, and every candidate (alone or in micro-batches
of ``m``, in any order) attends to them plus itself::

    layer l:  K_ctx, V_ctx = f_kv(GLN(X_ctx))                  once per request      [B, C, G, D]
              X_ctx <- full layer of X_ctx (target layers pass it through)
              per candidate c:  attention over (the visible K_ctx, V_ctx ; its own k_c, v_c)
              X_c <- X_c + f2(GLN(a_c) * u_c)

No candidate x candidate pair is computed (the paper's computation skipping) and no candidate
changes another's score.

The attention is the kernel dispatcher's (``mtfm_rec.kernels.hstu_attention``: the fused C++
kernel on the CPU, Triton on CUDA, the PyTorch references anywhere), on a layout built here from
padded requests, in which every request is one jagged sample of a fixed size (so shapes stay
static for ``torch.export``)::

    context sample b:    C slots, sorted (H; R by ts; padding)      keys = queries = the C slots
    candidate sample b:  keys = (C context slots ; M candidates), queries = the M candidates
    prefix encoding:     prefix = L_H + #{R with ts < query ts}     (padding is never counted)
                         self_local = C + j for candidate j, -1 for a context query

Sorting the slots is what the prefix encoding needs (module ``mtfm_rec.model.mask``); padding
slots get the key ``+inf`` and the kind T, so no query sees them under any backend.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import torch

from mtfm_rec.kernels.jagged import KeySet, QuerySet, TokenKind

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


@dataclass
class ContextCache:
    """Per HSTU layer, the (sorted) context's keys and values, and the order they were put in.

    Attributes:
        keys / values: per layer ``[B, C, G, D]``, slots sorted (H; R by ts; padding).
        kind: ``[B, C]`` int64 TokenKind per sorted slot (T on padding: visible to nobody).
        ts: ``[B, C]`` int64 timestamps per sorted slot.
        sort_key: ``[B, C]`` ascending: ``-inf`` for H, ts for R, ``+inf`` for padding.
    """

    keys: List[torch.Tensor]
    values: List[torch.Tensor]
    kind: torch.Tensor
    ts: torch.Tensor
    sort_key: torch.Tensor


def sort_context(
    kind: torch.Tensor, ts: torch.Tensor, valid: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Orders each request's context slots (H; R by ts; padding), stably.

    Args:
        kind: ``[C]`` TokenKind of each slot (its sequence's kind); ts, valid: ``[B, C]``.
    Returns:
        ``(order [B, C], kind [B, C], ts [B, C], sort_key [B, C])``, the last three sorted.
    """
    history = (kind == TokenKind.HISTORY)[None, :]
    key = torch.where(history, torch.full_like(ts, _INT64_MIN), ts)
    key = torch.where(valid, key, torch.full_like(ts, _INT64_MAX))
    sort_key, order = torch.sort(key, dim=1, stable=True)
    kind_b = torch.where(valid, kind[None, :].expand_as(ts), torch.full_like(ts, int(TokenKind.TARGET)))
    return order, kind_b.gather(1, order), ts.gather(1, order), sort_key


def _samples(batch: int, size: int, device: torch.device) -> torch.Tensor:
    """``[B+1]`` offsets of B samples of ``size`` rows each."""
    return torch.arange(batch + 1, device=device) * size


def context_layout(cache: ContextCache) -> Tuple[QuerySet, KeySet]:
    """Queries and keys of the context over itself: every slot is a query (module docstring)."""
    b, c = cache.ts.shape
    offsets = _samples(b, c, cache.ts.device)
    flat_ts, flat_kind = cache.ts.reshape(-1), cache.kind.reshape(-1)
    keys = KeySet.create(offsets, flat_kind, flat_ts, c)
    prefix = torch.searchsorted(cache.sort_key, cache.ts, right=False).reshape(-1)
    none = torch.full_like(flat_ts, -1)
    queries = QuerySet(offsets, flat_ts, none, c, keys.pad_index, prefix, none)
    return queries, keys


def candidate_layout(cache: ContextCache, cand_ts: torch.Tensor) -> Tuple[QuerySet, KeySet]:
    """Queries (the M candidates of each request) and keys (its C context slots, then the M
    candidates) for the candidates' attention (module docstring)."""
    b, c = cache.ts.shape
    m = cand_ts.shape[1]
    device = cand_ts.device
    kind = torch.cat([cache.kind, torch.full_like(cand_ts, int(TokenKind.TARGET))], dim=1)
    key_ts = torch.cat([cache.ts, cand_ts], dim=1)
    keys = KeySet.create(_samples(b, c + m, device), kind.reshape(-1), key_ts.reshape(-1), c + m)
    self_local = (c + torch.arange(m, device=device)).expand(b, m)
    self_rows = torch.arange(b, device=device)[:, None] * (c + m) + self_local
    prefix = torch.searchsorted(cache.sort_key, cand_ts, right=False)
    rows = torch.arange(b * m, device=device)  # fixed-size samples: padded row = jagged row
    queries = QuerySet(
        _samples(b, m, device),
        cand_ts.reshape(-1),
        self_rows.reshape(-1),
        m,
        rows,
        prefix.reshape(-1),
        self_local.reshape(-1),
    )
    return queries, keys


def context_fingerprint(seq_ids: Sequence[torch.Tensor], seq_ts: Sequence[torch.Tensor]) -> bytes:
    """A digest of one request's context (its ids and timestamps, every sequence, no padding):
    equal digests mean an identical context, hence an identical :class:`ContextCache`."""
    digest = hashlib.blake2b(digest_size=16)
    for ids, ts in zip(seq_ids, seq_ts):
        for t in (ids, ts):
            digest.update(str(tuple(t.shape)).encode())
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.digest()


class ContextStore:
    """A bounded LRU of encoded contexts, keyed by :func:`context_fingerprint`.

    A user's context is encoded once and reused by every later request with the same context
    (the next page of a feed, another scenario's request at the same time): only the
    candidates are computed then. A hit is exact by construction (the key is the content), so
    nothing can go stale; ``max_entries`` bounds the memory (each entry holds every layer's
    ``[1, C, G, D]`` keys and values).
    """

    def __init__(self, max_entries: int = 1024) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries={max_entries} must be >= 1")
        self.max_entries = max_entries
        self._entries: "OrderedDict[bytes, ContextCache]" = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get_or_encode(self, key: bytes, encode: Callable[[], ContextCache]) -> ContextCache:
        """The cached context of ``key``, or ``encode()``'s, stored (evicting the oldest)."""
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        self.misses += 1
        cache = encode()
        self._entries[key] = cache
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return cache
