"""A compiled CPU candidate for HSTU attention (not a dispatcher backend; only the kernel bench uses it).

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
the CPU fast paths are ``mtfm_rec.kernels.hstu_attention`` ``blocksparse`` and ``cpp`` instead; see
docs/KERNELS.md and ``python -m mtfm_rec.bench --only kernels``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mtfm_rec.kernels.hstu_attention.reference import heads_per_group, jagged_heads, padded_heads, score_scale
from mtfm_rec.kernels.jagged import KeySet, QuerySet, TokenKind, local_self_rows, pad

# Plain ints inside the compiled graph (constants to dynamo, no enum handling needed).
_HISTORY, _REALTIME = int(TokenKind.HISTORY), int(TokenKind.REALTIME)


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
    mask = (kind_p == _HISTORY)[:, None, :] | (
        (kind_p == _REALTIME)[:, None, :] & (kts_p[:, None, :] < q_ts_p[:, :, None])
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
    q: Tensor, k: Tensor, v: Tensor, queries: QuerySet, keys: KeySet, alpha: Optional[float] = None
) -> Tensor:
    """Compiled padded HSTU attention (differentiable in q, k, v); semantics of the reference.

    The first call compiles (tens of seconds on a small CPU); later calls with other batch shapes
    reuse the dynamic-shape graph.
    """
    heads_per_group(q, k)
    if q.shape[0] == 0:
        return q.new_zeros(0, q.shape[1], v.shape[-1])
    alpha = score_scale(q, alpha)
    max_q, max_kv = queries.max_len, keys.max_len
    qp, kp, vp = padded_heads(q, k, v, queries, keys)
    ts_dtype = torch.promote_types(queries.ts.dtype, keys.ts.dtype)
    out = _core()(
        qp,
        kp,
        vp,
        pad(queries.ts.to(ts_dtype), queries.offsets, max_q),
        pad(local_self_rows(queries, keys), queries.offsets, max_q, fill=-1),
        pad(torch.ones_like(queries.ts, dtype=torch.bool), queries.offsets, max_q, fill=False),
        pad(keys.kind.to(torch.int64), keys.offsets, max_kv, fill=-1),
        pad(keys.ts.to(ts_dtype), keys.offsets, max_kv),
        alpha,
    )
    return jagged_heads(out, queries, q.shape[0])
