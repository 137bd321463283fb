"""A compiled CPU candidate for HSTU attention (not a dispatcher backend; the bench measures it).

Why not FlexAttention: ``flex_attention`` always normalises with a softmax over the keys
(``score_mod`` edits scores *before* the exponential, ``mask_mod`` only drops keys), while HSTU
weights are ``silu(alpha * q.k)`` averaged over the visible keys. SiLU weights can be negative,
so they are not ``exp`` of any real score and a single flex call cannot produce them; recovering
them via ``return_lse`` and two calls (positive and negative parts, ``score_mod = log|silu|``)
is possible in exact arithmetic but ill-conditioned near zero weights (d log|silu| blows up
where the weight crosses zero) and was not pursued.

The candidate here is the reference's own math with the elementwise chain fused: the reference
materialises the float scores, ``alpha * s``, ``silu``, a float copy of the mask and their
product (each [B, H, Lq, Lk]), then the same again in autograd. Here the jagged tensors are
padded eagerly (cheap, O(N)), and one compiled function builds the mask from the padded
per-token metadata and fuses mask + SiLU + normalisation around the two batched matmuls, forward
and backward (AOTAutograd). Shapes are marked dynamic so a new batch does not recompile.

Measured on our CPU it ran at 0.58-1.16x the reference's fwd+bwd speed (mostly slower: the
inductor kernels for the masked SiLU did not beat ATen's) and compiles for tens of seconds, so
the CPU fast path is ``blocksparse.py`` instead; see docs/KERNELS.md and ``python -m mtfm_rec.bench --only kernels``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from mtfm_rec.kernels.hstu_attention.reference import (
    KIND_HISTORY,
    KIND_REALTIME,
    _pad,
    _unpad,
)


def _padded_core(
    qp: torch.Tensor,  # [B, G, r, Lq, D]
    kp: torch.Tensor,  # [B, G, Lk, D]
    vp: torch.Tensor,  # [B, G, Lk, Dv]
    q_ts_p: torch.Tensor,  # [B, Lq]
    self_p: torch.Tensor,  # [B, Lq] local key index of the query itself, -1 if none
    q_valid: torch.Tensor,  # [B, Lq] bool
    kind_p: torch.Tensor,  # [B, Lk] (-1 = padding)
    kts_p: torch.Tensor,  # [B, Lk]
    alpha: float,
) -> torch.Tensor:
    j = torch.arange(kind_p.shape[1], device=kind_p.device)
    mask = (kind_p == KIND_HISTORY)[:, None, :] | (
        (kind_p == KIND_REALTIME)[:, None, :] & (kts_p[:, None, :] < q_ts_p[:, :, None])
    )
    mask = (mask | (j[None, None, :] == self_p[:, :, None])) & q_valid[:, :, None]
    scores = torch.matmul(qp, kp.unsqueeze(2).transpose(-1, -2))  # [B, G, r, Lq, Lk]
    weights = torch.where(mask[:, None, None], F.silu(alpha * scores), 0.0).to(vp.dtype)
    inv_n = 1.0 / mask.sum(-1).clamp(min=1).to(scores.dtype)  # [B, Lq]
    return torch.matmul(weights, vp.unsqueeze(2)) * inv_n[:, None, None, :, None]


_compiled_core = None


def _core():
    global _compiled_core
    if _compiled_core is None:
        _compiled_core = torch.compile(_padded_core, dynamic=True, fullgraph=True)
    return _compiled_core


def hstu_attention_compiled(
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
) -> torch.Tensor:
    """Compiled padded HSTU attention (differentiable in q, k, v); semantics of the reference.

    The first call compiles (tens of seconds on a small CPU); later calls with other batch shapes
    reuse the dynamic-shape graph.
    """
    total_q, num_heads, dim = q.shape
    num_kv_heads = k.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}")
    if total_q == 0:
        return q.new_zeros(0, num_heads, v.shape[-1])
    alpha = dim**-0.5 if alpha is None else float(alpha)
    batch = q_offsets.numel() - 1
    r = num_heads // num_kv_heads
    qp = _pad(q, q_offsets, max_q_len).view(batch, max_q_len, num_kv_heads, r, dim).permute(0, 2, 3, 1, 4)
    kp = _pad(k, kv_offsets, max_kv_len).permute(0, 2, 1, 3)
    vp = _pad(v, kv_offsets, max_kv_len).permute(0, 2, 1, 3)
    q_start = kv_offsets[:-1].repeat_interleave(q_offsets[1:] - q_offsets[:-1], output_size=total_q)
    self_local = torch.where(q_self >= 0, q_self - q_start, q_self)
    ts_dtype = torch.promote_types(q_ts.dtype, kv_ts.dtype)
    out = _core()(
        qp,
        kp,
        vp,
        _pad(q_ts.to(ts_dtype), q_offsets, max_q_len),
        _pad(self_local, q_offsets, max_q_len, fill=-1),
        _pad(torch.ones_like(q_ts, dtype=torch.bool), q_offsets, max_q_len, fill=False),
        _pad(kv_kind.to(torch.int64), kv_offsets, max_kv_len, fill=-1),
        _pad(kv_ts.to(ts_dtype), kv_offsets, max_kv_len),
        alpha,
    )
    out = out.permute(0, 3, 1, 2, 4).reshape(batch, max_q_len, num_heads, v.shape[-1])
    return _unpad(out, q_offsets, total_q)
