"""Jagged HSTU attention with the MTFM dynamic mask in Triton: forward and backward.

Same contract as :func:`~mtfm_rec.kernels.hstu_attention.reference.hstu_attention_reference`.

Design (see docs/KERNELS.md):

* Jagged: the grid is ``(cdiv(max_len, BLOCK), heads, B)``; a program whose tile starts past its
  sample's length returns at once, so nothing is padded to a global maximum.
* The mask never exists in memory: per (query tile, key tile) it is rebuilt in registers from the
  key kinds / timestamps and the query timestamps / ``q_self``, loaded as ``BLOCK`` vectors.
* Computation skipping: a key tile in which no key is visible to any query of the query tile is
  skipped before its K/V are even loaded. With the (H; R by ts; T) layout this prunes the T block
  (T keys see only their own query) and the R keys later than every query of the tile.
* ``n_visible`` is counted by the forward kernel and saved for the backward.
* GQA: the dk/dv kernel runs per (key tile, kv group) and loops over the ``H // G`` query heads of
  the group, so dk/dv accumulate in registers without atomics; dq has its own kernel (no atomics,
  deterministic).

Layout: one module, over the ~400-line guideline on purpose. Each kernel's signature is its
launcher's argument list (the same pointers, strides and constexprs in the same order), and the
autotune configs, the ``@triton.jit`` helpers (mask, tile loads, scores, SiLU and its derivative)
and the launchers change together: split across files, every change to a kernel's arguments
would touch two files that only make sense side by side. The three kernels are also over the
~60-line guideline: about half of each is its signature (30-odd pointer / stride / constexpr
parameters, one per line as the formatter writes them), and the bodies (30-40 lines) are one GPU
program each, already written in terms of the helpers above; cutting them further would only
move the loop state (accumulators, tile rows) into helper arguments.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from mtfm_rec.kernels.hstu_attention.reference import heads_per_group, score_scale
from mtfm_rec.kernels.jagged import KeySet, QuerySet, TokenKind
from mtfm_rec.kernels.triton_support import check_device, interpreted

# Token kinds as compile-time constants: a jit function may read only constexpr globals.
_HISTORY = tl.constexpr(int(TokenKind.HISTORY))
_REALTIME = tl.constexpr(int(TokenKind.REALTIME))


def _fwd_configs() -> List[triton.Config]:
    if interpreted():
        # The interpreter is for correctness: small tiles so short test sequences span many.
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in (
            (128, 64, 8, 3),
            (128, 128, 8, 2),
            (64, 64, 4, 3),
            (64, 128, 4, 3),
            (128, 32, 4, 4),
            (64, 32, 4, 4),
        )
    ]


def _bwd_configs() -> List[triton.Config]:
    if interpreted():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in (
            (64, 128, 8, 2),
            (32, 128, 4, 3),
            (64, 64, 4, 3),
            (32, 64, 4, 4),
            (128, 64, 8, 2),
        )
    ]


@triton.jit
def _mm(a, b, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation; UPCAST feeds it fp32 (the interpreter's bf16 dot is wrong)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def _visible(
    kind,
    kts,
    k_rows,
    qts,
    qself,
    m_valid,
    n_valid,
):
    """[BLOCK_M, BLOCK_N] dynamic mask: H keys to all, R keys to later queries, T keys to self."""
    vis = (kind == _HISTORY)[None, :] | ((kind == _REALTIME)[None, :] & (kts[None, :] < qts[:, None]))
    vis = vis | (k_rows[None, :] == qself[:, None])
    return vis & m_valid[:, None] & n_valid[None, :]


@triton.jit
def _span(offsets, b):
    """(first row, length) of sample ``b`` in a jagged layout."""
    start = tl.load(offsets + b)
    return start, tl.load(offsets + b + 1) - start


@triton.jit
def _rows(start, first, length, BLOCK: tl.constexpr):
    """Global rows (int64, for 64-bit addressing) of a tile starting at ``first`` in a sample,
    and which of them lie inside the sample."""
    offs = first + tl.arange(0, BLOCK)
    return (start + offs).to(tl.int64), offs < length


@triton.jit
def _load_tile(base, rows, stride_row, valid, cols, n_cols):
    """[rows, cols] tile of one head of a [total, heads, dim] tensor (``base`` points at the head);
    rows outside the sample and padded columns read 0."""
    return tl.load(
        base + rows[:, None] * stride_row + cols[None, :],
        mask=valid[:, None] & (cols[None, :] < n_cols),
        other=0.0,
    )


@triton.jit
def _store_tile(base, rows, stride_row, valid, cols, n_cols, value):
    tl.store(
        base + rows[:, None] * stride_row + cols[None, :],
        value.to(base.dtype.element_ty),
        mask=valid[:, None] & (cols[None, :] < n_cols),
    )


@triton.jit
def _key_meta(kv_kind, kv_ts, rows, valid):
    """Kinds (-1 outside the sample: never visible) and timestamps of a key tile."""
    return tl.load(kv_kind + rows, mask=valid, other=-1), tl.load(kv_ts + rows, mask=valid, other=0)


@triton.jit
def _query_meta(q_ts, q_self, rows, valid):
    """Timestamps and own key rows (-1: not a T token) of a query tile."""
    return tl.load(q_ts + rows, mask=valid, other=0), tl.load(q_self + rows, mask=valid, other=-1)


@triton.jit
def _any_visible(vis):
    """Whether some key of the tile is visible to some query of the tile; if not, the tile is
    skipped (computation skipping)."""
    return tl.sum(tl.sum(vis.to(tl.int32), axis=1), axis=0) > 0


@triton.jit
def _inv_visible(NVis, rows, valid):
    """1 / n_visible of a query tile, as the forward counted it (1 where no key is visible)."""
    return 1.0 / tl.maximum(tl.load(NVis + rows, mask=valid, other=1.0), 1.0)


@triton.jit
def _scores(q, k, alpha, UPCAST: tl.constexpr):
    """[BLOCK_M, BLOCK_N] alpha q.k of a query tile against a key tile (fp32)."""
    return alpha * _mm(q, tl.trans(k), UPCAST)


@triton.jit
def _silu_weights(s, vis):
    """The attention weights silu(s) where the key is visible, 0 elsewhere (before 1 / n_visible)."""
    return tl.where(vis, s * tl.sigmoid(s), 0.0)


@triton.jit
def _dscore(s, dp, vis, alpha):
    """d loss / d (q.k) from d loss / d silu(alpha q.k): silu'(x) = sig(x) (1 + x (1 - sig(x)))."""
    sig = tl.sigmoid(s)
    return tl.where(vis, dp * sig * (1.0 + s * (1.0 - sig)) * alpha, 0.0)


