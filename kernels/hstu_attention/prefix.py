"""HSTU attention with the prefix-encoded dynamic mask as padded batched matmuls (backend ``prefix``).

The model's CPU path before the fused C++ kernel (``cpu.py``), kept selectable by name: the CPU
speed bench (``mtfm_rec.bench.cpu_path``) compares it with ``cpp``, and it runs under bf16
autocast. Same semantics as ``reference.py`` (tested equal), but the mask comes from two ints per
query (``QuerySet.prefix`` / ``QuerySet.self_local``, see ``mtfm_rec.model.mask``) and no kinds or
timestamps are gathered per call. Needs the ``(H; R by ts; T)`` layout of ``mtfm_rec.data.batch``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mtfm_rec.kernels.hstu_attention.reference import heads_per_group, score_scale
from mtfm_rec.kernels.jagged import KeySet, QuerySet


def hstu_attention_prefix(
    q: Tensor, k: Tensor, v: Tensor, queries: QuerySet, keys: KeySet, alpha: Optional[float] = None
) -> Tensor:
    """HSTU pointwise attention over padded ``[B, max_len]`` buffers; returns ``[total_q, H, Dv]``.

    Args:
        q: ``[total_q, H, D]``; k: ``[total_kv, G, D]``; v: ``[total_kv, G, Dv]``.
        queries: with the prefix encoding (:meth:`QuerySet.with_prefix`); ``pad_index`` places
            the jagged rows into the padded buffers.
        keys: the keys (only ``offsets``, ``max_len`` and ``pad_index`` are read).
        alpha: score scale, default ``D ** -0.5``.
    """
    q_prefix, q_self_local = queries.prefix_encoding("prefix")
    num_heads, dim = q.shape[1], q.shape[2]
    num_kv_heads, dim_v = k.shape[1], v.shape[-1]
    alpha = score_scale(q, alpha)
    r = heads_per_group(q, k)
    b, lq, lk = keys.batch_size, queries.max_len, keys.max_len
    q_pad_index, kv_pad_index = queries.pad_index, keys.pad_index
    qp = q.new_zeros(b * lq, num_heads, dim).index_copy(0, q_pad_index, q)
    qp = qp.view(b, lq, num_kv_heads, r, dim).permute(0, 2, 3, 1, 4)  # [B, G, r, Lq, D]
    kp = k.new_zeros(b * lk, num_kv_heads, dim).index_copy(0, kv_pad_index, k)
    kp = kp.view(b, lk, num_kv_heads, dim).permute(0, 2, 3, 1).unsqueeze(2)  # [B, G, 1, D, Lk]
    vp = v.new_zeros(b * lk, num_kv_heads, dim_v).index_copy(0, kv_pad_index, v)
    vp = vp.view(b, lk, num_kv_heads, dim_v).permute(0, 2, 1, 3).unsqueeze(2)  # [B, G, 1, Lk, Dv]
    scores = torch.matmul(qp, kp)  # [B, G, r, Lq, Lk]
    # visible / n_visible per (query, key): folds the mask and the 1/n normalisation into one.
    j = torch.arange(lk, device=q.device)
    visible = (j[None, :] < q_prefix[:, None]) | (j[None, :] == q_self_local[:, None])
    n_visible = (q_prefix + (q_self_local >= 0).to(q_prefix.dtype)).clamp(min=1)
    weight_rows = visible.to(scores.dtype) / n_visible[:, None].to(scores.dtype)
    weight = scores.new_zeros(b * lq, lk).index_copy(0, q_pad_index, weight_rows).view(b, 1, 1, lq, lk)
    out = torch.matmul(F.silu(alpha * scores) * weight, vp)  # [B, G, r, Lq, Dv]
    out = out.permute(0, 3, 1, 2, 4).reshape(b * lq, num_heads, dim_v)
    return out[q_pad_index]
