"""Attention weights of chosen HTA layers for chosen samples, for analysis (paper Figure 5).

::

    with record_attention(model, layers=[0, -1], samples=[0, 3]) as rec:
        model(batch)                       # records every forward inside the block
    r = rec.records[-1][0]                 # AttentionRecord: last layer, first recorded sample
    r.weights                              # [H, L_T, L_k]: T queries x the sample's tokens

The hook is ``_HSTULayer._recorder`` (``mtfm_rec.model.attention``): None outside this context
manager, so training pays one ``is None`` test per layer. Inside, it is called after each
attention with the layer's ``q``, ``k``, ``v``, the kernel's output and the layout, and the
weights are recomputed from ``q`` and ``k`` with the reference formula
(``mtfm_rec.kernels.hstu_attention.reference``)::

    w[h, i, j] = silu(alpha <q[i, h], k[j, h // (H / G)]>) * visible(i, j) / max(1, n_visible(i))

(``model.attention_normalisation: segment``: ``n`` counts the visible keys of j's own segment,
the history or the rest, ``mtfm_rec.model.segment_norm``)
so ``out[i, h] = sum_j w[h, i, j] v[j, h // (H / G)]`` (there is no softmax: a query's weights
do not sum to 1 and may be negative, silu's minimum being about -0.28). Only the T-token queries
are kept, for a full layer too (whose queries are all tokens). The weights are dense per
sample, ``[H, L_T, L_k]`` over all of the sample's ``L_k`` tokens, so record a few samples only.
The recording never changes what the model computes (tested bit for bit).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mtfm_rec.kernels.jagged import TokenKind
from mtfm_rec.model.attention import AttentionRecorder, _HSTULayer
from mtfm_rec.model.mask import AttentionLayout
from mtfm_rec.model.segment_norm import visible_counts


@dataclass
class AttentionRecord:
    """The attention of one sample's T tokens in one layer call.

    Attributes:
        layer: index of the layer in ``model.dense.hta.layers`` (non-negative).
        kind: ``"full"`` or ``"target"``.
        call: how many forwards of this layer were recorded before this one (0 for the first).
        sample: the sample's index in its batch.
        query_rows: ``[L_T]`` flat token rows of the sample's T tokens (the queries).
        key_rows: ``[L_k]`` flat token rows of all of the sample's tokens (the keys).
        weights: ``[H, L_T, L_k]`` float32 (formula in the module docstring); 0 where masked.
        visible: ``[L_T, L_k]`` bool, the dynamic mask.
        values: ``[L_k, H, Dv]`` the values each query head reads (GQA groups repeated).
        output: ``[L_T, H, Dv]`` the layer's attention output (its kernel) for these queries.
    """

    layer: int
    kind: str
    call: int
    sample: int
    query_rows: torch.Tensor
    key_rows: torch.Tensor
    weights: torch.Tensor
    visible: torch.Tensor
    values: torch.Tensor
    output: torch.Tensor

    def reconstruction_error(self) -> float:
        """Max ``|weights @ values - output|``: whether these are the weights the kernel used."""
        rebuilt = torch.einsum("hqk,khd->qhd", self.weights.double(), self.values.double())
        return float((rebuilt - self.output.double()).abs().max()) if rebuilt.numel() else 0.0


@dataclass
class AttentionRecording:
    """What :func:`record_attention` yields: ``records[layer]`` in call order, then sample order.

    ``samples`` (batch indices, or None for every sample) may be changed between forwards.
    """

    layers: List[int]
    samples: Optional[List[int]]
    records: Dict[int, List[AttentionRecord]] = field(default_factory=dict)


def sample_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: AttentionLayout,
    target: bool,
    alpha: float,
    sample: int,
    segment: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference weights of one sample's T-token queries.

    Args:
        q: ``[total_q, H, D]`` the layer's queries (all tokens for a full layer, else T tokens).
        k: ``[N, G, D]`` its keys (all tokens).
        layout: the batch's layout; ``target`` says which of its query sets ``q`` is.
        alpha: the layer's score scale.
        sample: index of the sample in the batch.
        segment: the layer's ``model.attention_normalisation`` is ``segment``: the history keys'
            weights are over the visible history count, the others' over their own count.

    Returns:
        ``(q_index, query_rows, key_rows, weights [H, L_T, L_k], visible [L_T, L_k])``:
        ``q_index`` the rows of ``q`` that are the sample's T tokens, ``query_rows`` their token
        rows, ``key_rows`` the sample's token rows.
    """
    keys = layout.keys
    t_lo, t_hi = (int(x) for x in layout.target.offsets[sample : sample + 2])
    k_lo, k_hi = (int(x) for x in keys.offsets[sample : sample + 2])
    target_rows = layout.target_rows[t_lo:t_hi]
    # a full layer's query i is token row i; a target layer's is the i-th T token
    q_index = torch.arange(t_lo, t_hi, device=q.device) if target else target_rows
    queries = layout.queries(target)
    key_rows = torch.arange(k_lo, k_hi, device=q.device)
    kind, key_ts = keys.kind[key_rows].to(torch.int64), keys.ts[key_rows]
    q_ts, self_rows = queries.ts[q_index], queries.self_rows[q_index]
    # the three rules of the dynamic mask, as the reference states them
    visible = (kind == TokenKind.HISTORY)[None, :] | (
        (kind == TokenKind.REALTIME)[None, :] & (key_ts[None, :] < q_ts[:, None])
    )
    visible = visible | (key_rows[None, :] == self_rows[:, None])
    heads_per_group = q.shape[1] // k.shape[1]
    k_heads = k[key_rows].repeat_interleave(heads_per_group, dim=1)  # [L_k, H, D]
    scores = torch.einsum("qhd,khd->hqk", q[q_index], k_heads)
    count = visible_counts(visible, (kind == TokenKind.HISTORY)[None, :], segment).to(scores.dtype)
    weights = F.silu(alpha * scores) * visible.to(scores.dtype)[None] / count[None]
    return q_index, target_rows, key_rows, weights, visible


