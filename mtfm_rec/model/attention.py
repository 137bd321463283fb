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

``hstu_attention`` is the kernel dispatcher (``mtfm_rec.kernels.hstu_attention``, where every
implementation lives); a layer resolves ``model.attention_backend`` for its device once, at its
first forward on that device, and picks the Group LayerNorm that goes with it (:func:`norm_backend`).

Attention weights for analysis: a layer's ``_recorder`` (None by default, so training pays one
``is None`` test) is called after each attention with what the weights are computed from;
:func:`mtfm_rec.model.attention_probe.record_attention` installs and removes it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from mtfm_rec.kernels.backends import AttentionBackend, NormBackend
from mtfm_rec.kernels.group_norm import group_layer_norm
from mtfm_rec.kernels.hstu_attention import hstu_attention, resolve
from mtfm_rec.model.config import ModelConfig
from mtfm_rec.model.mask import AttentionLayout
from mtfm_rec.model.segment_norm import hstu_attention_by_segment
from mtfm_rec.model.time_features import TimeBias, TimeRotary


class _TakeRows(torch.autograd.Function):
    """``x[rows]`` for unique ``rows``, whose backward scatters with ``index_copy`` instead of the
    accumulating ``index_put`` of advanced indexing (serial on the CPU)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.num_rows = x.shape[0]
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:
        (rows,) = ctx.saved_tensors
        return grad.new_zeros((ctx.num_rows,) + tuple(grad.shape[1:])).index_copy(0, rows, grad), None


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[rows]`` where ``rows`` holds no index twice (the T-token rows of a layout)."""
    return _TakeRows.apply(x, rows)


def _index_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return x[rows]


# The Group LayerNorm that goes with a resolved attention backend: the dispatcher's
# implementation of the same name for ``cpp`` (the fused C++ norm), ``reference`` and
# ``triton``; else the norm's ``auto`` (so ``prefix``, the previous CPU default, keeps the
# reference norm on the CPU).
_NORM_FOR = {
    AttentionBackend.CPP: NormBackend.CPP,
    AttentionBackend.REFERENCE: NormBackend.REFERENCE,
    AttentionBackend.TRITON: NormBackend.TRITON,
}


# ``recorder(layer, q, k, v, out, layout, target)``: the arguments and output of one attention
# call of ``layer`` (``out``: ``[total_q, H, Dv]``; ``target``: queries are the T tokens).
AttentionRecorder = Callable[
    ["_HSTULayer", torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionLayout, bool], None
]


def norm_backend(attention_backend: Union[AttentionBackend, str]) -> NormBackend:
    """The Group LayerNorm implementation that goes with a resolved attention backend."""
    return _NORM_FOR.get(AttentionBackend(attention_backend), NormBackend.AUTO)


class _HSTULayer(nn.Module):
    """Parameters shared by :class:`FullAttentionLayer` and :class:`TargetAttentionLayer`."""

    def __init__(self, config: ModelConfig, num_groups: int, ticks_per_second: int = 1) -> None:
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
        self.backend = AttentionBackend(config.attention_backend)
        # (device type, resolved backend) of the last forward: ``auto`` depends on the device,
        # which is known only once the module has been moved and called.
        self._resolved: Optional[Tuple[str, AttentionBackend]] = None
        self.alpha = config.attention_alpha or hd**-0.5
        self.rotary = TimeRotary(
            config.time_rotary_pairs, hd, ticks_per_second, config.time_rotary_head_share
        )
        self.time_bias = TimeBias(
            config.time_bias_pairs, d, h, ticks_per_second, config.time_bias_source, num_groups
        )
        self.eps = config.norm_eps
        self.segment_norm = config.attention_normalisation == "segment"
        self._recorder: Optional[AttentionRecorder] = None  # see the module docstring

    def resolved_backend(self, device: torch.device) -> AttentionBackend:
        """``model.attention_backend`` resolved for ``device`` (once per device type)."""
        if self._resolved is None or self._resolved[0] != device.type:
            self._resolved = (device.type, resolve(self.backend, device))
        return self._resolved[1]

    def _uq(
        self, x_norm: torch.Tensor, ts: torch.Tensor, group: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u [M, H*D], q [M, H, D (+ time bias channels)])`` of query rows at times ``ts`` in
        token groups ``group``."""
        uq = F.silu(F.linear(x_norm, self.f1.weight[: self.uq_dim], self.f1.bias[: self.uq_dim]))
        u, q = uq.split(self.uq_dim // 2, dim=-1)
        return u, self.time_bias.query(q.reshape(-1, self.num_heads, self.head_dim), x_norm, ts, group)

    def _kv(self, x_norm: torch.Tensor, ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k [N, G, D (+ time bias channels)], v [N, G, D])`` of key rows at times ``ts``."""
        kv = F.silu(F.linear(x_norm, self.f1.weight[self.uq_dim :], self.f1.bias[self.uq_dim :]))
        k, v = kv.split(self.num_kv_heads * self.head_dim, dim=-1)
        shape = (-1, self.num_kv_heads, self.head_dim)
        return self.time_bias.key(k.reshape(shape), ts), v.reshape(shape)

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: AttentionLayout,
        target: bool,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        queries = layout.queries(target)
        q, k = self.rotary(q, queries.ts), self.rotary(k, layout.keys.ts)
        attend = hstu_attention_by_segment if self.segment_norm else hstu_attention
        out = attend(q, k, v, queries, layout.keys, self.alpha, backend)
        if self._recorder is not None:
            self._recorder(self, q, k, v, out, layout, target)
        return out.reshape(out.shape[0], -1)

    def _output(
        self,
        x: torch.Tensor,
        a: torch.Tensor,
        u: torch.Tensor,
        group: torch.Tensor,
        backend: Union[AttentionBackend, str],
    ) -> torch.Tensor:
        a = group_layer_norm(
            a, group, self.out_norm_weight, self.out_norm_bias, self.eps, norm_backend(backend)
        )
        return x + self.dropout(self.f2(a * u))

    def _norm_in(
        self, x: torch.Tensor, group: torch.Tensor, backend: Union[AttentionBackend, str]
    ) -> torch.Tensor:
        return group_layer_norm(
            x, group, self.in_norm_weight, self.in_norm_bias, self.eps, norm_backend(backend)
        )


class FullAttentionLayer(_HSTULayer):
    """Every token attends to every visible token and is updated (eq. 6-10)."""

    def forward(self, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        """``x``: ``[N, d_model]`` tokens of ``layout``; returns the updated ``[N, d_model]``."""
        backend = self.resolved_backend(x.device)
        x_norm = self._norm_in(x, layout.token_group, backend)
        u, q = self._uq(x_norm, layout.full.ts, layout.token_group)
        k, v = self._kv(x_norm, layout.keys.ts)
        a = self._attend(q, k, v, layout, False, backend)
        return self._output(x, a, u, layout.token_group, backend)


class TargetAttentionLayer(_HSTULayer):
    """Only T tokens are queries and are updated; keys/values come from all N tokens (eq. 11-18)."""

    def forward(self, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        """``x``: ``[N, d_model]``; returns ``x`` with only the rows ``layout.target_rows`` changed."""
        backend = self.resolved_backend(x.device)
        x_norm = self._norm_in(x, layout.token_group, backend)
        k, v = self._kv(x_norm, layout.keys.ts)
        rows = layout.target_rows
        # the fast path gathers with a scatter-free backward; the others keep plain indexing
        gather = take_rows if backend is AttentionBackend.CPP else _index_rows
        group = layout.token_group[rows]
        u, q = self._uq(gather(x_norm, rows), layout.target.ts, group)
        a = self._attend(q, k, v, layout, True, backend)
        x_t = self._output(gather(x, rows), a, u, group, backend)
        return x.index_copy(0, rows, x_t)


def make_layer(kind: str, config: ModelConfig, num_groups: int, ticks_per_second: int = 1) -> _HSTULayer:
    """``"full"`` -> :class:`FullAttentionLayer`, ``"target"`` -> :class:`TargetAttentionLayer`
    (``ticks_per_second``: the dataset's time unit, for ``model.time_rotary_pairs`` and
    ``model.time_bias_pairs``)."""
    if kind == "full":
        return FullAttentionLayer(config, num_groups, ticks_per_second)
    if kind == "target":
        return TargetAttentionLayer(config, num_groups, ticks_per_second)
    raise ValueError(f"unknown attention layer kind {kind!r}; expected 'full' or 'target'")