@triton.autotune(configs=_fwd_configs(), key=["LEN_BUCKET", "BLOCK_D", "BLOCK_DV"], reset_to_zero=["Stats"])
@triton.jit
def _hstu_fwd_kernel(
    Q,
    K,
    V,
    Out,
    NVis,
    Stats,
    q_offsets,
    kv_offsets,
    q_ts,
    q_self,
    kv_kind,
    kv_ts,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kg,
    stride_vn,
    stride_vg,
    stride_on,
    stride_oh,
    alpha,
    D,
    DV,
    HEADS_PER_GROUP: tl.constexpr,
    LEN_BUCKET,
    COUNT_TILES: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len = _span(q_offsets, b)
    if pid_m * BLOCK_M >= q_len:
        return
    kv_start, kv_len = _span(kv_offsets, b)
    g = pid_h // HEADS_PER_GROUP
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_rows, m_valid = _rows(q_start, pid_m * BLOCK_M, q_len, BLOCK_M)
    q = _load_tile(Q + pid_h * stride_qh, q_rows, stride_qn, m_valid, offs_d, D)
    qts, qself = _query_meta(q_ts, q_self, q_rows, m_valid)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    n_vis = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, kv_len, BLOCK_N):
        k_rows, n_valid = _rows(kv_start, n0, kv_len, BLOCK_N)
        kind, kts = _key_meta(kv_kind, kv_ts, k_rows, n_valid)
        vis = _visible(kind, kts, k_rows, qts, qself, m_valid, n_valid)
        n_tile = tl.sum(vis.to(tl.int32), axis=1)
        if COUNT_TILES:
            tl.atomic_add(Stats, 1)
        if tl.sum(n_tile, axis=0) > 0:
            if COUNT_TILES:
                tl.atomic_add(Stats + 1, 1)
            n_vis += n_tile.to(tl.float32)
            k = _load_tile(K + g * stride_kg, k_rows, stride_kn, n_valid, offs_d, D)
            v = _load_tile(V + g * stride_vg, k_rows, stride_vn, n_valid, offs_dv, DV)
            s = _scores(q, k, alpha, UPCAST)
            w = _silu_weights(s, vis)
            acc += _mm(w.to(v.dtype), v, UPCAST)
    out = acc / tl.maximum(n_vis, 1.0)[:, None]
    _store_tile(Out + pid_h * stride_oh, q_rows, stride_on, m_valid, offs_dv, DV, out)
    if pid_h == 0:
        tl.store(NVis + q_rows, n_vis, mask=m_valid)