def hta_layers(model: nn.Module) -> List[_HSTULayer]:
    """``model.dense.hta.layers`` of an MTFM-family model; a ``ValueError`` for any other."""
    hta = getattr(getattr(model, "dense", None), "hta", None)
    layers = getattr(hta, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(isinstance(m, _HSTULayer) for m in layers):
        raise ValueError(
            f"{type(model).__name__}: attention recording needs an MTFM-family model "
            "(model.name mtfm or mtgr) with HSTU layers at model.dense.hta.layers"
        )
    return [m for m in layers if isinstance(m, _HSTULayer)]


def resolve_layers(num_layers: int, layers: Sequence[int]) -> List[int]:
    """``layers`` as non-negative indices (``-1`` = the last), in the order given, duplicates
    removed; a ``ValueError`` naming any index outside ``[-num_layers, num_layers)``."""
    out: List[int] = []
    for i in layers:
        if not -num_layers <= i < num_layers:
            raise ValueError(f"layers: index {i} out of range for a stack of {num_layers} HTA layers")
        if i % num_layers not in out:
            out.append(i % num_layers)
    if not out:
        raise ValueError("layers: choose at least one HTA layer")
    return out


def _make_recorder(index: int, recording: AttentionRecording) -> AttentionRecorder:
    """The ``_recorder`` of layer ``index``: appends one record per recorded sample."""
    calls = [0]

    def recorder(
        layer: _HSTULayer,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        layout: AttentionLayout,
        target: bool,
    ) -> None:
        with torch.no_grad():
            _record(index, calls[0], recording, layer, q, k, v, out, layout, target)
        calls[0] += 1

    return recorder


def _record(
    index: int,
    call: int,
    recording: AttentionRecording,
    layer: _HSTULayer,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    layout: AttentionLayout,
    target: bool,
) -> None:
    """Appends to ``recording.records[index]`` the record of each chosen sample of one call."""
    samples = range(layout.batch_size) if recording.samples is None else recording.samples
    found = recording.records.setdefault(index, [])
    heads_per_group = q.shape[1] // k.shape[1]
    for b in samples:
        if not 0 <= b < layout.batch_size:
            raise ValueError(f"samples: index {b} out of range for a batch of {layout.batch_size}")
        q_index, query_rows, key_rows, weights, visible = sample_attention(
            q, k, layout, target, layer.alpha, b, layer.segment_norm
        )
        found.append(
            AttentionRecord(
                layer=index,
                kind="target" if target else "full",
                call=call,
                sample=b,
                query_rows=query_rows,
                key_rows=key_rows,
                weights=weights.float(),
                visible=visible,
                values=v[key_rows].repeat_interleave(heads_per_group, dim=1),
                output=out[q_index],
            )
        )


@contextlib.contextmanager
def record_attention(
    model: nn.Module, layers: Sequence[int], samples: Optional[Sequence[int]] = None
) -> Iterator[AttentionRecording]:
    """Records the T-token attention weights of ``layers`` while the block runs.

    Args:
        model: an MTFM-family model (``model.dense.hta.layers``).
        layers: indices into the HTA stack; negative ones count from the end.
        samples: batch indices of the samples to record (None: all; keep it small).

    Raises:
        ValueError: not an MTFM-family model, a layer index out of range.
        RuntimeError: a chosen layer is already being recorded (nested recording).

    The recorders are removed on exit, also when the block raises.
    """
    stack = hta_layers(model)
    chosen = resolve_layers(len(stack), layers)
    for i in chosen:
        if stack[i]._recorder is not None:
            raise RuntimeError(f"HTA layer {i} is already being recorded (nested record_attention)")
    recording = AttentionRecording(chosen, None if samples is None else list(samples))
    try:
        for i in chosen:
            stack[i]._recorder = _make_recorder(i, recording)
        yield recording
    finally:
        for i in chosen:
            stack[i]._recorder = None
