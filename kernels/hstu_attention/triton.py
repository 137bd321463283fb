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
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from mtfm_rec.kernels.hstu_attention.reference import KIND_HISTORY, KIND_REALTIME

# The kernels compare kinds with these literals (plain ints inline into the compiled code).
assert (KIND_HISTORY, KIND_REALTIME) == (0, 1)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _fwd_configs() -> List[triton.Config]:
    if _interpreted():
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
    if _interpreted():
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
    kind, kts, k_rows, qts, qself, m_valid, n_valid,
):
    """[BLOCK_M, BLOCK_N] dynamic mask: H keys to all, R keys to later queries, T keys to self."""
    vis = (kind == 0)[None, :] | ((kind == 1)[None, :] & (kts[None, :] < qts[:, None]))
    vis = vis | (k_rows[None, :] == qself[:, None])
    return vis & m_valid[:, None] & n_valid[None, :]


@triton.autotune(configs=_fwd_configs(), key=["LEN_BUCKET", "BLOCK_D", "BLOCK_DV"], reset_to_zero=["Stats"])
@triton.jit
def _hstu_fwd_kernel(
    Q, K, V, Out, NVis, Stats,
    q_offsets, kv_offsets, q_ts, q_self, kv_kind, kv_ts,
    stride_qn, stride_qh, stride_kn, stride_kg, stride_vn, stride_vg, stride_on, stride_oh,
    alpha, D, DV,
    HEADS_PER_GROUP: tl.constexpr,
    LEN_BUCKET, COUNT_TILES: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(q_offsets + b)
    q_len = tl.load(q_offsets + b + 1) - q_start
    if pid_m * BLOCK_M >= q_len:
        return
    kv_start = tl.load(kv_offsets + b)
    kv_len = tl.load(kv_offsets + b + 1) - kv_start
    g = pid_h // HEADS_PER_GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < q_len
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        Q + q_rows[:, None] * stride_qn + pid_h * stride_qh + offs_d[None, :],
        mask=m_valid[:, None] & (offs_d[None, :] < D), other=0.0,
    )
    qts = tl.load(q_ts + q_rows, mask=m_valid, other=0)
    qself = tl.load(q_self + q_rows, mask=m_valid, other=-1)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    n_vis = tl.zeros([BLOCK_M], dtype=tl.float32)
    k_base = K + g * stride_kg
    v_base = V + g * stride_vg
    for n0 in range(0, kv_len, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_valid = offs_n < kv_len
        k_rows = (kv_start + offs_n).to(tl.int64)
        kind = tl.load(kv_kind + k_rows, mask=n_valid, other=-1)
        kts = tl.load(kv_ts + k_rows, mask=n_valid, other=0)
        vis = _visible(kind, kts, k_rows, qts, qself, m_valid, n_valid)
        n_tile = tl.sum(vis.to(tl.int32), axis=1)
        if COUNT_TILES:
            tl.atomic_add(Stats, 1)
        if tl.sum(n_tile, axis=0) > 0:
            if COUNT_TILES:
                tl.atomic_add(Stats + 1, 1)
            n_vis += n_tile.to(tl.float32)
            k = tl.load(
                k_base + k_rows[:, None] * stride_kn + offs_d[None, :],
                mask=n_valid[:, None] & (offs_d[None, :] < D), other=0.0,
            )
            v = tl.load(
                v_base + k_rows[:, None] * stride_vn + offs_dv[None, :],
                mask=n_valid[:, None] & (offs_dv[None, :] < DV), other=0.0,
            )
            s = alpha * _mm(q, tl.trans(k), UPCAST)
            w = tl.where(vis, s * tl.sigmoid(s), 0.0)
            acc += _mm(w.to(v.dtype), v, UPCAST)
    out = acc / tl.maximum(n_vis, 1.0)[:, None]
    tl.store(
        Out + q_rows[:, None] * stride_on + pid_h * stride_oh + offs_dv[None, :],
        out.to(Out.dtype.element_ty),
        mask=m_valid[:, None] & (offs_dv[None, :] < DV),
    )
    if pid_h == 0:
        tl.store(NVis + q_rows, n_vis, mask=m_valid)


@triton.autotune(configs=_bwd_configs(), key=["LEN_BUCKET", "BLOCK_D", "BLOCK_DV"])
@triton.jit
def _hstu_bwd_dkdv_kernel(
    Q, K, V, DO, NVis, DK, DV_,
    q_offsets, kv_offsets, q_ts, q_self, kv_kind, kv_ts,
    stride_qn, stride_qh, stride_kn, stride_kg, stride_vn, stride_vg, stride_don, stride_doh,
    stride_dkn, stride_dkg, stride_dvn, stride_dvg,
    alpha, D, DV,
    HEADS_PER_GROUP: tl.constexpr, LEN_BUCKET,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2)
    kv_start = tl.load(kv_offsets + b)
    kv_len = tl.load(kv_offsets + b + 1) - kv_start
    if pid_n * BLOCK_N >= kv_len:
        return
    q_start = tl.load(q_offsets + b)
    q_len = tl.load(q_offsets + b + 1) - q_start

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < kv_len
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_rows = (kv_start + offs_n).to(tl.int64)
    kind = tl.load(kv_kind + k_rows, mask=n_valid, other=-1)
    kts = tl.load(kv_ts + k_rows, mask=n_valid, other=0)
    k = tl.load(
        K + k_rows[:, None] * stride_kn + g * stride_kg + offs_d[None, :],
        mask=n_valid[:, None] & (offs_d[None, :] < D), other=0.0,
    )
    v = tl.load(
        V + k_rows[:, None] * stride_vn + g * stride_vg + offs_dv[None, :],
        mask=n_valid[:, None] & (offs_dv[None, :] < DV), other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for m0 in range(0, q_len, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_valid = offs_m < q_len
        q_rows = (q_start + offs_m).to(tl.int64)
        qts = tl.load(q_ts + q_rows, mask=m_valid, other=0)
        qself = tl.load(q_self + q_rows, mask=m_valid, other=-1)
        vis = _visible(kind, kts, k_rows, qts, qself, m_valid, n_valid)
        if tl.sum(tl.sum(vis.to(tl.int32), axis=1), axis=0) > 0:
            inv_n = 1.0 / tl.maximum(tl.load(NVis + q_rows, mask=m_valid, other=1.0), 1.0)
            # GQA: every query head of this kv group contributes to the same dk/dv tile.
            for hh in range(HEADS_PER_GROUP):
                h = g * HEADS_PER_GROUP + hh
                q = tl.load(
                    Q + q_rows[:, None] * stride_qn + h * stride_qh + offs_d[None, :],
                    mask=m_valid[:, None] & (offs_d[None, :] < D), other=0.0,
                )
                do = tl.load(
                    DO + q_rows[:, None] * stride_don + h * stride_doh + offs_dv[None, :],
                    mask=m_valid[:, None] & (offs_dv[None, :] < DV), other=0.0,
                )
                do = (do.to(tl.float32) * inv_n[:, None]).to(q.dtype)
                s = alpha * _mm(q, tl.trans(k), UPCAST)
                sig = tl.sigmoid(s)
                w = tl.where(vis, s * sig, 0.0)
                dv += _mm(tl.trans(w.to(q.dtype)), do, UPCAST)
                dp = _mm(do, tl.trans(v), UPCAST)
                ds = tl.where(vis, dp * sig * (1.0 + s * (1.0 - sig)) * alpha, 0.0)
                dk += _mm(tl.trans(ds.to(q.dtype)), q, UPCAST)
    tl.store(
        DK + k_rows[:, None] * stride_dkn + g * stride_dkg + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        mask=n_valid[:, None] & (offs_d[None, :] < D),
    )
    tl.store(
        DV_ + k_rows[:, None] * stride_dvn + g * stride_dvg + offs_dv[None, :],
        dv.to(DV_.dtype.element_ty),
        mask=n_valid[:, None] & (offs_dv[None, :] < DV),
    )


@triton.autotune(configs=_bwd_configs(), key=["LEN_BUCKET", "BLOCK_D", "BLOCK_DV"])
@triton.jit
def _hstu_bwd_dq_kernel(
    Q, K, V, DO, NVis, DQ,
    q_offsets, kv_offsets, q_ts, q_self, kv_kind, kv_ts,
    stride_qn, stride_qh, stride_kn, stride_kg, stride_vn, stride_vg, stride_don, stride_doh,
    stride_dqn, stride_dqh,
    alpha, D, DV,
    HEADS_PER_GROUP: tl.constexpr, LEN_BUCKET,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(q_offsets + b)
    q_len = tl.load(q_offsets + b + 1) - q_start
    if pid_m * BLOCK_M >= q_len:
        return
    kv_start = tl.load(kv_offsets + b)
    kv_len = tl.load(kv_offsets + b + 1) - kv_start
    g = pid_h // HEADS_PER_GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < q_len
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        Q + q_rows[:, None] * stride_qn + pid_h * stride_qh + offs_d[None, :],
        mask=m_valid[:, None] & (offs_d[None, :] < D), other=0.0,
    )
    do = tl.load(
        DO + q_rows[:, None] * stride_don + pid_h * stride_doh + offs_dv[None, :],
        mask=m_valid[:, None] & (offs_dv[None, :] < DV), other=0.0,
    )
    inv_n = 1.0 / tl.maximum(tl.load(NVis + q_rows, mask=m_valid, other=1.0), 1.0)
    do = (do.to(tl.float32) * inv_n[:, None]).to(q.dtype)
    qts = tl.load(q_ts + q_rows, mask=m_valid, other=0)
    qself = tl.load(q_self + q_rows, mask=m_valid, other=-1)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, kv_len, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_valid = offs_n < kv_len
        k_rows = (kv_start + offs_n).to(tl.int64)
        kind = tl.load(kv_kind + k_rows, mask=n_valid, other=-1)
        kts = tl.load(kv_ts + k_rows, mask=n_valid, other=0)
        vis = _visible(kind, kts, k_rows, qts, qself, m_valid, n_valid)
        if tl.sum(tl.sum(vis.to(tl.int32), axis=1), axis=0) > 0:
            k = tl.load(
                K + k_rows[:, None] * stride_kn + g * stride_kg + offs_d[None, :],
                mask=n_valid[:, None] & (offs_d[None, :] < D), other=0.0,
            )
            v = tl.load(
                V + k_rows[:, None] * stride_vn + g * stride_vg + offs_dv[None, :],
                mask=n_valid[:, None] & (offs_dv[None, :] < DV), other=0.0,
            )
            s = alpha * _mm(q, tl.trans(k), UPCAST)
            sig = tl.sigmoid(s)
            dp = _mm(do, tl.trans(v), UPCAST)
            ds = tl.where(vis, dp * sig * (1.0 + s * (1.0 - sig)) * alpha, 0.0)
            dq += _mm(ds.to(q.dtype), k, UPCAST)
    tl.store(
        DQ + q_rows[:, None] * stride_dqn + pid_h * stride_dqh + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=m_valid[:, None] & (offs_d[None, :] < D),
    )


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
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"num_heads={q.shape[1]} is not divisible by num_kv_heads={k.shape[1]}")
    if q.device.type != "cuda" and not _interpreted():
        raise RuntimeError(
            "the Triton HSTU attention needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
            f"got {q.device}"
        )


def _meta(
    q_offsets: torch.Tensor, kv_offsets: torch.Tensor, q_ts: torch.Tensor, q_self: torch.Tensor,
    kv_kind: torch.Tensor, kv_ts: torch.Tensor,
) -> Tuple[torch.Tensor, ...]:
    # Timestamps are compared in one dtype; offsets/rows as int64 for 64-bit pointer arithmetic.
    ts_dtype = torch.promote_types(q_ts.dtype, kv_ts.dtype)
    return (
        q_offsets.to(torch.int64).contiguous(),
        kv_offsets.to(torch.int64).contiguous(),
        q_ts.to(ts_dtype).contiguous(),
        q_self.to(torch.int64).contiguous(),
        kv_kind.to(torch.int8).contiguous(),
        kv_ts.to(ts_dtype).contiguous(),
    )


def hstu_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    meta: Tuple[torch.Tensor, ...], max_q_len: int, max_kv_len: int, alpha: float,
    stats: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (out [total_q, H, Dv], n_visible [total_q] fp32). ``stats`` (int32 [2]) receives
    (key tiles visited, key tiles computed) when given."""
    q_offsets = meta[0]
    total_q, num_heads, dim = q.shape
    num_kv_heads, dim_v = k.shape[1], v.shape[2]
    batch = q_offsets.numel() - 1
    out = torch.zeros(total_q, num_heads, dim_v, device=q.device, dtype=q.dtype)
    n_vis = torch.zeros(total_q, device=q.device, dtype=torch.float32)
    if total_q == 0 or batch == 0 or max_q_len == 0:
        return out, n_vis
    # A private counter: autotuning zeroes it between trials, the caller's total must survive.
    counter = torch.zeros(2, device=q.device, dtype=torch.int32)
    grid = lambda meta_: (triton.cdiv(max_q_len, meta_["BLOCK_M"]), num_heads, batch)  # noqa: E731
    _hstu_fwd_kernel[grid](
        q, k, v, out, n_vis, counter, *meta,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        alpha, dim, dim_v,
        HEADS_PER_GROUP=num_heads // num_kv_heads,
        LEN_BUCKET=_bucket(max_kv_len), COUNT_TILES=stats is not None,
        BLOCK_D=_block(dim), BLOCK_DV=_block(dim_v), UPCAST=_interpreted(),
    )
    if stats is not None:
        stats += counter.to(stats.device, stats.dtype)
    return out, n_vis


def hstu_attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_vis: torch.Tensor,
    meta: Tuple[torch.Tensor, ...], max_q_len: int, max_kv_len: int, alpha: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv) for ``do`` = d loss / d out."""
    q_offsets = meta[0]
    total_q, num_heads, dim = q.shape
    num_kv_heads, dim_v = k.shape[1], v.shape[2]
    batch = q_offsets.numel() - 1
    do = do.contiguous()
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    if total_q == 0 or batch == 0 or max_q_len == 0 or max_kv_len == 0:
        return dq, dk, dv
    common = dict(
        HEADS_PER_GROUP=num_heads // num_kv_heads, LEN_BUCKET=_bucket(max_kv_len),
        BLOCK_D=_block(dim), BLOCK_DV=_block(dim_v), UPCAST=_interpreted(),
    )
    strides = (
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1),
    )
    grid_kv = lambda meta_: (triton.cdiv(max_kv_len, meta_["BLOCK_N"]), num_kv_heads, batch)  # noqa: E731
    _hstu_bwd_dkdv_kernel[grid_kv](
        q, k, v, do, n_vis, dk, dv, *meta, *strides,
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        alpha, dim, dim_v, **common,
    )
    grid_q = lambda meta_: (triton.cdiv(max_q_len, meta_["BLOCK_M"]), num_heads, batch)  # noqa: E731
    _hstu_bwd_dq_kernel[grid_q](
        q, k, v, do, n_vis, dq, *meta, *strides,
        dq.stride(0), dq.stride(1),
        alpha, dim, dim_v, **common,
    )
    return dq, dk, dv


class _HSTUAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, meta, max_q_len, max_kv_len, alpha, stats):  # type: ignore[override]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, n_vis = hstu_attention_fwd(q, k, v, meta, max_q_len, max_kv_len, alpha, stats)
        ctx.save_for_backward(q, k, v, n_vis, *meta)
        ctx.shape = (max_q_len, max_kv_len, alpha)
        return out

    @staticmethod
    def backward(ctx, do):  # type: ignore[override]
        q, k, v, n_vis, *meta = ctx.saved_tensors
        max_q_len, max_kv_len, alpha = ctx.shape
        dq, dk, dv = hstu_attention_bwd(do, q, k, v, n_vis, tuple(meta), max_q_len, max_kv_len, alpha)
        return dq, dk, dv, None, None, None, None, None


def hstu_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    q_ts: torch.Tensor,
    q_self: torch.Tensor,
    kv_kind: torch.Tensor,
    kv_ts: torch.Tensor,
    max_q_len: int,
    max_kv_len: int,
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
    alpha = q.shape[-1] ** -0.5 if alpha is None else float(alpha)
    meta = _meta(q_offsets, kv_offsets, q_ts, q_self, kv_kind, kv_ts)
    return _HSTUAttentionFunction.apply(q, k, v, meta, int(max_q_len), int(max_kv_len), alpha, tile_stats)
