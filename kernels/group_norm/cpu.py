"""The fused C++ CPU kernel of Group LayerNorm (``csrc/group_norm_cpu.cpp``): forward and backward.

Semantics: those of ``reference.group_layer_norm_reference`` (tested equal, every gradient). One
pass over the ``[N, D]`` tokens per direction, where the reference makes four or more and its
backward's per-group gather is an accumulating ``index_put`` that runs serially on the CPU, and the
one-hot variant (``onehot.py``) still makes about six. float32 only: other dtypes are computed in
float32 and cast back. Built with the other C++ kernels (``mtfm_rec.kernels.cpu_extension``).
"""

from __future__ import annotations

from typing import Any, Tuple

import torch

from mtfm_rec.kernels.cpu_extension import load_extension


def extension() -> Any:
    """The compiled module (built on first call, then loaded from the build directory)."""
    return load_extension("mtfm_group_norm_cpu")


class _GroupLayerNormCpu(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, group: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
    ) -> torch.Tensor:
        y, mean, rstd = extension().forward(x, group, weight, bias, eps)
        ctx.save_for_backward(x, group, mean, rstd, weight)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> Tuple[Any, ...]:
        x, group, mean, rstd, weight = ctx.saved_tensors
        dx, dweight, dbias = extension().backward(dy, x, group, mean, rstd, weight, ctx.needs_input_grad[0])
        return (dx if ctx.needs_input_grad[0] else None), None, dweight, dbias, None


@torch.library.custom_op("mtfm_rec::group_layer_norm_cpu_forward", mutates_args=())
def group_layer_norm_cpu_forward(
    x: torch.Tensor, group: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """The kernel's forward as a torch operator (no autograd: inference), so that
    ``torch.export`` and AOTInductor can hold it in a graph (``mtfm_rec.serve``)."""
    # contiguous here, on the real tensors: a traced graph may drop the caller's .contiguous()
    args = [t.contiguous() for t in (x, group, weight, bias)]
    return extension().forward(*args, eps)[0]


@group_layer_norm_cpu_forward.register_fake
def _forward_shape(
    x: torch.Tensor, group: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    return torch.empty_like(x)


def group_layer_norm_cpu(
    x: torch.Tensor, group: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """Same contract as ``reference.group_layer_norm_reference``, for CPU tensors."""
    if x.device.type != "cpu":
        raise RuntimeError(f"group norm backend 'cpp' runs on the CPU, got {x.device.type} tensors")
    dtype = x.dtype
    f32 = [t.float().contiguous() for t in (x, weight, bias)]
    group = group.to(torch.int64).contiguous()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias)):
        y = _GroupLayerNormCpu.apply(f32[0], group, f32[1], f32[2], float(eps))
    else:  # the same forward, as an operator that torch.export can trace
        y = group_layer_norm_cpu_forward(f32[0], group, f32[1], f32[2], float(eps))
    return y.to(dtype)
