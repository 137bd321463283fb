"""Fused Group LayerNorm in Triton: forward and backward, one launch each for all groups.

Same contract as :func:`~mtfm_rec.kernels.group_norm.reference.group_layer_norm_reference`.

* Forward: a program normalises ``BLOCK_ROWS`` tokens and gathers each token's ``weight[group]`` /
  ``bias[group]`` row inside the kernel (no gather-compute-scatter, no [N, D] parameter copies).
  Per-row mean and 1/std are saved for the backward.
* Backward: dx row by row from the saved statistics; dweight / dbias are reduced per group inside
  the program over its rows (a loop over the groups present in the tile: tokens of one group are
  mostly contiguous in the (H; R; T) layout) and added to an fp32 [G, D] buffer with one atomic
  per (program, group, feature).
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import triton
import triton.language as tl

from mtfm_rec.kernels.triton_support import check_device, interpreted


def _configs() -> List[triton.Config]:
    if interpreted():
        return [triton.Config({"BLOCK_ROWS": 4}, num_warps=4)]
    return [
        triton.Config({"BLOCK_ROWS": r}, num_warps=w) for r, w in ((1, 4), (4, 4), (8, 8), (16, 8), (32, 16))
    ]


@triton.autotune(configs=_configs(), key=["BLOCK_D"])
@triton.jit
def _gln_fwd_kernel(
    X,
    Group,
    W,
    B,
    Y,
    Mean,
    Rstd,
    N,
    D,
    stride_xn,
    stride_yn,
    eps,
    BLOCK_D: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    r_mask = rows < N
    c_mask = cols < D
    mask = r_mask[:, None] & c_mask[None, :]
    x = tl.load(X + rows[:, None] * stride_xn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    grp = tl.load(Group + rows, mask=r_mask, other=0).to(tl.int64)
    w = tl.load(W + grp[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + grp[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w + b
    tl.store(Y + rows[:, None] * stride_yn + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=r_mask)
    tl.store(Rstd + rows, rstd, mask=r_mask)


@triton.autotune(configs=_configs(), key=["BLOCK_D"], reset_to_zero=["DW", "DB"])
@triton.jit
def _gln_bwd_kernel(
    DY,
    X,
    Group,
    W,
    Mean,
    Rstd,
    DX,
    DW,
    DB,
    N,
    D,
    stride_dyn,
    stride_xn,
    stride_dxn,
    BLOCK_D: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    r_mask = rows < N
    c_mask = cols < D
    mask = r_mask[:, None] & c_mask[None, :]
    x = tl.load(X + rows[:, None] * stride_xn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows[:, None] * stride_dyn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(Mean + rows, mask=r_mask, other=0.0)
    rstd = tl.load(Rstd + rows, mask=r_mask, other=0.0)
    grp = tl.load(Group + rows, mask=r_mask, other=0).to(tl.int64)
    w = tl.load(W + grp[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    g = dy * w
    c1 = tl.sum(xhat * g, axis=1) / D
    c2 = tl.sum(g, axis=1) / D
    dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
    tl.store(DX + rows[:, None] * stride_dxn + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)

    # Per-group partial sums of this tile: only the groups present between min and max id.
    dw_rows = dy * xhat
    g_lo = tl.min(tl.where(r_mask, grp, 2**62), axis=0)
    g_hi = tl.max(tl.where(r_mask, grp, -1), axis=0)
    for gg in range(g_lo, g_hi + 1):
        sel = r_mask & (grp == gg)
        if tl.sum(sel.to(tl.int32), axis=0) > 0:
            pw = tl.sum(tl.where(sel[:, None], dw_rows, 0.0), axis=0)
            pb = tl.sum(tl.where(sel[:, None], dy, 0.0), axis=0)
            tl.atomic_add(DW + gg * D + cols, pw, mask=c_mask)
            tl.atomic_add(DB + gg * D + cols, pb, mask=c_mask)


def group_layer_norm_fwd(
    x: torch.Tensor, group: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y [N, D], mean [N] fp32, rstd [N] fp32); x is [N, D] with unit feature stride."""
    n, d = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(n, device=x.device, dtype=torch.float32)
    rstd = torch.empty(n, device=x.device, dtype=torch.float32)
    if n == 0:
        return y, mean, rstd
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_ROWS"]),)  # noqa: E731
    _gln_fwd_kernel[grid](
        x,
        group,
        weight,
        bias,
        y,
        mean,
        rstd,
        n,
        d,
        x.stride(0),
        y.stride(0),
        eps,
        BLOCK_D=triton.next_power_of_2(d),
    )
    return y, mean, rstd


def group_layer_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    group: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx, dweight, dbias)."""
    n, d = x.shape
    dy = dy.contiguous()
    dx = torch.empty_like(x)
    dw = torch.zeros(weight.shape, device=x.device, dtype=torch.float32)
    db = torch.zeros(weight.shape, device=x.device, dtype=torch.float32)
    if n > 0:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_ROWS"]),)  # noqa: E731
        _gln_bwd_kernel[grid](
            dy,
            x,
            group,
            weight,
            mean,
            rstd,
            dx,
            dw,
            db,
            n,
            d,
            dy.stride(0),
            x.stride(0),
            dx.stride(0),
            BLOCK_D=triton.next_power_of_2(d),
        )
    return dx, dw.to(weight.dtype), db.to(weight.dtype)


class _GroupLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, weight, bias, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        group = group.reshape(-1).to(torch.int64).contiguous()
        weight, bias = weight.contiguous(), bias.contiguous()
        y, mean, rstd = group_layer_norm_fwd(x2, group, weight, bias, eps)
        ctx.save_for_backward(x2, group, weight, mean, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, group, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = group_layer_norm_bwd(dy.reshape(x2.shape), x2, group, weight, mean, rstd)
        return dx.view(ctx.shape), None, dw, db, None


def group_layer_norm_triton(
    x: torch.Tensor, group: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """Triton Group LayerNorm (differentiable in x, weight, bias); semantics of the reference.

    Args:
        x: [N, D] tokens (any leading shape flattening to N rows).
        group: [N] int group of each token, in ``[0, G)``.
        weight, bias: [G, D] per-group affine parameters.
    """
    check_device(x.device, "group LayerNorm")
    if weight.shape != bias.shape or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"weight/bias must be [G, {x.shape[-1]}], got {tuple(weight.shape)}, {tuple(bias.shape)}"
        )
    return _GroupLayerNormFunction.apply(x, group, weight, bias, float(eps))
