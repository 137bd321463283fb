"""Full and target HSTU attention layers with GQA (paper eq. 6-18).

Both layers share one parameterisation, so a target layer is literally a full layer evaluated
for the T-token queries only::

    f1: d_model -> [ U (H*D) | Q (H*D) | K (G*D) | V (G*D) ]     (eq. 7; eq. 13 = rows U,Q; eq. 14 = rows K,V)
    f2: H*D -> d_model                                          (eq. 10 / 17)
    GLN_in, GLN_out: per token group affine params              (eq. 6, and GLN(A) in eq. 10 / 17)

Full layer (all N tokens are queries and keys)::

    X~ = GLN_in(X);  U, Q, K, V = split(silu(f1(X~)))
    A  = hstu_attention(Q, K, V, mask M)            # silu(alpha q.k) / n_visible, no softmax
    X' = X + f2(GLN_out(A) * U)

Target layer (queries = T tokens only; keys/values = all N tokens; H and R pass through)::

    X~ = GLN_in(X)                                   # all N rows: the keys need them
    K, V   = split(silu(f1[K,V](X~)))                # all N rows: O(N d G D)
    U_T, Q_T = split(silu(f1[U,Q](X~[T])))           # T rows only
    A_T = hstu_attention(Q_T, K, V, mask M_T)        # O(L_T N H D)
    X'  = X with rows T replaced by X[T] + f2(GLN_out(A_T) * U_T)

Eq. 14 of the paper writes ``f_kv(X~_T)``; we read it as keys/values from all N tokens
(``M_T`` has N columns and the stated cost is O(K N L_T)), see docs/MODEL.md.
"""

from __future__ import annotations

from typing import Any, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mtfm_rec.kernels.group_norm import BACKENDS as GROUP_NORM_BACKENDS
from mtfm_rec.kernels.group_norm import group_layer_norm
from mtfm_rec.kernels.hstu_attention import hstu_attention
from mtfm_rec.model.config import CPP_BACKEND, PREFIX_BACKEND, ModelConfig
from mtfm_rec.model.mask import AttentionLayout


def prefix_hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pad_index: torch.Tensor,
    kv_pad_index: torch.Tensor,
    q_prefix: torch.Tensor,
    q_self_local: torch.Tensor,
    batch_size: int,
    max_q_len: int,
    max_kv_len: int,
    alpha: float,
) -> torch.Tensor:
    """HSTU pointwise attention with the prefix-encoded dynamic mask (the model's CPU path).

    Same semantics as ``mtfm_rec.kernels.hstu_attention`` (tested equal to the reference),
    but the mask comes from two ints per query (see ``mask.py``) and no kinds/timestamps are
    gathered per layer. Padded batched matmuls, so it runs under bf16 autocast.

    Args:
        q: ``[total_q, H, D]``; k: ``[total_kv, G, D]``; v: ``[total_kv, G, Dv]``.
        q_pad_index / kv_pad_index: jagged row -> flat index of the padded ``[B * max_len]`` layout.
        q_prefix: ``[total_q]`` keys ``[0, prefix)`` of the sample are visible.
        q_self_local: ``[total_q]`` the query's own sample-local key index, -1 if none.
    Returns:
        ``[total_q, H, Dv]``.
    """
    total_q, num_heads, dim = q.shape
    num_kv_heads, dim_v = k.shape[1], v.shape[-1]
    r = num_heads // num_kv_heads
    b, lq, lk = batch_size, max_q_len, max_kv_len
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


class _TakeRows(torch.autograd.Function):
    """``x[rows]`` for unique ``rows``, whose backward scatters with ``index_copy`` instead of the
    accumulating ``index_put`` of advanced indexing (serial on the CPU)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(rows)
        ctx.num_rows = x.shape[0]
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:  # type: ignore[override]
        (rows,) = ctx.saved_tensors
        return grad.new_zeros((ctx.num_rows,) + tuple(grad.shape[1:])).index_copy(0, rows, grad), None


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[rows]`` where ``rows`` holds no index twice (the T-token rows of a layout)."""
    return _TakeRows.apply(x, rows)


def resolve_attention_backend(backend: str, device: torch.device) -> str:
    """The implementation a layer runs on ``device`` for ``model.attention_backend``.

    ``auto`` is the Triton kernels on CUDA and the fused C++ kernel (``cpp``) elsewhere, the
    fastest exact CPU path (docs/KERNELS.md), so one config trains with Triton on a GPU and with
    the C++ kernel on the CPU. Any other name is taken as is (``prefix``: the previous CPU path).
    """
    if backend == "auto":
        return "triton" if device.type == "cuda" else CPP_BACKEND
    return backend


def norm_backend(attention_backend: str) -> str:
    """The Group LayerNorm implementation that goes with a resolved attention backend: the
    one-hot CPU path with ``cpp``, the same name where the norm dispatcher has it, else its ``auto``
    (so ``prefix``, the previous CPU default, keeps the reference norm)."""
    if attention_backend == CPP_BACKEND:
        return "onehot"
    return attention_backend if attention_backend in GROUP_NORM_BACKENDS else "auto"


