"""HSTU pointwise attention on jagged tensors with the MTFM dynamic mask and GQA (reference).

Layout (values + offsets, no global padding; ``mtfm_rec.kernels.jagged``)::

    q        [total_q, H, D]     queries of all samples, sample-major
    k        [total_kv, G, D]    keys, G key-value heads (H % G == 0; head h reads group h // (H // G))
    v        [total_kv, G, Dv]
    queries  QuerySet            sample b's queries are rows queries.offsets[b]:queries.offsets[b+1]
    keys     KeySet              sample b's keys are rows keys.offsets[b]:keys.offsets[b+1]

Full attention: queries = keys = all tokens. Target attention: queries = the T tokens only
(``queries.offsets`` is then the T-token layout), keys = all tokens.

The dynamic mask (paper 3.2.2, Figure 2) is derived from per-token kinds and timestamps, never
stored as N x N. Key j is visible to query i (same sample) when

    keys.kind[j] == H                                      (history is visible to everyone)
    or keys.kind[j] == R and keys.ts[j] < queries.ts[i]    (real-time only to strictly later tokens)
    or j == queries.self_rows[i]                           (a T token sees itself; -1 for non-T queries)

and the output is the mean over visible keys of SiLU-weighted values:

    out[i, h] = sum_{j visible} silu(alpha * <q[i, h], k[j, g(h)]>) * v[j, g(h)] / max(1, n_visible(i))
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mtfm_rec.kernels.jagged import KeySet, QuerySet, TokenKind, local_self_rows, pad, unpad


def heads_per_group(q: torch.Tensor, k: torch.Tensor) -> int:
    """``H // G``: the query heads that share each key-value head (a ``ValueError`` if ``H % G``)."""
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}")
    return num_heads // num_kv_heads


def score_scale(q: torch.Tensor, alpha: Optional[float]) -> float:
    """``alpha``, by default ``D ** -0.5`` (D = q's head dim)."""
    return q.shape[-1] ** -0.5 if alpha is None else float(alpha)


def padded_heads(
    q: Tensor, k: Tensor, v: Tensor, queries: QuerySet, keys: KeySet
) -> Tuple[Tensor, Tensor, Tensor]:
    """q, k, v padded per sample and laid out for batched GQA matmuls: ``[B, G, r, Lq, D]``
    (r = H // G query heads per kv head), ``[B, G, Lk, D]`` and ``[B, G, Lk, Dv]``."""
    batch, max_q, max_kv = queries.offsets.numel() - 1, queries.max_len, keys.max_len
    num_kv_heads, dim = k.shape[1], q.shape[-1]
    r = heads_per_group(q, k)
    qp = pad(q, queries.offsets, max_q).view(batch, max_q, num_kv_heads, r, dim).permute(0, 2, 3, 1, 4)
    kp = pad(k, keys.offsets, max_kv).permute(0, 2, 1, 3)
    vp = pad(v, keys.offsets, max_kv).permute(0, 2, 1, 3)
    return qp, kp, vp


def jagged_heads(out: Tensor, queries: QuerySet, total_q: int) -> Tensor:
    """The inverse of :func:`padded_heads` for an output ``[B, G, r, Lq, Dv]``: ``[total_q, H, Dv]``."""
    batch, num_kv_heads, r, max_q, dim_v = out.shape
    out = out.permute(0, 3, 1, 2, 4).reshape(batch, max_q, num_kv_heads * r, dim_v)
    return unpad(out, queries.offsets, total_q)


def dynamic_mask_padded(queries: QuerySet, keys: KeySet) -> torch.Tensor:
    """The materialised mask [B, queries.max_len, keys.max_len] (bool), for the reference and debugging."""
    max_q, max_kv = queries.max_len, keys.max_len
    q_ts_p = pad(queries.ts, queries.offsets, max_q)
    self_local = pad(local_self_rows(queries, keys), queries.offsets, max_q, fill=-1)
    kind_p = pad(keys.kind.to(torch.int64), keys.offsets, max_kv, fill=-1)
    kts_p = pad(keys.ts, keys.offsets, max_kv)
    j = torch.arange(max_kv, device=queries.ts.device)
    visible = (kind_p == TokenKind.HISTORY)[:, None, :] | (
        (kind_p == TokenKind.REALTIME)[:, None, :] & (kts_p[:, None, :] < q_ts_p[:, :, None])
    )
    visible = visible | (j[None, None, :] == self_local[:, :, None])
    q_valid = pad(torch.ones_like(queries.ts, dtype=torch.bool), queries.offsets, max_q, fill=False)
    return visible & q_valid[:, :, None]


def hstu_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, queries: QuerySet, keys: KeySet, alpha: Optional[float] = None
) -> Tensor:
    """See the module docstring. Returns [total_q, H, Dv] in q's dtype."""
    heads_per_group(q, k)
    if q.shape[0] == 0:
        return q.new_zeros(0, q.shape[1], v.shape[-1])
    alpha = score_scale(q, alpha)
    qp, kp, vp = padded_heads(q, k, v, queries, keys)
    mask = dynamic_mask_padded(queries, keys)
    scores = torch.matmul(qp, kp.unsqueeze(2).transpose(-1, -2))  # [B, G, r, Lq, Lk]
    weights = F.silu(alpha * scores) * mask[:, None, None].to(scores.dtype)
    n_visible = mask.sum(-1).clamp(min=1).to(scores.dtype)  # [B, Lq]
    out = torch.matmul(weights, vp.unsqueeze(2)) / n_visible[:, None, None, :, None]
    return jagged_heads(out, queries, q.shape[0])