@triton.autotune(configs=_bwd_configs(), key=["LEN_BUCKET", "BLOCK_D", "BLOCK_DV"])
@triton.jit
def _hstu_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    NVis,
    DK,
    DV_,
    q_offsets,
    kv_offsets,
    q_ts,
    q_self,
    kv_kind,
    kv_ts,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kg,
    stride_vn,
    stride_vg,
    stride_don,
    stride_doh,
    stride_dkn,
    stride_dkg,
    stride_dvn,
    stride_dvg,
    alpha,
    D,
    DV,
    HEADS_PER_GROUP: tl.constexpr,
    LEN_BUCKET,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2)
    kv_start, kv_len = _span(kv_offsets, b)
    if pid_n * BLOCK_N >= kv_len:
        return
    q_start, q_len = _span(q_offsets, b)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    k_rows, n_valid = _rows(kv_start, pid_n * BLOCK_N, kv_len, BLOCK_N)
    kind, kts = _key_meta(kv_kind, kv_ts, k_rows, n_valid)
    k = _load_tile(K + g * stride_kg, k_rows, stride_kn, n_valid, offs_d, D)
    v = _load_tile(V + g * stride_vg, k_rows, stride_vn, n_valid, offs_dv, DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for m0 in range(0, q_len, BLOCK_M):
        q_rows, m_valid = _rows(q_start, m0, q_len, BLOCK_M)
        qts, qself = _query_meta(q_ts, q_self, q_rows, m_valid)
        vis = _visible(kind, kts, k_rows, qts, qself, m_valid, n_valid)
        if _any_visible(vis):
            inv_n = _inv_visible(NVis, q_rows, m_valid)
            # GQA: every query head of this kv group contributes to the same dk/dv tile.
            for hh in range(HEADS_PER_GROUP):
                h = g * HEADS_PER_GROUP + hh
                q = _load_tile(Q + h * stride_qh, q_rows, stride_qn, m_valid, offs_d, D)
                do = _load_tile(DO + h * stride_doh, q_rows, stride_don, m_valid, offs_dv, DV)
                do = (do.to(tl.float32) * inv_n[:, None]).to(q.dtype)
                s = _scores(q, k, alpha, UPCAST)
                w = _silu_weights(s, vis)
                dv += _mm(tl.trans(w.to(q.dtype)), do, UPCAST)
                ds = _dscore(s, _mm(do, tl.trans(v), UPCAST), vis, alpha)
                dk += _mm(tl.trans(ds.to(q.dtype)), q, UPCAST)
    _store_tile(DK + g * stride_dkg, k_rows, stride_dkn, n_valid, offs_d, D, dk)
    _store_tile(DV_ + g * stride_dvg, k_rows, stride_dvn, n_valid, offs_dv, DV, dv)


@triton.autotune(configs=_bwd_configs(), key=["LEN_BUCKET", "BLOCK_D", "BLOCK_DV"])
@triton.jit
def _hstu_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    NVis,
    DQ,
    q_offsets,
    kv_offsets,
    q_ts,
    q_self,
    kv_kind,
    kv_ts,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kg,
    stride_vn,
    stride_vg,
    stride_don,
    stride_doh,
    stride_dqn,
    stride_dqh,
    alpha,
    D,
    DV,
    HEADS_PER_GROUP: tl.constexpr,
    LEN_BUCKET,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len = _span(q_offsets, b)
    if pid_m * BLOCK_M >= q_len:
        return
    kv_start, kv_len = _span(kv_offsets, b)
    g = pid_h // HEADS_PER_GROUP
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_rows, m_valid = _rows(q_start, pid_m * BLOCK_M, q_len, BLOCK_M)
    q = _load_tile(Q + pid_h * stride_qh, q_rows, stride_qn, m_valid, offs_d, D)
    do = _load_tile(DO + pid_h * stride_doh, q_rows, stride_don, m_valid, offs_dv, DV)
    inv_n = _inv_visible(NVis, q_rows, m_valid)
    do = (do.to(tl.float32) * inv_n[:, None]).to(q.dtype)
    qts, qself = _query_meta(q_ts, q_self, q_rows, m_valid)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, kv_len, BLOCK_N):
        k_rows, n_valid = _rows(kv_start, n0, kv_len, BLOCK_N)
        kind, kts = _key_meta(kv_kind, kv_ts, k_rows, n_valid)
        vis = _visible(kind, kts, k_rows, qts, qself, m_valid, n_valid)
        if _any_visible(vis):
            k = _load_tile(K + g * stride_kg, k_rows, stride_kn, n_valid, offs_d, D)
            v = _load_tile(V + g * stride_vg, k_rows, stride_vn, n_valid, offs_dv, DV)
            s = _scores(q, k, alpha, UPCAST)
            ds = _dscore(s, _mm(do, tl.trans(v), UPCAST), vis, alpha)
            dq += _mm(ds.to(q.dtype), k, UPCAST)
    _store_tile(DQ + pid_h * stride_dqh, q_rows, stride_dqn, m_valid, offs_d, D, dq)


