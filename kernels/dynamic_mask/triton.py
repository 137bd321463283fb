"""Fused dynamic-mask construction in Triton: the padded bool mask [B, Lq, Lk] in one launch.

The PyTorch reference pads five jagged vectors and combines several [B, Lq, Lk] temporaries; here
a program per (query tile, key tile, sample) loads the per-token metadata as vectors and writes
its mask tile once (padding rows/columns written False in the same pass).
"""

from __future__ import annotations

import os
from typing import List

import torch
import triton
import triton.language as tl


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs() -> List[triton.Config]:
    if _interpreted():
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
    q_start = tl.load(q_offsets + b)
    q_len = tl.load(q_offsets + b + 1) - q_start
    kv_start = tl.load(kv_offsets + b)
    kv_len = tl.load(kv_offsets + b + 1) - kv_start
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_valid = offs_m < q_len
    n_valid = offs_n < kv_len
    q_rows = (q_start + offs_m).to(tl.int64)
    k_rows = (kv_start + offs_n).to(tl.int64)
    qts = tl.load(q_ts + q_rows, mask=m_valid, other=0)
    qself = tl.load(q_self + q_rows, mask=m_valid, other=-1)
    kind = tl.load(kv_kind + k_rows, mask=n_valid, other=-1)
    kts = tl.load(kv_ts + k_rows, mask=n_valid, other=0)
    vis = (kind == 0)[None, :] | ((kind == 1)[None, :] & (kts[None, :] < qts[:, None]))
    vis = (vis | (k_rows[None, :] == qself[:, None])) & m_valid[:, None] & n_valid[None, :]
    ptrs = Mask + b.to(tl.int64) * stride_mb + offs_m[:, None].to(tl.int64) * stride_mq + offs_n[None, :]
    tl.store(ptrs, vis.to(tl.int8), mask=(offs_m[:, None] < max_q_len) & (offs_n[None, :] < max_kv_len))


def dynamic_mask_triton(
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    q_ts: torch.Tensor,
    q_self: torch.Tensor,
    kv_kind: torch.Tensor,
    kv_ts: torch.Tensor,
    max_q_len: int,
    max_kv_len: int,
) -> torch.Tensor:
    """The padded mask [B, max_q_len, max_kv_len] (bool); semantics of the reference."""
    if q_offsets.device.type != "cuda" and not _interpreted():
        raise RuntimeError(
            "the Triton dynamic mask needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
            f"got {q_offsets.device}"
        )
    batch = q_offsets.numel() - 1
    # Written as int8 and viewed as bool (same 1-byte storage), every element stored by the kernel.
    mask = torch.empty(batch, max_q_len, max_kv_len, device=q_offsets.device, dtype=torch.int8)
    if mask.numel() == 0:
        return mask.view(torch.bool)
    ts_dtype = torch.promote_types(q_ts.dtype, kv_ts.dtype)
    grid = lambda meta: (  # noqa: E731
        triton.cdiv(max_q_len, meta["BLOCK_M"]),
        triton.cdiv(max_kv_len, meta["BLOCK_N"]),
        batch,
    )
    _dynamic_mask_kernel[grid](
        mask,
        q_offsets.to(torch.int64).contiguous(),
        kv_offsets.to(torch.int64).contiguous(),
        q_ts.to(ts_dtype).contiguous(),
        q_self.to(torch.int64).contiguous(),
        kv_kind.to(torch.int8).contiguous(),
        kv_ts.to(ts_dtype).contiguous(),
        max_q_len,
        max_kv_len,
        mask.stride(0),
        mask.stride(1),
        LEN_BUCKET=triton.next_power_of_2(max(1, max_kv_len)),
    )
    return mask.view(torch.bool)
