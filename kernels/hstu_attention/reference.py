"""HSTU pointwise attention on jagged tensors with the MTFM dynamic mask and GQA (reference).

Layout (values + offsets, no global padding)::

    q          [total_q, H, D]     queries of all samples, sample-major
    k          [total_kv, G, D]    keys, G key-value heads (H % G == 0; head h reads group h // (H // G))
    v          [total_kv, G, Dv]
    q_offsets  [B+1]               sample b's queries are rows q_offsets[b]:q_offsets[b+1]
    kv_offsets [B+1]               sample b's keys are rows kv_offsets[b]:kv_offsets[b+1]

Full attention: queries = keys = all tokens. Target attention: queries = the T tokens only
(``q_offsets`` is then the T-token layout), keys = all tokens.

The dynamic mask (paper 3.2.2, Figure 2) is derived from per-token kinds and timestamps, never
stored as N x N. Key j is visible to query i (same sample) when

    kv_kind[j] == H                              (history is visible to everyone)
    or kv_kind[j] == R and kv_ts[j] < q_ts[i]    (real-time only to strictly later tokens)
    or j == q_self[i]                            (a T token sees itself; -1 for non-T queries)

and the output is the mean over visible keys of SiLU-weighted values:

    out[i, h] = sum_{j visible} silu(alpha * <q[i, h], k[j, g(h)]>) * v[j, g(h)] / max(1, n_visible(i))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KIND_HISTORY, KIND_REALTIME, KIND_TARGET = 0, 1, 2


def _pad(x: torch.Tensor, offsets: torch.Tensor, max_len: int, fill: float = 0) -> torch.Tensor:
    """Jagged [total, ...] -> padded [B, max_len, ...]."""
    lengths = offsets[1:] - offsets[:-1]
    batch = lengths.numel()
    sample = torch.repeat_interleave(torch.arange(batch, device=x.device), lengths, output_size=x.shape[0])
    pos = torch.arange(x.shape[0], device=x.device) - offsets[sample]
    out = x.new_full((batch, max_len) + tuple(x.shape[1:]), fill)
    out[sample, pos] = x
    return out


def _unpad(x: torch.Tensor, offsets: torch.Tensor, total: int) -> torch.Tensor:
    """Padded [B, max_len, ...] -> jagged [total, ...]."""
    lengths = offsets[1:] - offsets[:-1]
    sample = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=x.device), lengths, output_size=total
    )
    pos = torch.arange(total, device=x.device) - offsets[sample]
    return x[sample, pos]


def dynamic_mask_padded(
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    q_ts: torch.Tensor,
    q_self: torch.Tensor,
    kv_kind: torch.Tensor,
    kv_ts: torch.Tensor,
    max_q_len: int,
    max_kv_len: int,
) -> torch.Tensor:
    """The materialised mask [B, max_q_len, max_kv_len] (bool), for the reference and debugging."""
    q_ts_p = _pad(q_ts, q_offsets, max_q_len)
    q_sample_start = _pad(
        kv_offsets[:-1].repeat_interleave(q_offsets[1:] - q_offsets[:-1], output_size=q_ts.numel()),
        q_offsets,
        max_q_len,
    )
    self_local = _pad(q_self, q_offsets, max_q_len, fill=-1)
    self_local = torch.where(self_local >= 0, self_local - q_sample_start, self_local)
    kind_p = _pad(kv_kind.to(torch.int64), kv_offsets, max_kv_len, fill=-1)
    kts_p = _pad(kv_ts, kv_offsets, max_kv_len)
    j = torch.arange(max_kv_len, device=q_ts.device)
    visible = (kind_p == KIND_HISTORY)[:, None, :] | (
        (kind_p == KIND_REALTIME)[:, None, :] & (kts_p[:, None, :] < q_ts_p[:, :, None])
    )
    visible = visible | (j[None, None, :] == self_local[:, :, None])
    q_valid = _pad(torch.ones_like(q_ts, dtype=torch.bool), q_offsets, max_q_len, fill=False)
    return visible & q_valid[:, :, None]


def hstu_attention_reference(
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
    alpha: float | None = None,
) -> torch.Tensor:
    """See the module docstring. Returns [total_q, H, Dv] in q's dtype."""
    total_q, num_heads, dim = q.shape
    num_kv_heads = k.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}")
    if total_q == 0:
        return q.new_zeros(0, num_heads, v.shape[-1])
    alpha = dim**-0.5 if alpha is None else alpha
    batch = q_offsets.numel() - 1
    r = num_heads // num_kv_heads
    qp = _pad(q, q_offsets, max_q_len).view(batch, max_q_len, num_kv_heads, r, dim).permute(0, 2, 3, 1, 4)
    kp = _pad(k, kv_offsets, max_kv_len).permute(0, 2, 1, 3)  # [B, G, Lk, D]
    vp = _pad(v, kv_offsets, max_kv_len).permute(0, 2, 1, 3)  # [B, G, Lk, Dv]
    mask = dynamic_mask_padded(q_offsets, kv_offsets, q_ts, q_self, kv_kind, kv_ts, max_q_len, max_kv_len)
    scores = torch.matmul(qp, kp.unsqueeze(2).transpose(-1, -2))  # [B, G, r, Lq, Lk]
    weights = F.silu(alpha * scores) * mask[:, None, None].to(scores.dtype)
    n_visible = mask.sum(-1).clamp(min=1).to(scores.dtype)  # [B, Lq]
    out = torch.matmul(weights, vp.unsqueeze(2)) / n_visible[:, None, None, :, None]
    out = out.permute(0, 3, 1, 2, 4).reshape(batch, max_q_len, num_heads, v.shape[-1])
    return _unpad(out, q_offsets, total_q)
