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
``scaled_dot_product_attention`` and a boolean mask. Two paths compute the same T outputs:

* accelerators (:meth:`OneTransBlock.forward`): every token's row through every layer, one call
  padded to the layout's longest sample (``[B, heads, M, M]``), a dropped S-token masked out as a
  key. Shapes come from tensor shapes and the Batch's host ints: no host synchronisation.
* the CPU (:meth:`OneTransBlock.forward_pruned`, planned by :func:`pruned_layers`), where reading
  the per-sample lengths costs nothing: the pyramid's compute saving is realised. Layer ``l``
  computes q, k, v for the tokens layer ``l - 1`` kept and the output and FFN only for the rows
  that issue its queries, the tokens it keeps; at the last layer those are the T tokens alone
  (no head reads an S output). In the ``(H; R; T)`` layout both sets are a suffix of each sample,
  so the attention runs on per-sample suffixes, in up to ``CPU_ATTENTION_CHUNKS`` calls over
  samples of similar key length (:func:`length_chunks`), each padded to its own longest. On batches
  like ML-1M genre's (H 66, R 20, T 6 tokens per sample) the four-layer stack's forward +
  backward is 1.8-2.1x faster than the masked path's one padded call
  (``python -m mtfm_rec.bench --only onetrans_cpu_path``).

Pruned layout of one layer's chunk (samples sorted by key length, ``.`` = padding; a sample's
keys start at its first kept H token, its queries at its first query row)::

    keys,    chunk 0, width 5:  [h h r t t]  [h h r t .]      chunk 1, width 2:  [h t]  [t .]
    queries, chunk 0, width 4:  [h r t t]    [r t . .]        chunk 1, width 1:  [t]    [t]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, cast

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
# on the host costs nothing there. On an accelerator it would be a sync: one padded call instead,
# over every row (the masked path).
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
class TokenSlots:
    """The tokens of a batch in weight-set order (S, then each scenario's T in KJT order), and
    where each one sits in the padded per-sample layout of the attention."""

    group_sizes: List[int]  # tokens per weight set (host ints, from tensor shapes)
    pad_index: torch.Tensor  # [N] flat index of each sorted token into [B * max_len]
    batch_size: int
    max_len: int


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


def token_slots(
    layout: AttentionLayout,
    rows: Dict[str, torch.Tensor],
    sequence_rows: Sequence[torch.Tensor],
    scenario_names: Sequence[str],
) -> Tuple[torch.Tensor, TokenSlots]:
    """``(perm, slots)``: ``x[perm]`` sorts the layout's rows by weight set.

    Args:
        layout: the batch's attention layout.
        rows: per scenario, the layout row of each exposure (KJT order).
        sequence_rows: the layout rows of the S tokens (every sequence's actions), or none.
        scenario_names: the scenarios in schema order (weight sets 1, 2, ...).
    Raises:
        ValueError: the groups do not cover the layout's tokens exactly.
    """
    t_rows = [rows[name] for name in scenario_names]
    s_rows = torch.cat(list(sequence_rows)) if sequence_rows else t_rows[0].new_zeros(0)
    perm = torch.cat([s_rows, *t_rows])
    sizes = [int(s_rows.shape[0])] + [int(r.shape[0]) for r in t_rows]
    if sum(sizes) != layout.num_tokens:
        raise ValueError(f"OneTrans: {sum(sizes)} S and T tokens for a layout of {layout.num_tokens}")
    slots = TokenSlots(sizes, layout.keys.pad_index[perm], layout.batch_size, layout.keys.max_len)
    return perm, slots


# ----------------------------------------------------------------------------- the pruned CPU path
@dataclass(frozen=True)
class PrunedChunk:
    """Samples of similar key length whose attention in one layer runs as one padded call."""

    samples: torch.Tensor  # [b] sample indices
    query_width: int  # the call's padded query length: the most query rows of its samples
    key_width: int  # the call's padded key length
    query_start: int  # the chunk's first row in the layer's query buffer ([b * query_width] rows)
    key_start: int  # the chunk's first row in the layer's key buffer ([b * key_width] rows)
    mask: torch.Tensor  # [b, 1, query_width, key_width] bool, True = attend


@dataclass(frozen=True)
class PrunedLayer:
    """What one layer of the pruned path reads: its input rows are the tokens the layer before
    kept (all of them at layer 1), in weight-set order; its query rows, a subset in the same order,
    are the tokens it keeps, and the only rows it outputs."""

    input_sizes: List[int]  # input rows per weight set
    query_select: torch.Tensor  # [Nq] the query rows, as indices into the input rows
    query_sizes: List[int]  # query rows per weight set
    key_index: torch.Tensor  # [N_in] each input row's row in the key buffer
    query_index: torch.Tensor  # [Nq] each query row's row in the query buffer
    key_rows: int
    query_rows: int
    chunks: List[PrunedChunk]


@dataclass(frozen=True)
class TokenRows:
    """Per token in weight-set order: where it sits in its sample and what its mask row is."""

    sample: torch.Tensor  # [N] its sample
    local: torch.Tensor  # [N] its index in the sample's (H; R; T) layout
    group: torch.Tensor  # [N] its weight set
    prefix: torch.Tensor  # [N] local keys [0, prefix) are visible (mtfm_rec.model.mask)
    self_local: torch.Tensor  # [N] its own local index if T, else -1
    lengths: torch.Tensor  # [B] tokens per sample
    targets: torch.Tensor  # [B] T tokens per sample (the last ones of its layout)
    num_groups: int  # weight sets

    @classmethod
    def create(cls, layout: AttentionLayout, perm: torch.Tensor, group_sizes: List[int]) -> TokenRows:
        prefix, self_local = layout.full.prefix_encoding("onetrans")
        pad_index, m = layout.keys.pad_index[perm], layout.keys.max_len
        sample = pad_index // m
        group = torch.repeat_interleave(torch.arange(len(group_sizes)), torch.tensor(group_sizes))
        offsets = layout.keys.offsets
        targets = torch.bincount(sample[group > 0], minlength=layout.batch_size)
        lengths, local = offsets[1:] - offsets[:-1], pad_index % m
        return cls(sample, local, group, prefix[perm], self_local[perm], lengths, targets, len(group_sizes))


def pruned_layers(
    layout: AttentionLayout,
    perm: torch.Tensor,
    group_sizes: List[int],
    num_history: torch.Tensor,
    layers: int,
    fraction: float,
    max_chunks: int = CPU_ATTENTION_CHUNKS,
) -> List[PrunedLayer]:
    """The plan of the pruned path (module docstring): for each layer, its input rows, its query
    rows and its chunked attention. Reads the batch's lengths on the host (CPU only).

    Layer ``l``'s keys are each sample's tokens from its first H token kept by layer ``l - 1``
    (:func:`pyramid_lengths`), its queries those from its first H token kept by layer ``l``; the
    last layer's queries are the T tokens. The masks are :func:`layer_masks`' rows and columns for
    those tokens (the dynamic mask, each token seeing itself); a padding query row sees key 0.
    """
    tokens = TokenRows.create(layout, perm, group_sizes)
    kept = pyramid_lengths(num_history, layers, fraction)
    starts = [torch.zeros_like(num_history)] + [num_history - kept[layer] for layer in range(layers - 1)]
    starts.append(tokens.lengths - tokens.targets)  # the last layer's queries: the T tokens
    rows, plan = torch.arange(perm.shape[0]), []
    for layer in range(layers):
        query_select = torch.nonzero(tokens.local[rows] >= starts[layer + 1][tokens.sample[rows]]).flatten()
        plan.append(_pruned_layer(tokens, rows, query_select, starts[layer], starts[layer + 1], max_chunks))
        rows = rows[query_select]
    return plan


def _pruned_layer(
    tokens: TokenRows,
    rows: torch.Tensor,
    query_select: torch.Tensor,
    key_start: torch.Tensor,
    query_start: torch.Tensor,
    max_chunks: int,
) -> PrunedLayer:
    """One layer of :func:`pruned_layers`: ``rows`` its input tokens (indices into ``tokens``),
    ``query_select`` its queries among them, ``key_start`` / ``query_start`` [B] the local index
    of each sample's first key / query."""
    key_lengths = (tokens.lengths - key_start).clamp(min=0)
    query_lengths = (tokens.lengths - query_start).clamp(min=0)
    groups = length_chunks(key_lengths.tolist(), max_chunks)
    key_base, query_base = torch.zeros_like(key_start), torch.zeros_like(query_start)
    widths, key_rows, query_rows = [], 0, 0
    for samples in groups:
        index = torch.tensor(samples, dtype=torch.int64)
        wk, wq = max(int(key_lengths[index].max()), 1), max(int(query_lengths[index].max()), 1)
        key_base[index] = key_rows + wk * torch.arange(len(samples))
        query_base[index] = query_rows + wq * torch.arange(len(samples))
        widths.append((index, wq, wk, query_rows, key_rows))
        key_rows, query_rows = key_rows + len(samples) * wk, query_rows + len(samples) * wq
    sample, local = tokens.sample[rows], tokens.local[rows]
    key_index = key_base[sample] + local - key_start[sample]
    queries = rows[query_select]
    q_sample = tokens.sample[queries]
    query_index = query_base[q_sample] + tokens.local[queries] - query_start[q_sample]
    # each query's mask row over the keys from its sample's first key (mtfm_rec.model.mask's
    # prefix encoding, plus the diagonal); a padding row sees key 0 so no softmax row is empty
    widest = max((w[2] for w in widths), default=1)
    j = torch.arange(widest)[None, :] + key_start[q_sample][:, None]
    visible = (j < tokens.prefix[queries][:, None]) | (j == tokens.self_local[queries][:, None])
    visible |= j == tokens.local[queries][:, None]
    buffer = torch.zeros(max(query_rows, 1), widest, dtype=torch.bool)
    buffer[:, 0] = True
    buffer[query_index] = visible
    chunks = [
        PrunedChunk(index, wq, wk, qs, ks, buffer[qs : qs + len(index) * wq, :wk].reshape(-1, 1, wq, wk))
        for index, wq, wk, qs, ks in widths
    ]
    return PrunedLayer(
        input_sizes=torch.bincount(tokens.group[rows], minlength=tokens.num_groups).tolist(),
        query_select=query_select,
        query_sizes=torch.bincount(tokens.group[queries], minlength=tokens.num_groups).tolist(),
        key_index=key_index,
        query_index=query_index,
        key_rows=key_rows,
        query_rows=query_rows,
        chunks=chunks,
    )


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
        self.width = width = self.heads * self.head_dim
        self.attn_norm = nn.RMSNorm(d, eps=config.norm_eps)
        self.qkv = MixedLinear(num_sets, d, 3 * width)
        self.out = MixedLinear(num_sets, width, d)
        self.ffn_norm = nn.RMSNorm(d, eps=config.norm_eps)
        self.ffn_in = MixedLinear(num_sets, d, 4 * d)
        self.ffn_out = MixedLinear(num_sets, 4 * d, d)
        self.dropout = nn.Dropout(config.dropout)

    def attend(self, qkv: torch.Tensor, slots: TokenSlots, mask: torch.Tensor) -> torch.Tensor:
        """Padded per-sample softmax attention of the sorted tokens' ``[N, 3 * width]`` q, k, v."""
        b, m = slots.batch_size, slots.max_len
        padded = qkv.new_zeros(b * m, qkv.shape[1]).index_copy(0, slots.pad_index, qkv)
        q, kv = padded.view(b, m, 3 * self.width).split([self.width, 2 * self.width], dim=-1)
        return self._padded_attention(q, kv, mask).reshape(b * m, -1)[slots.pad_index]

    def attend_pruned(self, qkv: torch.Tensor, layer: PrunedLayer) -> torch.Tensor:
        """The pruned path's attention: ``[N_in, 3 * width]`` q, k, v of the input rows ->
        ``[Nq, width]`` for the query rows, one padded call per chunk."""
        q = qkv[layer.query_select, : self.width]
        queries = q.new_zeros(layer.query_rows, self.width).index_copy(0, layer.query_index, q)
        kv = qkv[:, self.width :]
        keys = kv.new_zeros(layer.key_rows, 2 * self.width).index_copy(0, layer.key_index, kv)
        outs = []
        for chunk in layer.chunks:
            b, wq, wk = int(chunk.samples.shape[0]), chunk.query_width, chunk.key_width
            chunk_q = queries[chunk.query_start : chunk.query_start + b * wq].view(b, wq, self.width)
            chunk_kv = keys[chunk.key_start : chunk.key_start + b * wk].view(b, wk, 2 * self.width)
            outs.append(self._padded_attention(chunk_q, chunk_kv, chunk.mask).reshape(b * wq, -1))
        return torch.cat(outs)[layer.query_index]

    def _padded_attention(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``q`` ``[B, Mq, width]``, ``kv`` ``[B, Mk, 2 * width]``, ``mask`` ``[B, 1, Mq, Mk]`` ->
        ``[B, Mq, width]``."""
        b, mq, mk = q.shape[0], q.shape[1], kv.shape[1]
        q = q.reshape(b, mq, self.heads, self.head_dim).transpose(1, 2)
        k, v = kv.reshape(b, mk, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, heads, Mq, head_dim]
        return o.transpose(1, 2).reshape(b, mq, -1)

    def forward(self, x: torch.Tensor, slots: TokenSlots, mask: torch.Tensor) -> torch.Tensor:
        """The masked path. ``x``: ``[N, d]`` tokens in weight-set order; ``mask``: ``[B, 1, M, M]``
        (True = attend)."""
        sizes = slots.group_sizes
        a = self.attend(self.qkv(self.attn_norm(x), sizes), slots, mask)
        return self._mix(x, a, sizes)

    def forward_pruned(self, x: torch.Tensor, layer: PrunedLayer) -> torch.Tensor:
        """The pruned path. ``x``: ``[N_in, d]``, the layer's input rows -> ``[Nq, d]``, its query rows."""
        a = self.attend_pruned(self.qkv(self.attn_norm(x), layer.input_sizes), layer)
        return self._mix(x[layer.query_select], a, layer.query_sizes)

    def _mix(self, x: torch.Tensor, a: torch.Tensor, sizes: List[int]) -> torch.Tensor:
        """The rest of the block for rows ``x`` and their attention outputs ``a``."""
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

    def sorted_tokens(
        self,
        embeddings: Dict[str, JaggedTensor],
        batch: Batch,
        bag_embeddings: Optional[KeyedTensor] = None,
    ) -> Tuple[torch.Tensor, AttentionLayout, torch.Tensor, TokenSlots, torch.Tensor]:
        """``(x, layout, perm, slots, num_history)``: ``X(0)`` in weight-set order (``perm`` of the
        layout's rows), its slots, and the H count the pyramid reads per sample."""
        layout, rows = model_layout(batch, self.use_sequences)
        x = self.tokenizer(embeddings, batch, layout.num_tokens, rows, bag_embeddings)
        sequence_rows = [batch.sequence_positions[name] for name in self.sequence_names]
        perm, slots = token_slots(layout, rows, sequence_rows, self.scenario_names)
        num_history = batch.num_history if self.use_sequences else torch.zeros_like(batch.num_history)
        return x[perm], layout, perm, slots, num_history

    def prepare(
        self,
        embeddings: Dict[str, JaggedTensor],
        batch: Batch,
        bag_embeddings: Optional[KeyedTensor] = None,
    ) -> Tuple[torch.Tensor, TokenSlots, List[torch.Tensor]]:
        """The masked path's inputs ``(x, slots, masks)``: ``X(0)`` in weight-set order, its slots,
        and each layer's mask."""
        x, layout, _, slots, num_history = self.sorted_tokens(embeddings, batch, bag_embeddings)
        return x, slots, layer_masks(layout, num_history, self.layers, self.fraction)

    def prepare_pruned(
        self,
        embeddings: Dict[str, JaggedTensor],
        batch: Batch,
        bag_embeddings: Optional[KeyedTensor] = None,
    ) -> Tuple[torch.Tensor, List[PrunedLayer]]:
        """The pruned path's inputs ``(x, plan)`` (CPU only: the plan reads lengths on the host)."""
        x, layout, perm, slots, num_history = self.sorted_tokens(embeddings, batch, bag_embeddings)
        return x, pruned_layers(layout, perm, slots.group_sizes, num_history, self.layers, self.fraction)

    def run_masked(self, x: torch.Tensor, slots: TokenSlots, masks: List[torch.Tensor]) -> torch.Tensor:
        """Every block on the masked path: ``X(0)`` -> the last layer's outputs, every row."""
        for block, mask in zip(self.blocks, masks):
            x = block(x, slots, mask)
        return x

    def run_pruned(self, x: torch.Tensor, plan: List[PrunedLayer]) -> torch.Tensor:
        """Every block on the pruned path: ``X(0)`` -> the last layer's outputs, the T rows."""
        for block, layer in zip(self.blocks, plan):
            x = cast(OneTransBlock, block).forward_pruned(x, layer)
        return x

    def forward(
        self,
        embeddings: Dict[str, JaggedTensor],
        batch: Batch,
        bag_embeddings: Optional[KeyedTensor] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """As :meth:`mtfm_rec.model.mtfm.MTFMDense.forward`: the pruned path on the CPU, the masked
        one elsewhere (the same T outputs)."""
        if batch.token_offsets.device.type == "cpu":
            x, plan = self.prepare_pruned(embeddings, batch, bag_embeddings)
            x, sizes = self.run_pruned(x, plan), plan[-1].query_sizes  # the last layer: T rows alone
        else:
            x, slots, masks = self.prepare(embeddings, batch, bag_embeddings)
            x, sizes = self.run_masked(x, slots, masks), slots.group_sizes
        targets = x.split(sizes)[1:]  # each scenario's T tokens, KJT order
        raw = {
            name: self.heads.scenario_logits(i, t)
            for i, (name, t) in enumerate(zip(self.scenario_names, targets))
        }
        return self.output(raw, batch)


__all__ = [
    "CPU_ATTENTION_CHUNKS",
    "MixedLinear",
    "OneTransBlock",
    "OneTransDense",
    "PrunedChunk",
    "PrunedLayer",
    "TokenRows",
    "TokenSlots",
    "layer_masks",
    "length_chunks",
    "pruned_layers",
    "pyramid_lengths",
    "token_slots",
]
