"""Random jagged MTFM token batches for the kernel parity tests (hypothesis strategies)."""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from hypothesis import strategies as st

from mtfm_rec.kernels.jagged import KeySet, QuerySet, TokenKind


def build_batch(
    blocks: Sequence[Tuple[int, int, int]],
    num_heads: int,
    num_kv_heads: int,
    dim: int,
    dim_v: int,
    target: bool,
    sorted_layout: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    max_ts: int = 20,
) -> Dict[str, object]:
    """The ``hstu_attention`` keyword arguments of a batch of samples with (L_H, L_R, L_T) each:
    ``q``, ``k``, ``v``, ``queries`` (a ``QuerySet``) and ``keys`` (a ``KeySet``).

    ``sorted_layout`` follows ``mtfm_rec.data.batch`` (H by ts, then R by ts, then T); unsorted
    timestamps check that the kernels rely on the layout for speed only, never for correctness.
    Small ``max_ts`` gives ties (an R key with the query's own ts is invisible). With the sorted
    layout the queries carry the prefix encoding too (``QuerySet.with_prefix``: ``cpp``, ``prefix``).
    """
    gen = torch.Generator().manual_seed(seed)
    kinds: List[int] = []
    ts: List[int] = []
    offsets = [0]
    for lh, lr, lt in blocks:
        kinds += [TokenKind.HISTORY] * lh + [TokenKind.REALTIME] * lr + [TokenKind.TARGET] * lt
        parts = [torch.randint(0, max_ts, (n,), generator=gen) for n in (lh, lr, lt)]
        if sorted_layout:
            parts[0], parts[1] = parts[0].sort().values, parts[1].sort().values
        ts += torch.cat(parts).tolist()
        offsets.append(offsets[-1] + lh + lr + lt)
    kv_kind = torch.tensor(kinds, dtype=torch.int8)
    kv_ts = torch.tensor(ts, dtype=torch.int64)
    kv_offsets = torch.tensor(offsets, dtype=torch.int64)
    is_t = kv_kind == TokenKind.TARGET
    if target:
        q_rows = torch.nonzero(is_t).flatten()
        n_t = torch.tensor([b[2] for b in blocks], dtype=torch.int64)
        q_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), n_t.cumsum(0)])
    else:
        q_rows = torch.arange(offsets[-1])
        q_offsets = kv_offsets.clone()
    q_self = torch.where(is_t[q_rows], q_rows, torch.full_like(q_rows, -1))
    q_len = q_offsets[1:] - q_offsets[:-1]
    kv_len = kv_offsets[1:] - kv_offsets[:-1]
    total_q, total_kv = q_rows.numel(), offsets[-1]
    out: Dict[str, object] = dict(
        q=torch.randn(total_q, num_heads, dim, generator=gen).to(dtype).to(device),
        k=torch.randn(total_kv, num_kv_heads, dim, generator=gen).to(dtype).to(device),
        v=torch.randn(total_kv, num_kv_heads, dim_v, generator=gen).to(dtype).to(device),
    )
    max_q_len = int(q_len.max()) if q_len.numel() else 0
    max_kv_len = int(kv_len.max()) if kv_len.numel() else 0
    keys = KeySet.create(kv_offsets.to(device), kv_kind.to(device), kv_ts.to(device), max_kv_len)
    queries = QuerySet.create(q_offsets.to(device), kv_ts[q_rows].to(device), q_self.to(device), max_q_len)
    out["keys"] = keys
    out["queries"] = queries.with_prefix(keys) if sorted_layout else queries
    return out


MASK_KEYS = ("queries", "keys")


@st.composite
def attention_cases(draw, max_block: int = 12, max_batch: int = 3) -> Dict[str, object]:
    """Small jagged batches: empty samples, single tokens, L_T = 0, G from 1 to H."""
    batch = draw(st.integers(0, max_batch))
    block = st.integers(0, max_block)
    blocks = [(draw(block), draw(block), draw(st.integers(0, max_block // 2))) for _ in range(batch)]
    num_heads = draw(st.sampled_from([1, 2, 4]))
    num_kv_heads = draw(st.sampled_from([g for g in (1, 2, 4) if num_heads % g == 0]))
    return dict(
        blocks=blocks,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        dim=draw(st.sampled_from([4, 8, 16])),
        dim_v=draw(st.sampled_from([4, 8, 12])),
        target=draw(st.booleans()),
        sorted_layout=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )
