"""OneTrans (Zhang et al., "OneTrans: Unified Feature Interaction and Sequence Modeling with One
Transformer in Industrial Recommender", arXiv 2510.26104, 2025), a generative ranker of the
paper's Table 2: one causal transformer over a single sequence that holds both the user's
behaviour sequences (S-tokens) and the non-sequential features (NS-tokens).

How it reads our tokens (the same ``X(0)`` MTFM builds, MTFM eq. 3-5)::

    X(0) = HeterogeneousTokenizer(embeddings) = (H; R; T) per sample
    S-tokens  = the H and R tokens: one per action, one tokenizer MLP per sequence, merged by ts
                (the paper's timestamp-aware ordering; no [SEP] tokens, no position embedding)
    NS-tokens = the T tokens: one per exposure (candidate), its user / item / cross / dense
                features through its scenario's MLP

OneTrans block (paper sec. 3.3), pre-norm with RMSNorm, for token i of weight set ``g(i)``::

    Z    = X + MixedMHA(RMSNorm(X))        q_i, k_i, v_i = W^{Q,K,V}_{g(i)} x_i
                                           a_i = W^O_{g(i)} sum_j softmax_j(q_i.k_j / sqrt(d_h) | M_ij) v_j
    X'   = Z + MixedFFN(RMSNorm(Z))        MixedFFN(z_i) = W^2_{g(i)} gelu(W^1_{g(i)} z_i)   (4 d wide)

Mixed parameterisation: every S-token shares one set of QKV, output and FFN weights
(``g(i) = 0``). The paper gives each of its L_NS NS-tokens its own set; ours are one token per
candidate, a variable number per sample, so the NS weights are one set per *scenario*
(``g(i) = 1 + scenario of i``): all candidates of a scenario are the same kind of token. The
RMSNorm gains are shared by all tokens.

Mask ``M``: the paper's is causal (S-tokens, then the NS-tokens of one request). Ours is the
dynamic mask of :mod:`mtfm_rec.model.mask` (H visible to all; an R token only to strictly later
tokens; a T token only to itself), causal in time, so no score depends on a later action, and
each candidate is scored independently of the others (the paper's NS-tokens see each other).
Every token also sees itself: the diagonal of the paper's causal mask, and it keeps every softmax
row non-empty (the dynamic mask hides an R token from itself, so the first action of a sample
without H would have nothing to attend to).

Pyramid stack (paper sec. 3.4): at layer l only the most recent ``n_l`` S-tokens issue queries
and are kept for the next layer; the keys of layer l are the tokens kept by layer l-1 (all of
them for l = 1); NS-tokens always issue queries. ``n_l`` shrinks geometrically,
``n_l = ceil(L * f ** ((l - 1) / (layers - 1)))`` from ``L`` at layer 1 to ``ceil(f L)`` at the
last (``f = model.baseline.pyramid_final_fraction``, :func:`pyramid_lengths`). So a T token's keys
first shrink at layer 3, and ``n_L`` only limits the last layer's S queries, which no head reads.
Here ``L`` counts the sample's **H tokens only**, and the R tokens are always kept: they are events
inside the sample's window, interleaved in time with its exposures, and a tail counted over them
moves with every later action (one more click after an exposure would push an old token out of
that exposure's keys: its score would depend on the future). H is the common past of every token
of the sample (actions before the window, mask rule 1), so a schedule counted on it reads nothing
from the window. The kept tail is then the paper's: the most recent S-tokens (the R tokens and the
latest ``n_l`` H tokens), with the count taken over H.

Left out: the paper's cross-request KV caching (sec. 3.5, a serving optimisation) and its several
NS-tokens per candidate (auto-split tokenizer); the attention is plain multi-head
(``model.num_kv_heads`` is not read).

Implementation: the per-token work (norms, the mixed linear maps) runs on the jagged tokens sorted
by weight set, one matmul per set; the attention runs padded per sample with
``scaled_dot_product_attention`` and a boolean mask. On an accelerator that is one call
(``[B, heads, M, M]``, ``M`` = the layout's longest sample); shapes come from tensor shapes and the
Batch's host ints, so there is no host synchronisation. On the CPU, where reading the per-sample
lengths costs nothing, the samples are split into up to ``CPU_ATTENTION_CHUNKS`` groups of
similar length (:func:`length_chunks`), each padded to its own longest sample: the same function,
several times less padding (3.3x faster forward + backward of a block on ML-1M-like lengths:
``python -m mtfm_rec.bench --only onetrans_attention``). A dropped S-token is masked out as a
key but its row is still computed, so the pyramid's compute saving is not realised here (it only
changes what the model computes).

Padded layout of one chunk (samples sorted longest first, ``.`` = padding)::

    chunk 0, width 5:  [h h r t t]  [h h h t .]
    chunk 1, width 2:  [h t]        [t .]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedTensor

from mtfm_rec.data.batch import Batch
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.model.config import ModelConfig
from mtfm_rec.model.heads import MMoEHeads, MultiTaskOutput
from mtfm_rec.model.mask import AttentionLayout, dense_mask, model_layout
from mtfm_rec.model.tokenizer import HeterogeneousTokenizer

# On the CPU the attention runs in up to this many calls over samples of similar length: a padded
# call over a whole ML-1M batch is 80-90 % padding (lengths 1-336, mean ~100); reading the lengths
# on the host costs nothing there. On an accelerator it would be a sync: one padded call instead.
CPU_ATTENTION_CHUNKS = 8


def pyramid_lengths(num_history: torch.Tensor, layers: int, fraction: float) -> torch.Tensor:
    """``[layers, B]`` int64: the H tokens of each sample that issue queries at each layer.

    ``n_l = ceil(L_H * fraction ** ((l - 1) / (layers - 1)))`` for l = 1..layers (``L_H`` at
    layer 1, ``ceil(fraction * L_H)`` at the last; ``L_H`` alone for one layer).
    """
    ratios = [fraction ** (i / (layers - 1)) if layers > 1 else 1.0 for i in range(layers)]
    scale = torch.tensor(ratios, dtype=torch.float64, device=num_history.device)
    # float64 and a tiny slack: 16 * 0.25 ** 1.0 must give 4, not 5
    return torch.ceil(num_history.to(torch.float64)[None, :] * scale[:, None] - 1e-9).to(torch.int64)


def layer_masks(
    layout: AttentionLayout, num_history: torch.Tensor, layers: int, fraction: float
) -> List[torch.Tensor]:
    """Per layer the ``[B, 1, M, M]`` boolean attention mask (True = attend), padded per sample.

    The dynamic mask of ``layout`` (:func:`mtfm_rec.model.mask.dense_mask`), restricted to the
    keys kept by the layer before (H tokens before the most recent ``n_{l-1}`` are dropped), plus
    the diagonal (every token, padding included, sees itself).
    """
    base = dense_mask(layout, target_queries=False)  # [B, M, M]
    m = base.shape[-1]
    j = torch.arange(m, device=base.device)
    eye = j[:, None] == j[None, :]
    kept = pyramid_lengths(num_history, layers, fraction)
    masks = []
    for layer in range(layers):
        if layer == 0:
            visible = base
        else:  # local rows 0..L_H-1 are H, in ts order: the dropped ones are the oldest
            keep = j[None, :] >= (num_history - kept[layer - 1])[:, None]  # [B, M]
            visible = base & keep[:, None, :]
        masks.append((visible | eye).unsqueeze(1))
    return masks


@dataclass(frozen=True)
class AttentionChunk:
    """Samples of similar length whose attention runs as one padded call."""

    samples: torch.Tensor  # [b] sample indices, longest first
    width: int  # the longest of them: the call's padded length
    start: int  # the chunk's first row in the chunked buffer ([b * width] rows from there)


@dataclass(frozen=True)
class TokenSlots:
    """The tokens of a batch in weight-set order (S, then each scenario's T in KJT order), and
    where each one sits in the padded per-sample layout of the attention."""

    group_sizes: List[int]  # tokens per weight set (host ints, from tensor shapes)
    pad_index: torch.Tensor  # [N] flat index of each sorted token into [B * max_len]
    batch_size: int
    max_len: int
    # with chunks: the attention pads each chunk to its own width; chunk_index [N] is each sorted
    # token's row in the chunks' buffer (None: one call padded to max_len)
    chunks: Optional[List[AttentionChunk]] = None
    chunk_index: Optional[torch.Tensor] = None


def length_chunks(lengths: Sequence[int], max_chunks: int) -> List[List[int]]:
    """Splits samples into at most ``max_chunks`` groups, each padded to its longest sample,
    minimising the padded attention's cost ``sum_c b_c * width_c ** 2``.

    Sorted longest first, an optimal split is contiguous; a dynamic programme over the split
    points finds it (``O(max_chunks * B^2)``, vectorised). Returns the sample indices of each
    group, longest first.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    b = len(order)
    if b == 0:
        return []
    square = np.array([float(lengths[i]) ** 2 for i in order])
    i = np.arange(b)[:, None]
    j = np.arange(1, b + 1)[None, :]
    # cost[i, j-1] of one chunk holding sorted samples i..j-1 (its width is sample i's length)
    cost = np.where(i < j, (j - i) * square[:, None], np.inf)
    best, back = cost[0].copy(), [np.zeros(b, np.int64)]  # best[j-1]: samples 0..j-1 in k chunks
    for _ in range(1, min(max_chunks, b)):
        total = np.concatenate([[0.0], best[:-1]])[:, None] + cost  # first chunk ends before i
        total[0] = cost[0]  # i = 0: one chunk, nothing before it
        back.append(np.argmin(total, axis=0))
        best = total[back[-1], np.arange(b)]
    bounds, end = [], b
    for k in range(len(back) - 1, -1, -1):
        if end == 0:
            break
        start = int(back[k][end - 1])
        bounds.append((start, end))
        end = start
    return [order[s:e] for s, e in reversed(bounds)]


def chunk_slots(
    lengths: Sequence[int], pad_index: torch.Tensor, max_len: int, max_chunks: int
) -> Tuple[List[AttentionChunk], torch.Tensor]:
    """The chunks of :func:`length_chunks` over samples of ``lengths`` tokens, and the row in
    their buffer of each token whose row in the ``[B * max_len]`` padded layout is ``pad_index``."""
    device = pad_index.device
    chunks, base, start = [], [0] * len(lengths), 0
    for samples in length_chunks(lengths, max_chunks):
        width = max(lengths[samples[0]], 1)
        for rank, sample in enumerate(samples):
            base[sample] = start + rank * width
        chunks.append(AttentionChunk(torch.tensor(samples, device=device), width, start))
        start += len(samples) * width
    sample_base = torch.tensor(base, dtype=torch.int64, device=device)
    return chunks, sample_base[pad_index // max_len] + pad_index % max_len


def token_slots(
    layout: AttentionLayout,
    rows: Dict[str, torch.Tensor],
    sequence_rows: Sequence[torch.Tensor],
    scenario_names: Sequence[str],
    max_chunks: int = 1,
) -> Tuple[torch.Tensor, TokenSlots]:
    """``(perm, slots)``: ``x[perm]`` sorts the layout's rows by weight set.

    Args:
        layout: the batch's attention layout.
        rows: per scenario, the layout row of each exposure (KJT order).
        sequence_rows: the layout rows of the S tokens (every sequence's actions), or none.
        scenario_names: the scenarios in schema order (weight sets 1, 2, ...).
        max_chunks: above 1, the attention runs in up to that many calls over samples of similar
            length (:func:`length_chunks`) instead of one padded to the longest sample.
    Raises:
        ValueError: the groups do not cover the layout's tokens exactly.
    """
    t_rows = [rows[name] for name in scenario_names]
    s_rows = torch.cat(list(sequence_rows)) if sequence_rows else t_rows[0].new_zeros(0)
    perm = torch.cat([s_rows, *t_rows])
    sizes = [int(s_rows.shape[0])] + [int(r.shape[0]) for r in t_rows]
    if sum(sizes) != layout.num_tokens:
        raise ValueError(f"OneTrans: {sum(sizes)} S and T tokens for a layout of {layout.num_tokens}")
    pad_index, m = layout.keys.pad_index[perm], layout.keys.max_len
    chunks, chunk_index = None, None
    if max_chunks > 1:  # the lengths are read on the host: only asked for on the CPU (no sync)
        offsets = layout.keys.offsets
        chunks, chunk_index = chunk_slots((offsets[1:] - offsets[:-1]).tolist(), pad_index, m, max_chunks)
    slots = TokenSlots(sizes, pad_index, layout.batch_size, m, chunks, chunk_index)
    return perm, slots


class MixedLinear(nn.Module):
    """One ``nn.Linear`` per weight set, applied to the rows of its set (mixed parameterisation)."""

    def __init__(self, num_sets: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(in_dim, out_dim) for _ in range(num_sets))

    def forward(self, x: torch.Tensor, group_sizes: List[int]) -> torch.Tensor:
        """``x``: ``[N, in_dim]`` sorted by weight set, ``group_sizes`` rows per set."""
        parts = x.split(group_sizes)
        return torch.cat([linear(part) for linear, part in zip(self.linears, parts)])


class OneTransBlock(nn.Module):
    """One pre-norm block: mixed multi-head softmax attention, then a mixed FFN (paper sec. 3.3)."""

    def __init__(self, config: ModelConfig, num_sets: int) -> None:
        super().__init__()
        d, self.heads, self.head_dim = config.d_model, config.num_heads, config.resolved_head_dim
        width = self.heads * self.head_dim
        self.attn_norm = nn.RMSNorm(d, eps=config.norm_eps)
        self.qkv = MixedLinear(num_sets, d, 3 * width)
        self.out = MixedLinear(num_sets, width, d)
        self.ffn_norm = nn.RMSNorm(d, eps=config.norm_eps)
        self.ffn_in = MixedLinear(num_sets, d, 4 * d)
        self.ffn_out = MixedLinear(num_sets, 4 * d, d)
        self.dropout = nn.Dropout(config.dropout)

    def attend(self, qkv: torch.Tensor, slots: TokenSlots, mask: torch.Tensor) -> torch.Tensor:
        """Padded per-sample softmax attention of the sorted tokens' ``[N, 3 * width]`` q, k, v."""
        if slots.chunks is None:
            b, m = slots.batch_size, slots.max_len
            padded = qkv.new_zeros(b * m, qkv.shape[1]).index_copy(0, slots.pad_index, qkv)
            return self._padded_attention(padded, b, m, mask).reshape(b * m, -1)[slots.pad_index]
        assert slots.chunk_index is not None
        last = slots.chunks[-1]
        rows = last.start + int(last.samples.shape[0]) * last.width
        padded = qkv.new_zeros(rows, qkv.shape[1]).index_copy(0, slots.chunk_index, qkv)
        outs = []
        for chunk in slots.chunks:
            b, w = int(chunk.samples.shape[0]), chunk.width
            part = padded[chunk.start : chunk.start + b * w]
            chunk_mask = mask[:, :, :w, :w].index_select(0, chunk.samples)
            outs.append(self._padded_attention(part, b, w, chunk_mask).reshape(b * w, -1))
        return torch.cat(outs)[slots.chunk_index]

    def _padded_attention(self, padded: torch.Tensor, b: int, m: int, mask: torch.Tensor) -> torch.Tensor:
        """``[B * M, 3 * width]`` padded q, k, v -> ``[B, M, width]``; ``mask``: ``[B, 1, M, M]``."""
        q, k, v = padded.view(b, m, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, heads, M, head_dim]
        return o.transpose(1, 2).reshape(b, m, -1)

    def forward(self, x: torch.Tensor, slots: TokenSlots, mask: torch.Tensor) -> torch.Tensor:
        """``x``: ``[N, d]`` tokens in weight-set order; ``mask``: ``[B, 1, M, M]`` (True = attend)."""
        sizes = slots.group_sizes
        a = self.attend(self.qkv(self.attn_norm(x), sizes), slots, mask)
        z = x + self.dropout(self.out(a, sizes))
        h = F.gelu(self.ffn_in(self.ffn_norm(z), sizes))
        return z + self.dropout(self.ffn_out(h, sizes))


class OneTransDense(nn.Module):
    """Tokens -> OneTrans blocks (mixed parameters, dynamic mask, pyramid) -> T tokens -> MMoE
    heads (shared experts, a gate and tower per scenario x task) -> loss. Trained per scenario.

    Args:
        schema: the dataset schema.
        config: ``model.*``: ``d_model``, ``num_heads``, ``head_dim``, ``dropout``, ``norm_eps``,
            ``baseline.onetrans_layers``, ``baseline.pyramid_final_fraction``, the heads' sizes.
    """

    def __init__(self, schema: DatasetSchema, config: ModelConfig) -> None:
        super().__init__()
        self.use_sequences = config.use_sequences
        self.sequence_names = [q.name for q in schema.ordered_sequences] if config.use_sequences else []
        self.scenario_names = [s.name for s in schema.scenarios]
        self.layers = config.baseline.onetrans_layers
        self.fraction = config.baseline.pyramid_final_fraction
        self.tokenizer = HeterogeneousTokenizer(schema, config)
        num_sets = 1 + len(self.scenario_names)  # S, then one per scenario
        self.blocks = nn.ModuleList(OneTransBlock(config, num_sets) for _ in range(self.layers))
        self.heads = MMoEHeads(schema, config)
        self.output = MultiTaskOutput(schema, config)

    def prepare(
        self,
        embeddings: Dict[str, JaggedTensor],
        batch: Batch,
        bag_embeddings: Optional[KeyedTensor] = None,
    ) -> Tuple[torch.Tensor, TokenSlots, List[torch.Tensor]]:
        """``(x, slots, masks)``: ``X(0)`` in weight-set order, its slots, and each layer's mask."""
        layout, rows = model_layout(batch, self.use_sequences)
        x = self.tokenizer(embeddings, batch, layout.num_tokens, rows, bag_embeddings)
        sequence_rows = [batch.sequence_positions[name] for name in self.sequence_names]
        chunks = CPU_ATTENTION_CHUNKS if x.device.type == "cpu" else 1
        perm, slots = token_slots(layout, rows, sequence_rows, self.scenario_names, chunks)
        num_history = batch.num_history if self.use_sequences else torch.zeros_like(batch.num_history)
        return x[perm], slots, layer_masks(layout, num_history, self.layers, self.fraction)

    def forward(
        self,
        embeddings: Dict[str, JaggedTensor],
        batch: Batch,
        bag_embeddings: Optional[KeyedTensor] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """As :meth:`mtfm_rec.model.mtfm.MTFMDense.forward`."""
        x, slots, masks = self.prepare(embeddings, batch, bag_embeddings)
        for block, mask in zip(self.blocks, masks):
            x = block(x, slots, mask)
        targets = x.split(slots.group_sizes)[1:]  # each scenario's T tokens, KJT order
        raw = {
            name: self.heads.scenario_logits(i, t)
            for i, (name, t) in enumerate(zip(self.scenario_names, targets))
        }
        return self.output(raw, batch)


__all__ = [
    "AttentionChunk",
    "CPU_ATTENTION_CHUNKS",
    "MixedLinear",
    "OneTransBlock",
    "OneTransDense",
    "TokenSlots",
    "chunk_slots",
    "layer_masks",
    "length_chunks",
    "pyramid_lengths",
    "token_slots",
]
