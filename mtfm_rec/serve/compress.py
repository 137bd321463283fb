"""Cheaper serving models: bf16 weights and activations, and 2:4 sparse HSTU projections.

* :func:`to_bf16`: a copy of a scenario subgraph in bfloat16 (embedding tables included;
  timestamps stay int64, the funnel probabilities are computed in fp32 from bf16 logits).
  Without AMX a CPU runs bf16 matmuls slower than fp32 (docs/BENCHMARKS.md), so on the CPU
  this saves memory, not time; on a GPU it is the fast path.
* :func:`prune_2to4`: magnitude pruning of a subgraph's HSTU projections, ``f1`` (U/Q/K/V)
  and ``f2`` (output), to the 2:4 pattern: in each group of 4 consecutive input weights of an output row
  the 2 of largest magnitude are kept. On the CPU the result is the masked dense weight (the
  correctness path: same numbers, no speed-up); :func:`to_semi_structured` swaps the
  projections for PyTorch's semi-structured sparse tensors, which only CUDA runs (Ampere or
  later). :func:`finetune_pruned` prunes a training model and fine-tunes it with the masks
  fixed (:func:`apply_masks` after every step), before its subgraphs are extracted.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Dict, Iterable, Iterator, List, Tuple, TypeVar

import torch
from torch import nn

from mtfm_rec.data.batch import Batch
from mtfm_rec.model.attention import _HSTULayer
from mtfm_rec.serve.subgraph import ServingLayer

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def to_bf16(model: ModuleT) -> ModuleT:
    """A bfloat16 copy of ``model`` (floating parameters and buffers; int buffers unchanged)."""
    return copy.deepcopy(model).to(torch.bfloat16)


def hstu_projections(model: nn.Module) -> Iterator[Tuple[str, nn.Linear]]:
    """``(name, linear)`` of every HSTU projection of ``model``: in a scenario subgraph ``f1`` as
    its query rows (``uq``) and key-value rows (``kv``), and ``f2``; in a training model ``f1``
    and ``f2`` (the same rows: a 2:4 mask of ``f1`` is the masks of ``uq`` and ``kv`` stacked)."""
    for name, module in model.named_modules():
        parts = ("uq", "kv", "f2") if isinstance(module, ServingLayer) else ("f1", "f2")
        if isinstance(module, (ServingLayer, _HSTULayer)):
            for part in parts:
                yield f"{name}.{part}", getattr(module, part)


def two_four_mask(weight: torch.Tensor) -> torch.Tensor:
    """The 2:4 mask of ``weight [out, in]`` (``in`` divisible by 4): per group of 4 consecutive
    inputs of a row, True on the 2 largest magnitudes (ties: the first)."""
    out_dim, in_dim = weight.shape
    if in_dim % 4:
        raise ValueError(f"2:4 sparsity needs in_features divisible by 4; got a weight {tuple(weight.shape)}")
    groups = weight.detach().abs().reshape(out_dim, in_dim // 4, 4)
    keep = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(out_dim, in_dim)


@torch.no_grad()
def prune_2to4(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Prunes every HSTU projection of ``model`` in place; returns ``{name: mask}``."""
    masks: Dict[str, torch.Tensor] = {}
    for name, linear in hstu_projections(model):
        masks[name] = two_four_mask(linear.weight)
        linear.weight.mul_(masks[name].to(linear.weight.dtype))
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Dict[str, torch.Tensor]) -> None:
    """Zeroes the pruned weights again (after an optimizer step of a fine-tune)."""
    for name, linear in hstu_projections(model):
        if name in masks:
            linear.weight.mul_(masks[name].to(linear.weight.device, linear.weight.dtype))


def finetune_pruned(model: nn.Module, batches: Iterable[Batch], steps: int, lr: float) -> List[float]:
    """Prunes a training model's HSTU projections to 2:4 and fine-tunes its dense part for
    ``steps`` batches (cycling ``batches``) with the masks fixed: Adam at ``lr``, the embedding
    tables frozen, the pruned weights zeroed again after every step. Returns the losses.

    Raises:
        FloatingPointError: a loss is not finite (nothing is served from a diverged model).
    """
    masks = prune_2to4(model)
    params = [p for name, p in model.named_parameters() if name.startswith("dense.")]
    frozen = [p for name, p in model.named_parameters() if not name.startswith("dense.")]
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(params, lr=lr)
    losses: List[float] = []
    model.train()
    for step, batch in zip(range(steps), itertools.cycle(batches)):
        loss, _ = model(batch)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"2:4 fine-tune: loss {value} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        apply_masks(model, masks)
        losses.append(value)
    model.eval()
    return losses


def to_semi_structured(model: nn.Module) -> nn.Module:
    """A copy of a pruned ``model`` whose HSTU projections hold
    ``torch.sparse.to_sparse_semi_structured`` weights (CUDA only: the CPU has no kernels).

    Raises:
        RuntimeError: ``model`` is not on a CUDA device.
    """
    out = copy.deepcopy(model)
    for _, linear in hstu_projections(out):
        if linear.weight.device.type != "cuda":
            raise RuntimeError(
                "semi-structured 2:4 kernels run on CUDA only; on the CPU serve the masked dense "
                f"weights of prune_2to4 (weight on {linear.weight.device})"
            )
        linear.weight = nn.Parameter(
            torch.sparse.to_sparse_semi_structured(linear.weight), requires_grad=False
        )
    return out