# --------------------------------------------------------------------------- host side
def _block(dim: int) -> int:
    # tl.dot needs every dimension >= 16.
    return max(16, triton.next_power_of_2(dim))


def _bucket(n: int) -> int:
    # Autotune once per power-of-two length, not once per batch.
    return triton.next_power_of_2(max(1, n))


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("q, k, v must be [total, heads, dim]")
    heads_per_group(q, k)
    check_device(q.device, "HSTU attention")


def _meta(queries: QuerySet, keys: KeySet) -> Tuple[torch.Tensor, ...]:
    """The kernels' metadata arguments ``(q_offsets, kv_offsets, q_ts, q_self, kv_kind, kv_ts)``:
    timestamps in one dtype, offsets / rows as int64 for 64-bit pointer arithmetic."""
    ts_dtype = torch.promote_types(queries.ts.dtype, keys.ts.dtype)
    return (
        queries.offsets.to(torch.int64).contiguous(),
        keys.offsets.to(torch.int64).contiguous(),
        queries.ts.to(ts_dtype).contiguous(),
        queries.self_rows.to(torch.int64).contiguous(),
        keys.kind.to(torch.int8).contiguous(),
        keys.ts.to(ts_dtype).contiguous(),
    )


def _launch_constants(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_kv_len: int) -> Dict[str, Any]:
    """The keyword arguments every kernel takes: the GQA ratio, the autotune length bucket, the
    head-dimension blocks and the interpreter's fp32 dot."""
    return dict(
        HEADS_PER_GROUP=q.shape[1] // k.shape[1],
        LEN_BUCKET=_bucket(max_kv_len),
        BLOCK_D=_block(q.shape[2]),
        BLOCK_DV=_block(v.shape[2]),
        UPCAST=interpreted(),
    )


