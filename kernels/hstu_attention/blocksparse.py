"""The CPU fast path of HSTU attention: block-sparse PyTorch with the kernel's tile skipping.

On a CPU, HSTU attention is bound by the number of score elements it touches (two batched
matmuls plus the SiLU / mask / normalisation passes over every score, forward and backward).
The reference pads each sample to ``max_len`` and scores every (query, key) pair; this path does
what the Triton kernel does, in PyTorch:

1. cut every sample's queries and keys into chunks of ``block`` rows (jagged, no global padding);
2. keep only the (query chunk, key chunk) pairs of the same sample in which some key is visible
   to some query (per-chunk summaries: any H key, the earliest R key vs the latest query, the
   chunks the queries' own T keys fall in), i.e. skip what the mask empties;
3. score the kept pairs as one batch with a fused SiLU-attention autograd function (its backward
   uses ``silu_backward`` and recomputes the weights rather than saving them), the H // G query
   heads of a kv group stacked into one matmul (GQA without repeating K/V);
4. sum the pairs back into their query chunks (segment sums), already divided by n_visible.

When skipping would save little (more than ``dense_above`` of the pairs are non-empty) the
gathers cost more than they save, and the dense reference runs instead.

Exact (same semantics as the reference) for any input; fast when the layout makes the mask
sparse, as the MTFM (H; R by ts; T) layout does for full attention: T keys are seen only by
their own query, and history queries see none of the later real-time keys. Measured (one CPU
thread, docs/KERNELS.md): about 2x the reference's fwd+bwd for full attention at N = 1024-2048
(forward alone 1.5-3x from N = 256); target attention (dense mask) goes to the reference.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from mtfm_rec.kernels.hstu_attention.reference import heads_per_group, hstu_attention_reference, score_scale
from mtfm_rec.kernels.jagged import KeySet, QuerySet, TokenKind

DEFAULT_BLOCK = 128
# Above this fraction of computed chunk pairs the gathers cost more than the skipping saves
# (measured: target layers at 81-100% ran at 0.5-0.9x the reference), so the dense reference runs.
DEFAULT_DENSE_ABOVE = 0.8


class _PairAttention(torch.autograd.Function):
    """SiLU attention of P independent (query block, key block) pairs, normalised per query.

    q [P*G, r*C, D], k [P*G, Ck, D], v [P*G, Ck, Dv]; mask [P, 1, C, Ck] (float 0/1);
    inv_n [P, 1, C, 1]. Returns [P*G, r*C, Dv].
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, inv_n, alpha):
        pairs = mask.shape[0]
        s = torch.bmm(q, k.transpose(1, 2)).mul_(alpha)
        w = F.silu(s)
        w.view(pairs, -1, mask.shape[2], mask.shape[3]).mul_(mask)
        out = torch.bmm(w, v)
        out.view(pairs, -1, mask.shape[2], out.shape[-1]).mul_(inv_n)
        ctx.save_for_backward(q, k, v, mask, inv_n, s)
        ctx.alpha = alpha
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, mask, inv_n, s = ctx.saved_tensors
        pairs, _, c, ck = mask.shape
        do = (dout.view(pairs, -1, c, dout.shape[-1]) * inv_n).view(dout.shape)
        ds = torch.ops.aten.silu_backward(torch.bmm(do, v.transpose(1, 2)), s)
        ds.view(pairs, -1, c, ck).mul_(mask * ctx.alpha)
        w = F.silu(s, inplace=True)  # s is not needed after this
        w.view(pairs, -1, c, ck).mul_(mask)
        dv = torch.bmm(w.transpose(1, 2), do)
        dq = torch.bmm(ds, k)
        dk = torch.bmm(ds.transpose(1, 2), q)
        return dq, dk, dv, None, None, None


