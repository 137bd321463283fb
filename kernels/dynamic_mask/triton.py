"""Fused dynamic-mask construction in Triton: the padded bool mask [B, Lq, Lk] in one launch.

The PyTorch reference pads five jagged vectors and combines several [B, Lq, Lk] temporaries; here
a program per (query tile, key tile, sample) loads the per-token metadata as vectors and writes
its mask tile once (padding rows/columns written False in the same pass). The tile is built by the
attention kernels' own helpers (``mtfm_rec.kernels.hstu_attention.triton``: ``_visible`` and the
metadata loads), so the materialised mask is by construction the one the attention kernels apply.
"""

from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from mtfm_rec.kernels.hstu_attention.triton import _key_meta, _query_meta, _rows, _span, _visible
from mtfm_rec.kernels.jagged import KeySet, QuerySet
from mtfm_rec.kernels.triton_support import check_device, interpreted


def _configs() -> List[triton.Config]:
    if interpreted():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w)
        for bm, bn, w in ((32, 128, 4), (64, 128, 4), (64, 256, 8), (16, 256, 4))
    ]


@triton.autotune(configs=_configs(), key=["LEN_BUCKET"])
@triton.jit
def _dynamic_mask_kernel(
    Mask,
    q_offsets,
    kv_offsets,
    q_ts,
    q_self,
    kv_kind,
    kv_ts,
    max_q_len,
    max_kv_len,
    stride_mb,
    stride_mq,
    LEN_BUCKET,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len = _span(q_offsets, b)
    kv_start, kv_len = _span(kv_offsets, b)
    q_rows, m_valid = _rows(q_start, pid_m * BLOCK_M, q_len, BLOCK_M)
    k_rows, n_valid = _rows(kv_start, pid_n * BLOCK_N, kv_len, BLOCK_N)
    qts, qself = _query_meta(q_ts, q_self, q_rows, m_valid)
    kind, kts = _key_meta(kv_kind, kv_ts, k_rows, n_valid)
    vis = _visible(kind, kts, k_rows, qts, qself, m_valid, n_valid)
    # the tile's rows / columns within the padded [max_q_len, max_kv_len] output
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ptrs = Mask + b.to(tl.int64) * stride_mb + offs_m[:, None].to(tl.int64) * stride_mq + offs_n[None, :]
    tl.store(ptrs, vis.to(tl.int8), mask=(offs_m[:, None] < max_q_len) & (offs_n[None, :] < max_kv_len))


def dynamic_mask_triton(queries: QuerySet, keys: KeySet) -> torch.Tensor:
    """The padded mask [B, queries.max_len, keys.max_len] (bool); semantics of the reference."""
    check_device(queries.offsets.device, "dynamic mask")
    batch, max_q_len, max_kv_len = queries.offsets.numel() - 1, queries.max_len, keys.max_len
    # Written as int8 and viewed as bool (same 1-byte storage), every element stored by the kernel.
    mask = torch.empty(batch, max_q_len, max_kv_len, device=queries.offsets.device, dtype=torch.int8)
    if mask.numel() == 0:
        return mask.view(torch.bool)
    ts_dtype = torch.promote_types(queries.ts.dtype, keys.ts.dtype)
    grid = lambda meta: (  # noqa: E731
        triton.cdiv(max_q_len, meta["BLOCK_M"]),
        triton.cdiv(max_kv_len, meta["BLOCK_N"]),
        batch,
    )
    _dynamic_mask_kernel[grid](
        mask,
        queries.offsets.to(torch.int64).contiguous(),
        keys.offsets.to(torch.int64).contiguous(),
        queries.ts.to(ts_dtype).contiguous(),
        queries.self_rows.to(torch.int64).contiguous(),
        keys.kind.to(torch.int8).contiguous(),
        keys.ts.to(ts_dtype).contiguous(),
        max_q_len,
        max_kv_len,
        mask.stride(0),
        mask.stride(1),
        LEN_BUCKET=triton.next_power_of_2(max(1, max_kv_len)),
    )
    return mask.view(torch.bool)