def hstu_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: Tuple[torch.Tensor, ...],
    max_q_len: int,
    max_kv_len: int,
    alpha: float,
    stats: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (out [total_q, H, Dv], n_visible [total_q] fp32). ``stats`` (int32 [2]) receives
    (key tiles visited, key tiles computed) when given."""
    q_offsets = meta[0]
    total_q, num_heads, dim = q.shape
    dim_v = v.shape[2]
    batch = q_offsets.numel() - 1
    out = torch.zeros(total_q, num_heads, dim_v, device=q.device, dtype=q.dtype)
    n_vis = torch.zeros(total_q, device=q.device, dtype=torch.float32)
    if total_q == 0 or batch == 0 or max_q_len == 0:
        return out, n_vis
    # A private counter: autotuning zeroes it between trials, the caller's total must survive.
    counter = torch.zeros(2, device=q.device, dtype=torch.int32)
    grid = lambda meta_: (triton.cdiv(max_q_len, meta_["BLOCK_M"]), num_heads, batch)  # noqa: E731
    _hstu_fwd_kernel[grid](
        q,
        k,
        v,
        out,
        n_vis,
        counter,
        *meta,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        alpha,
        dim,
        dim_v,
        COUNT_TILES=stats is not None,
        **_launch_constants(q, k, v, max_kv_len),
    )
    if stats is not None:
        stats += counter.to(stats.device, stats.dtype)
    return out, n_vis


def _input_strides(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor) -> Tuple[int, ...]:
    """(row, head) strides of q, k, v and do, in the order both backward kernels take them."""
    return (
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        do.stride(0),
        do.stride(1),
    )


def _launch_bwd_dkdv(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_vis: torch.Tensor,
    meta: Tuple[torch.Tensor, ...],
    dk: torch.Tensor,
    dv: torch.Tensor,
    max_kv_len: int,
    alpha: float,
) -> None:
    """Writes dk and dv: one program per (key tile, kv group, sample)."""
    batch = meta[0].numel() - 1
    grid = lambda meta_: (triton.cdiv(max_kv_len, meta_["BLOCK_N"]), k.shape[1], batch)  # noqa: E731
    _hstu_bwd_dkdv_kernel[grid](
        q,
        k,
        v,
        do,
        n_vis,
        dk,
        dv,
        *meta,
        *_input_strides(q, k, v, do),
        dk.stride(0),
        dk.stride(1),
        dv.stride(0),
        dv.stride(1),
        alpha,
        q.shape[2],
        v.shape[2],
        **_launch_constants(q, k, v, max_kv_len),
    )


def _launch_bwd_dq(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_vis: torch.Tensor,
    meta: Tuple[torch.Tensor, ...],
    dq: torch.Tensor,
    max_q_len: int,
    max_kv_len: int,
    alpha: float,
) -> None:
    """Writes dq: one program per (query tile, query head, sample)."""
    batch = meta[0].numel() - 1
    grid = lambda meta_: (triton.cdiv(max_q_len, meta_["BLOCK_M"]), q.shape[1], batch)  # noqa: E731
    _hstu_bwd_dq_kernel[grid](
        q,
        k,
        v,
        do,
        n_vis,
        dq,
        *meta,
        *_input_strides(q, k, v, do),
        dq.stride(0),
        dq.stride(1),
        alpha,
        q.shape[2],
        v.shape[2],
        **_launch_constants(q, k, v, max_kv_len),
    )


def hstu_attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_vis: torch.Tensor,
    meta: Tuple[torch.Tensor, ...],
    max_q_len: int,
    max_kv_len: int,
    alpha: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv) for ``do`` = d loss / d out: dk/dv and dq by separate kernels, so
    each accumulates in registers without atomics (deterministic)."""
    total_q = q.shape[0]
    batch = meta[0].numel() - 1
    do = do.contiguous()
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    if total_q == 0 or batch == 0 or max_q_len == 0 or max_kv_len == 0:
        return dq, dk, dv
    _launch_bwd_dkdv(do, q, k, v, n_vis, meta, dk, dv, max_kv_len, alpha)
    _launch_bwd_dq(do, q, k, v, n_vis, meta, dq, max_q_len, max_kv_len, alpha)
    return dq, dk, dv


class _HSTUAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, meta, max_q_len, max_kv_len, alpha, stats):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, n_vis = hstu_attention_fwd(q, k, v, meta, max_q_len, max_kv_len, alpha, stats)
        ctx.save_for_backward(q, k, v, n_vis, *meta)
        ctx.shape = (max_q_len, max_kv_len, alpha)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, n_vis, *meta = ctx.saved_tensors
        max_q_len, max_kv_len, alpha = ctx.shape
        dq, dk, dv = hstu_attention_bwd(do, q, k, v, n_vis, tuple(meta), max_q_len, max_kv_len, alpha)
        return dq, dk, dv, None, None, None, None, None


def hstu_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    queries: QuerySet,
    keys: KeySet,
    alpha: Optional[float] = None,
    tile_stats: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Triton HSTU attention (differentiable in q, k, v); semantics of the reference.

    Args:
        tile_stats: optional int32 [2] tensor on q's device; the forward adds to it the number of
            (query tile, key tile) pairs visited and the number actually computed (the rest were
            skipped because the mask empties them). Debug / bench only.
    Returns:
        [total_q, H, Dv] in q's dtype.
    """
    _check(q, k, v)
    alpha = score_scale(q, alpha)
    meta = _meta(queries, keys)
    return _HSTUAttentionFunction.apply(
        q, k, v, meta, int(queries.max_len), int(keys.max_len), alpha, tile_stats
    )