def _segment_sum(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sums consecutive runs of rows of x ([sum(lengths), ...] -> [len(lengths), ...])."""
    flat = torch.segment_reduce(x.reshape(x.shape[0], -1), "sum", lengths=lengths, axis=0, unsafe=True)
    return flat.view((lengths.numel(),) + tuple(x.shape[1:]))


class _Gather(torch.autograd.Function):
    """``x.index_select(0, index)`` whose backward is a sort + segment sum: the CPU ``index_add_``
    (the stock backward) is an order of magnitude slower here."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        order = torch.argsort(index, stable=True)
        lengths = torch.bincount(index, minlength=ctx.rows)
        return _segment_sum(grad.contiguous().index_select(0, order), lengths), None


class _SortedSum(torch.autograd.Function):
    """Sums rows of x into ``rows`` slots by a non-decreasing ``index`` (backward: a gather)."""

    @staticmethod
    def forward(ctx, x, index, rows):
        ctx.save_for_backward(index)
        return _segment_sum(x.contiguous(), torch.bincount(index, minlength=rows))

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.contiguous().index_select(0, index), None, None


def _chunks(offsets: torch.Tensor, block: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Jagged rows -> chunks of ``block``: (sample [C], rows [C, block] with -1 padding, start [C])."""
    lengths = offsets[1:] - offsets[:-1]
    per = (lengths + block - 1) // block
    sample = torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), per)
    first = torch.cumsum(per, 0) - per
    start = (
        offsets[:-1][sample] + (torch.arange(sample.numel(), device=offsets.device) - first[sample]) * block
    )
    rows = start[:, None] + torch.arange(block, device=offsets.device)[None, :]
    rows = torch.where(rows < offsets[1:][sample][:, None], rows, torch.full_like(rows, -1))
    return sample, rows, start


def _take(x: torch.Tensor, rows: torch.Tensor, fill) -> torch.Tensor:
    """x[rows] with ``fill`` where rows == -1."""
    valid = rows >= 0
    out = x[rows.clamp(min=0)]
    shape = valid.shape + (1,) * (out.dim() - valid.dim())
    return torch.where(valid.view(shape), out, torch.as_tensor(fill, dtype=x.dtype, device=x.device))


def _rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x[rows] for a [chunks, block] row table with -1 padding -> zeros (one index_select)."""
    ext = torch.cat([x, x.new_zeros((1,) + tuple(x.shape[1:]))])
    idx = torch.where(rows >= 0, rows, torch.full_like(rows, x.shape[0])).flatten()
    return _Gather.apply(ext, idx)


@dataclasses.dataclass
class _Chunks:
    """The jagged queries and keys cut into chunks of ``block`` rows, with per-chunk metadata.

    Row tables are [chunks, block] with -1 past a sample's end; the metadata tables hold, per row,
    the key kind (-1 padding), key ts, query ts and the query's own key row (-1: none).
    """

    block: int
    q_sample: torch.Tensor
    q_rows: torch.Tensor
    k_sample: torch.Tensor
    k_rows: torch.Tensor
    k_start: torch.Tensor
    kind: torch.Tensor
    kts: torch.Tensor
    qts: torch.Tensor
    self_rows: torch.Tensor

    @classmethod
    def build(cls, queries: QuerySet, keys: KeySet, block: int) -> _Chunks:
        ts_dtype = torch.promote_types(queries.ts.dtype, keys.ts.dtype)
        q_sample, q_rows, _ = _chunks(queries.offsets.to(torch.int64), block)
        k_sample, k_rows, k_start = _chunks(keys.offsets.to(torch.int64), block)
        return cls(
            block=block,
            q_sample=q_sample,
            q_rows=q_rows,
            k_sample=k_sample,
            k_rows=k_rows,
            k_start=k_start,
            kind=_take(keys.kind.to(torch.int64), k_rows, -1),
            kts=_take(keys.ts.to(ts_dtype), k_rows, 0),
            qts=_take(queries.ts.to(ts_dtype), q_rows, 0),
            self_rows=_take(queries.self_rows.to(torch.int64), q_rows, -1),
        )


def _kept_pairs(c: _Chunks, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """(query chunk, key chunk) pairs of the same sample in which some key is visible to some
    query, from per-chunk summaries (O(N)): (pq, pk) with pq non-decreasing, and the number of
    same-sample pairs."""
    ts_dtype = c.kts.dtype
    if ts_dtype.is_floating_point:
        lo, hi = -float("inf"), float("inf")
    else:
        lo, hi = torch.iinfo(ts_dtype).min, torch.iinfo(ts_dtype).max
    k_any_h = (c.kind == TokenKind.HISTORY).any(1)
    k_min_r = torch.where(c.kind == TokenKind.REALTIME, c.kts, torch.full_like(c.kts, hi)).amin(1)
    q_max_ts = torch.where(c.q_rows >= 0, c.qts, torch.full_like(c.qts, lo)).amax(1)
    same = c.q_sample[:, None] == c.k_sample[None, :]
    keep = same & (k_any_h[None, :] | (k_min_r[None, :] < q_max_ts[:, None]))
    # A query's own key: mark the key chunk that holds row q_self (chunks of a sample are
    # consecutive and start at k_start, so the chunk is found by a search on k_start).
    has_self = c.self_rows >= 0
    if has_self.any():
        qi = torch.arange(c.q_rows.shape[0], device=device)[:, None].expand_as(c.self_rows)[has_self]
        ki = torch.searchsorted(c.k_start, c.self_rows[has_self], right=True) - 1
        keep[qi, ki] = True
        keep &= same
    pq, pk = keep.nonzero(as_tuple=True)
    return pq, pk, int(same.sum())


def _pair_mask(
    c: _Chunks, pq: torch.Tensor, pk: torch.Tensor, dtype: torch.dtype
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The mask of each kept pair [P, block, block] (bool) and 1 / n_visible per query row
    [Cq, block] (n_visible summed over the pairs of the query chunk, at least 1)."""
    qr, kr = c.q_rows[pq], c.k_rows[pk]
    kind_p, kts_p = c.kind[pk], c.kts[pk]
    vis = (kind_p == TokenKind.HISTORY)[:, None, :] | (
        (kind_p == TokenKind.REALTIME)[:, None, :] & (kts_p[:, None, :] < c.qts[pq][:, :, None])
    )
    vis = (
        (vis | (kr[:, None, :] == c.self_rows[pq][:, :, None]))
        & (qr >= 0)[:, :, None]
        & (kr >= 0)[:, None, :]
    )
    n_vis = _segment_sum(vis.sum(-1).to(dtype), torch.bincount(pq, minlength=c.q_rows.shape[0]))
    return vis, 1.0 / n_vis.clamp(min=1).to(dtype)


def _attend_pairs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    c: _Chunks,
    pq: torch.Tensor,
    pk: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """SiLU attention over the kept pairs only, summed back into the jagged query rows."""
    total_q, num_heads, dim = q.shape
    num_kv_heads, dim_v = k.shape[1], v.shape[2]
    r, block = heads_per_group(q, k), c.block
    vis, inv_n = _pair_mask(c, pq, pk, q.dtype)
    # Gather per chunk once (small), in the [chunk, G, rows, D] layout the matmuls want, then per
    # pair with index_select (contiguous block copies; backward is a segment sum).
    num_q_chunks, num_k_chunks, pairs = c.q_rows.shape[0], c.k_rows.shape[0], pq.numel()
    qc = _rows(q, c.q_rows).view(num_q_chunks, block, num_kv_heads, r, dim).permute(0, 2, 3, 1, 4)
    kc = _rows(k, c.k_rows).view(num_k_chunks, block, num_kv_heads, dim).permute(0, 2, 1, 3)
    vc = _rows(v, c.k_rows).view(num_k_chunks, block, num_kv_heads, dim_v).permute(0, 2, 1, 3)
    qc = qc.reshape(num_q_chunks, num_kv_heads, r * block, dim)
    ob = _PairAttention.apply(
        _Gather.apply(qc, pq).view(pairs * num_kv_heads, r * block, dim),
        _Gather.apply(kc.contiguous(), pk).view(pairs * num_kv_heads, block, dim),
        _Gather.apply(vc.contiguous(), pk).view(pairs * num_kv_heads, block, dim_v),
        vis[:, None].to(q.dtype),
        inv_n[pq][:, None, :, None],
        alpha,
    )
    # pq is non-decreasing (nonzero is row-major): the pairs of a query chunk are consecutive.
    chunk_out = _SortedSum.apply(ob.view(pairs, num_kv_heads, r * block, dim_v), pq, num_q_chunks)
    # [Cq, G, r, block, Dv] -> [Cq * block, H, Dv] -> the jagged query rows
    chunk_out = chunk_out.view(num_q_chunks, num_kv_heads, r, block, dim_v).permute(0, 3, 1, 2, 4)
    chunk_out = chunk_out.reshape(num_q_chunks * block, num_heads, dim_v)
    flat = c.q_rows.flatten()
    slot = torch.empty(total_q, dtype=torch.int64, device=q.device)
    slot[flat[flat >= 0]] = torch.nonzero(flat >= 0).flatten()
    return _Gather.apply(chunk_out, slot)


def hstu_attention_blocksparse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    queries: QuerySet,
    keys: KeySet,
    alpha: Optional[float] = None,
    block: int = DEFAULT_BLOCK,
    dense_above: float = DEFAULT_DENSE_ABOVE,
    stats: Optional[dict] = None,
) -> torch.Tensor:
    """Block-sparse HSTU attention (differentiable in q, k, v); semantics of the reference.

    Args:
        block: chunk size in rows (queries and keys).
        dense_above: when more than this fraction of the chunk pairs is non-empty, the dense
            reference runs instead (same result; ``1.0`` always takes the block-sparse path).
        stats: if a dict, receives ``pairs_total`` (same-sample chunk pairs), ``pairs_kept`` and
            ``dense`` (whether the dense reference ran).
    """
    total_q, num_heads, _ = q.shape
    heads_per_group(q, k)  # validates the head counts before anything runs
    alpha = score_scale(q, alpha)
    out = q.new_zeros(total_q, num_heads, v.shape[2])
    if total_q == 0 or k.shape[0] == 0:
        return out
    chunks = _Chunks.build(queries, keys, block)
    pq, pk, pairs_total = _kept_pairs(chunks, q.device)
    dense = pq.numel() > dense_above * pairs_total
    if stats is not None:
        stats.update(pairs_total=pairs_total, pairs_kept=int(pq.numel()), dense=dense)
    if dense:
        return hstu_attention_reference(q, k, v, queries, keys, alpha)
    if pq.numel() == 0:
        # Nothing visible: zeros, still attached to the graph (zero gradients) like the reference.
        return out + (q.sum() + k.sum() + v.sum()) * 0
    return _attend_pairs(q, k, v, chunks, pq, pk, alpha)
