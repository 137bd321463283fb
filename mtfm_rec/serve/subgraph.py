"""Scenario subgraphs: what one scenario's requests need of a trained MTFM, as a plain module.

:func:`extract_subgraph` copies out of the (unsharded) training model only

* the embedding tables the sequences and scenario ``s`` read (``nn.Embedding`` /
  ``nn.EmbeddingBag`` rows copied from the TorchRec collections),
* the sequence tokenizers, ``s``'s exposure tokenizer and the time encoding,
* the whole HTA stack,
* the MMoE experts with ``s``'s gates and towers,

and :class:`ScenarioModel` scores padded requests (``mtfm_rec.serve.request.ScenarioInputs``)
with M-Falcon (``mtfm_rec.serve.falcon``): :meth:`ScenarioModel.encode_context` once per
request, :meth:`ScenarioModel.score_candidates` per micro-batch of candidates. ``forward`` is
the two in one call, the function that ``torch.export`` traces.

Only the MTFM family (``model.name`` ``mtfm`` and ``mtgr``, an MTFM configuration) has a context
that candidates never change; the baselines are refused with a clear error.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Tuple, Union, cast

import torch
import torch.nn.functional as F
from torch import nn

from mtfm_rec.data.schema import DatasetSchema, mangled_table_name
from mtfm_rec.kernels.backends import AttentionBackend
from mtfm_rec.kernels.hstu_attention import hstu_attention, resolve
from mtfm_rec.kernels.jagged import KeySet, QuerySet, TokenKind
from mtfm_rec.model.attention import TargetAttentionLayer, _HSTULayer
from mtfm_rec.model.heads import funnel_log_probs
from mtfm_rec.model.mtfm import MTFMDense
from mtfm_rec.model.segment_norm import hstu_attention_by_segment
from mtfm_rec.model.sparse_dense import SparseDenseModel
from mtfm_rec.model.tokenizer import compress_dense
from mtfm_rec.serve.falcon import (
    ContextCache,
    ContextStore,
    candidate_layout,
    context_fingerprint,
    context_layout,
    sort_context,
)
from mtfm_rec.serve.request import ScenarioInputs


class ServingError(ValueError):
    """A model or request the serving path cannot take, with the reason."""


def _table_weights(model: SparseDenseModel) -> Dict[str, torch.Tensor]:
    """KJT key -> the weight of the table that serves it (single-id and multi-hot keys)."""
    out: Dict[str, torch.Tensor] = {}
    tables = model.schema.embedding_tables()
    ec = model.embedding_collection
    for name, (_, keys) in tables.items():
        for key in keys:
            out[key] = ec.embeddings[mangled_table_name(name)].weight
    if model.embedding_bag_collection is not None:
        ebc = model.embedding_bag_collection
        for name, (_, _, keys) in model.schema.embedding_bag_tables().items():
            for key in keys:
                out[key] = ebc.embedding_bags[mangled_table_name(name)].weight
    return out


class _Tables(nn.Module):
    """The embedding tables one scenario reads, each stored once even when shared by keys."""

    def __init__(self, weights: Dict[str, torch.Tensor], keys: List[str]) -> None:
        super().__init__()
        self.tables = nn.ParameterList()
        self.index: Dict[str, int] = {}
        seen: Dict[int, int] = {}
        for key in keys:
            w = weights[key]
            if id(w) not in seen:
                seen[id(w)] = len(self.tables)
                self.tables.append(nn.Parameter(w.detach().clone(), requires_grad=False))
            self.index[key] = seen[id(w)]

    @property
    def dtype(self) -> torch.dtype:
        """The tables' dtype (float32, or bfloat16 after ``to_bf16``): the tokens' dtype."""
        return self.tables[0].dtype

    def lookup(self, key: str, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.tables[self.index[key]])

    def pooled(self, key: str, ids: torch.Tensor, pooling: str) -> torch.Tensor:
        """``[..., K]`` ids padded with -1 -> ``[..., e]`` sum or mean of the rows (0 for an empty bag)."""
        valid = ids >= 0
        table = self.tables[self.index[key]]
        rows = F.embedding(ids.clamp(min=0), table) * valid[..., None].to(table.dtype)
        total = rows.sum(-2)
        if pooling == "mean":
            total = total / valid.sum(-1, keepdim=True).clamp(min=1).to(total.dtype)
        return total


class ServingLayer(nn.Module):
    """One HSTU layer of the training model for padded ``[B, L, d]`` tokens.

    ``f1`` is split into its query rows (``uq``: U and Q) and its key-value rows (``kv``): the
    context needs only ``kv`` in a target layer, and each part can be pruned or swapped
    (``mtfm_rec.serve.compress``) on its own.
    """

    def __init__(self, layer: _HSTULayer) -> None:
        super().__init__()
        d, split = layer.f1.in_features, layer.uq_dim
        self.uq, self.kv = nn.Linear(d, split), nn.Linear(d, layer.f1.out_features - split)
        with torch.no_grad():
            self.uq.weight.copy_(layer.f1.weight[:split])
            self.uq.bias.copy_(layer.f1.bias[:split])
            self.kv.weight.copy_(layer.f1.weight[split:])
            self.kv.bias.copy_(layer.f1.bias[split:])
        self.f2 = copy.deepcopy(layer.f2)
        self.in_weight, self.in_bias = copy.deepcopy(layer.in_norm_weight), copy.deepcopy(layer.in_norm_bias)
        self.out_weight, self.out_bias = (
            copy.deepcopy(layer.out_norm_weight),
            copy.deepcopy(layer.out_norm_bias),
        )
        self.num_heads, self.num_kv_heads, self.head_dim = layer.num_heads, layer.num_kv_heads, layer.head_dim
        self.alpha, self.eps = layer.alpha, layer.eps
        self.segment_norm = layer.segment_norm  # model.attention_normalisation == "segment"
        self.rotary = copy.deepcopy(layer.rotary)  # model.time_rotary_pairs (identity at 0)
        self.time_bias = copy.deepcopy(layer.time_bias)  # model.time_bias_pairs (identity at 0)
        # a target layer updates only the T tokens: the context passes through it
        self.updates_context = not isinstance(layer, TargetAttentionLayer)

    def norm_in(self, x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """Group LayerNorm of ``x [B, L, d]``, ``group`` ``[L]`` (or a 0-d tensor for all)."""
        return F.layer_norm(x, (x.shape[-1],), eps=self.eps) * self.in_weight[group] + self.in_bias[group]

    def query(
        self, x_norm: torch.Tensor, ts: torch.Tensor, group: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(u [B, L, H*D], q [B, L, H, D (+ time bias channels)])`` of tokens at ``ts [B, L]``
        in token groups ``group`` (as :meth:`norm_in`)."""
        u, q = F.silu(self.uq(x_norm)).chunk(2, dim=-1)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))
        return u, self.time_bias.query(q, x_norm, ts, group)

    def key_value(self, x_norm: torch.Tensor, ts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(k [B, L, G, D (+ time bias channels)], v [B, L, G, D])`` of tokens at ``ts [B, L]``."""
        k, v = F.silu(self.kv(x_norm)).chunk(2, dim=-1)
        shape = (self.num_kv_heads, self.head_dim)
        return self.time_bias.key(k.unflatten(-1, shape), ts), v.unflatten(-1, shape)

    def output(self, x: torch.Tensor, a: torch.Tensor, u: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """``x + f2(GLN(a) * u)``."""
        a = F.layer_norm(a, (a.shape[-1],), eps=self.eps) * self.out_weight[group] + self.out_bias[group]
        return x + self.f2(a * u)


class ScenarioModel(nn.Module):
    """One scenario's serving module (module docstring). Built by :func:`extract_subgraph`."""

    def __init__(
        self, model: SparseDenseModel, scenario: str, attention_backend: Union[AttentionBackend, str] = "auto"
    ) -> None:
        super().__init__()
        self.attention_backend = AttentionBackend(attention_backend)
        dense = model.dense
        if not isinstance(dense, MTFMDense) or not dense.use_sequences:
            raise ServingError(
                f"serving: model.name={model.config.name!r} is not served: M-Falcon needs an MTFM-family "
                "model (mtfm or mtgr) with sequences on, whose context no candidate changes"
            )
        schema: DatasetSchema = model.schema
        if not schema.sequences:
            raise ServingError(
                f"serving: {schema.source} declares no behaviour sequence: there is no context"
            )
        spec = schema.scenario(scenario)
        self.scenario, self.index = scenario, [s.name for s in schema.scenarios].index(scenario)
        self.tasks = list(spec.tasks)
        tok = dense.tokenizer
        self.seq_keys = [[f"seq/{q.name}/{f}" for f in q.features] for q in schema.ordered_sequences]
        self.seq_kinds = [
            TokenKind.HISTORY if q.is_history else TokenKind.REALTIME for q in schema.ordered_sequences
        ]
        self.seq_groups = [schema.sequence_group(q.name) for q in schema.ordered_sequences]
        self.cand_keys = [f"exp/{scenario}/{g}/{c}" for g, c, _ in spec.categorical()]
        self.bag_keys = [(f"bag/{scenario}/{g}/{c}", pooling) for g, c, _, pooling in spec.multi_hot()]
        self.group = schema.scenario_group(scenario)
        keys = [k for ks in self.seq_keys for k in ks] + self.cand_keys + [k for k, _ in self.bag_keys]
        self.tables = _Tables(_table_weights(model), keys)
        self.seq_mlps = copy.deepcopy(tok.sequence_mlps)
        self.cand_mlp = copy.deepcopy(tok.scenario_mlps[self.index])
        self.time = copy.deepcopy(tok.time)
        self.layers = nn.ModuleList(ServingLayer(cast(_HSTULayer, layer)) for layer in dense.hta.layers)
        heads = dense.heads
        self.head_norm, self.experts = copy.deepcopy(heads.norm), copy.deepcopy(heads.experts)
        self.gate, self.towers = (
            copy.deepcopy(heads.gates[self.index]),
            copy.deepcopy(heads.towers[self.index]),
        )
        self.num_experts, self.expert_dim = heads.num_experts, heads.expert_dim
        self.conditional = heads.conditional
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def serving_layers(self) -> List[ServingLayer]:
        """The HSTU layers, in order."""
        return [cast(ServingLayer, layer) for layer in self.layers]

    # ------------------------------------------------------------------ tokens
    def _tokens(
        self, keys: List[str], ids: torch.Tensor, net: nn.Module, extra: List[torch.Tensor]
    ) -> torch.Tensor:
        parts = [self.tables.lookup(k, ids[..., i]) for i, k in enumerate(keys)] + extra
        return net(torch.cat(parts, dim=-1))

    def _with_time(self, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        if self.time is None:
            return x
        return x + self.time(ts.reshape(-1)).view(x.shape)

    # ------------------------------------------------------------------ context
    def encode_context(
        self, seq_ids: List[torch.Tensor], seq_ts: List[torch.Tensor], seq_len: List[torch.Tensor]
    ) -> ContextCache:
        """Runs the context (H; R) of B requests through every layer; returns each layer's K/V."""
        xs, kinds, groups, valid = [], [], [], []
        for i, net in enumerate(self.seq_mlps):
            ids, ts = seq_ids[i], seq_ts[i]
            xs.append(self._with_time(self._tokens(self.seq_keys[i], ids, net, []), ts))
            width = ids.shape[1]
            kinds.append(torch.full((width,), int(self.seq_kinds[i]), dtype=torch.int64, device=ids.device))
            groups.append(torch.full((width,), self.seq_groups[i], dtype=torch.int64, device=ids.device))
            valid.append(torch.arange(width, device=ids.device)[None, :] < seq_len[i][:, None])
        order, kind, ts, sort_key = sort_context(
            torch.cat(kinds), torch.cat(seq_ts, dim=1), torch.cat(valid, dim=1)
        )
        x = torch.cat(xs, dim=1)
        x = x.gather(1, order[..., None].expand_as(x))
        group = torch.cat(groups)[order]  # [B, C]
        cache = ContextCache([], [], kind, ts, sort_key)
        queries, keys = context_layout(cache)
        b, c, d = x.shape
        for layer in self.serving_layers():
            x_norm = layer.norm_in(x, group)
            k, v = layer.key_value(x_norm, ts)
            cache.keys.append(k)
            cache.values.append(v)
            if layer.updates_context:
                u, q = layer.query(x_norm, ts, group)
                a = self._attend(
                    q.reshape(b * c, *q.shape[2:]),
                    k.flatten(0, 1),
                    v.flatten(0, 1),
                    queries,
                    keys,
                    layer,
                )
                x = layer.output(x, a.view(b, c, -1), u, group)
        return cache

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        queries: QuerySet,
        keys: KeySet,
        layer: ServingLayer,
    ) -> torch.Tensor:
        # keys are rotated here, not in the cache: a cached slot's rotation is its own ts either way
        q, k = layer.rotary(q, queries.ts), layer.rotary(k, keys.ts)
        backend = resolve(self.attention_backend, q.device)
        attend = hstu_attention_by_segment if layer.segment_norm else hstu_attention
        return attend(q, k, v, queries, keys, layer.alpha, backend)

    # ------------------------------------------------------------------ candidates
    def score_candidates(
        self,
        cache: ContextCache,
        cand_ids: torch.Tensor,
        cand_bags: List[torch.Tensor],
        cand_dense: torch.Tensor,
        cand_ts: torch.Tensor,
    ) -> torch.Tensor:
        """``[B, M, num_tasks]`` probabilities of candidates against their requests' cached context."""
        bags = [self.tables.pooled(k, ids, pooling) for (k, pooling), ids in zip(self.bag_keys, cand_bags)]
        dense = compress_dense(cand_dense).to(self.tables.dtype)
        x = self._tokens(self.cand_keys, cand_ids, self.cand_mlp, bags + [dense])
        x = self._with_time(x, cand_ts)
        queries, keys = candidate_layout(cache, cand_ts)
        group = torch.tensor(self.group, device=cand_ids.device)
        b, m, d = x.shape
        for layer, k_ctx, v_ctx in zip(self.serving_layers(), cache.keys, cache.values):
            x_norm = layer.norm_in(x, group)
            u, q = layer.query(x_norm, cand_ts, group)
            k, v = layer.key_value(x_norm, cand_ts)
            k_all = torch.cat([k_ctx, k], dim=1).flatten(
                0, 1
            )  # per request: its context, then its candidates
            v_all = torch.cat([v_ctx, v], dim=1).flatten(0, 1)
            a = self._attend(q.flatten(0, 1), k_all, v_all, queries, keys, layer)
            x = layer.output(x, a.view(b, m, -1), u, group)
        return self._heads(x.reshape(-1, d)).view(b, m, -1)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """MMoEHeads.scenario_logits for this scenario, then the funnel probabilities."""
        h = self.head_norm(x)
        experts = F.silu(self.experts(h)).view(-1, self.num_experts, self.expert_dim)
        weights = torch.softmax(self.gate(h).view(-1, len(self.tasks), self.num_experts), dim=-1)
        log_p, _ = funnel_log_probs(self.towers(torch.bmm(weights, experts)).float(), self.conditional)
        return log_p.exp()

    def score_inputs(
        self, inputs: ScenarioInputs, micro_batch: int = 0, store: Optional[ContextStore] = None
    ) -> torch.Tensor:
        """``forward`` on :class:`ScenarioInputs`, the candidates in slices of ``micro_batch``
        (0: all at once) against one context cache: the scores do not depend on the slicing.
        With a ``store``, each request's context is looked up there first (and encoded and
        stored on a miss), request by request."""
        if store is None:
            cache = self.encode_context(inputs.seq_ids, inputs.seq_ts, inputs.seq_len)
            return self._score_slices(cache, inputs, micro_batch)
        out = []
        for b in range(inputs.cand_ts.shape[0]):
            one = inputs.request(b)
            key = context_fingerprint(one.seq_ids, one.seq_ts)
            cache = store.get_or_encode(
                key,
                lambda one=one: self.encode_context(one.seq_ids, one.seq_ts, one.seq_len),  # type: ignore[misc]
            )
            out.append(self._score_slices(cache, one, micro_batch))
        return torch.cat(out, dim=0)

    def _score_slices(self, cache: ContextCache, inputs: ScenarioInputs, micro_batch: int) -> torch.Tensor:
        m = inputs.cand_ts.shape[1]
        step = micro_batch if micro_batch > 0 else max(1, m)
        parts = [
            self.score_candidates(
                cache,
                inputs.cand_ids[:, lo : lo + step],
                [bag[:, lo : lo + step] for bag in inputs.cand_bags],
                inputs.cand_dense[:, lo : lo + step],
                inputs.cand_ts[:, lo : lo + step],
            )
            for lo in range(0, m, step)
        ]
        return torch.cat(parts, dim=1)

    def forward(
        self,
        seq_ids: List[torch.Tensor],
        seq_ts: List[torch.Tensor],
        seq_len: List[torch.Tensor],
        cand_ids: torch.Tensor,
        cand_bags: List[torch.Tensor],
        cand_dense: torch.Tensor,
        cand_ts: torch.Tensor,
        cand_count: torch.Tensor,
    ) -> torch.Tensor:
        """``[B, M, num_tasks]`` probabilities (rows past ``cand_count`` are padding: ignore them)."""
        del cand_count  # candidates never see each other: padding needs no mask
        cache = self.encode_context(seq_ids, seq_ts, seq_len)
        return self.score_candidates(cache, cand_ids, cand_bags, cand_dense, cand_ts)


def extract_subgraph(
    model: SparseDenseModel, scenario: str, attention_backend: Union[AttentionBackend, str] = "auto"
) -> ScenarioModel:
    """Scenario ``scenario``'s serving module from an unsharded, trained model (a copy: the
    model is left as it is). ``attention_backend``: the kernel dispatcher's backend (``auto``:
    the C++ kernel on the CPU, Triton on CUDA).

    Raises:
        ServingError: the model is not of the MTFM family (module docstring).
        KeyError: no such scenario.
    """
    return ScenarioModel(model, scenario, attention_backend)


def parameter_counts(model: nn.Module, sub: ScenarioModel) -> Tuple[int, int]:
    """(parameters of the whole model, of the subgraph): embedding rows included."""
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in sub.parameters())