class _HSTULayer(nn.Module):
    """Parameters shared by :class:`FullAttentionLayer` and :class:`TargetAttentionLayer`."""

    def __init__(self, config: ModelConfig, num_groups: int) -> None:
        super().__init__()
        d, h, g, hd = config.d_model, config.num_heads, config.num_kv_heads, config.resolved_head_dim
        if h % g:
            raise ValueError(f"num_heads={h} must be divisible by num_kv_heads={g}")
        self.num_heads, self.num_kv_heads, self.head_dim = h, g, hd
        self.uq_dim = 2 * h * hd  # rows of f1 computed on the queries
        self.f1 = nn.Linear(d, 2 * h * hd + 2 * g * hd)
        self.f2 = nn.Linear(h * hd, d)
        self.in_norm_weight = nn.Parameter(torch.ones(num_groups, d))
        self.in_norm_bias = nn.Parameter(torch.zeros(num_groups, d))
        self.out_norm_weight = nn.Parameter(torch.ones(num_groups, h * hd))
        self.out_norm_bias = nn.Parameter(torch.zeros(num_groups, h * hd))
        self.dropout = nn.Dropout(config.dropout)
        self.backend = config.attention_backend
        self.alpha = config.attention_alpha or hd**-0.5
        self.eps = config.norm_eps

    def _uq(self, x_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        uq = F.silu(F.linear(x_norm, self.f1.weight[: self.uq_dim], self.f1.bias[: self.uq_dim]))
        u, q = uq.split(self.uq_dim // 2, dim=-1)
        return u, q.reshape(-1, self.num_heads, self.head_dim)

    def _kv(self, x_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv = F.silu(F.linear(x_norm, self.f1.weight[self.uq_dim :], self.f1.bias[self.uq_dim :]))
        k, v = kv.split(self.num_kv_heads * self.head_dim, dim=-1)
        shape = (-1, self.num_kv_heads, self.head_dim)
        return k.reshape(shape), v.reshape(shape)

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: AttentionLayout,
        target: bool,
        backend: str,
    ) -> torch.Tensor:
        if target:
            q_offsets, q_ts, q_self, max_q = (
                layout.target_offsets,
                layout.target_ts,
                layout.target_rows,
                layout.max_targets,
            )
            q_pad, q_prefix, q_self_local = (
                layout.target_pad_index,
                layout.target_prefix,
                layout.target_self_local,
            )
        else:
            q_offsets, q_ts, q_self, max_q = (
                layout.token_offsets,
                layout.token_ts,
                layout.full_self,
                layout.max_tokens,
            )
            q_pad, q_prefix, q_self_local = (
                layout.token_pad_index,
                layout.full_prefix,
                layout.full_self_local,
            )
        if backend == CPP_BACKEND:
            from mtfm_rec.kernels.hstu_attention.cpu import hstu_attention_cpu

            out = hstu_attention_cpu(
                q, k, v, q_offsets, layout.token_offsets, q_prefix, q_self_local, self.alpha
            )
        elif backend == PREFIX_BACKEND:
            out = prefix_hstu_attention(
                q,
                k,
                v,
                q_pad,
                layout.token_pad_index,
                q_prefix,
                q_self_local,
                layout.batch_size,
                max_q,
                layout.max_tokens,
                self.alpha,
            )
        else:
            out = hstu_attention(
                q,
                k,
                v,
                q_offsets,
                layout.token_offsets,
                q_ts,
                q_self,
                layout.token_kind,
                layout.token_ts,
                max_q,
                layout.max_tokens,
                self.alpha,
                backend,
            )
        return out.reshape(out.shape[0], -1)

    def _output(
        self, x: torch.Tensor, a: torch.Tensor, u: torch.Tensor, group: torch.Tensor, backend: str
    ) -> torch.Tensor:
        a = group_layer_norm(
            a, group, self.out_norm_weight, self.out_norm_bias, self.eps, norm_backend(backend)
        )
        return x + self.dropout(self.f2(a * u))

    def _norm_in(self, x: torch.Tensor, group: torch.Tensor, backend: str) -> torch.Tensor:
        return group_layer_norm(
            x, group, self.in_norm_weight, self.in_norm_bias, self.eps, norm_backend(backend)
        )


class FullAttentionLayer(_HSTULayer):
    """Every token attends to every visible token and is updated (eq. 6-10)."""

    def forward(self, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        """``x``: ``[N, d_model]`` tokens of ``layout``; returns the updated ``[N, d_model]``."""
        backend = resolve_attention_backend(self.backend, x.device)
        x_norm = self._norm_in(x, layout.token_group, backend)
        u, q = self._uq(x_norm)
        k, v = self._kv(x_norm)
        a = self._attend(q, k, v, layout, False, backend)
        return self._output(x, a, u, layout.token_group, backend)


class TargetAttentionLayer(_HSTULayer):
    """Only T tokens are queries and are updated; keys/values come from all N tokens (eq. 11-18)."""

    def forward(self, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        """``x``: ``[N, d_model]``; returns ``x`` with only the rows ``layout.target_rows`` changed."""
        backend = resolve_attention_backend(self.backend, x.device)
        x_norm = self._norm_in(x, layout.token_group, backend)
        k, v = self._kv(x_norm)
        rows = layout.target_rows
        # the fast path gathers with a scatter-free backward; the others keep plain indexing
        gather = take_rows if backend == CPP_BACKEND else (lambda t, r: t[r])
        u, q = self._uq(gather(x_norm, rows))
        a = self._attend(q, k, v, layout, True, backend)
        x_t = self._output(gather(x, rows), a, u, layout.token_group[rows], backend)
        return x.index_copy(0, rows, x_t)


def make_layer(kind: str, config: ModelConfig, num_groups: int) -> _HSTULayer:
    """``"full"`` -> :class:`FullAttentionLayer`, ``"target"`` -> :class:`TargetAttentionLayer`."""
    if kind == "full":
        return FullAttentionLayer(config, num_groups)
    if kind == "target":
        return TargetAttentionLayer(config, num_groups)
    raise ValueError(f"unknown attention layer kind {kind!r}; expected 'full' or 'target'")
