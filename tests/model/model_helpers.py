"""Shared helpers for the model tests (imported as ``model_helpers``; pytest puts this folder on
sys.path): small models, batches, and perturbing tokens."""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Tuple

import torch
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from mtfm_rec.data.batch import Batch
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.kernels.jagged import TokenKind
from mtfm_rec.model import MTFM
from mtfm_rec.model.examples import small_config


def make_model(schema: DatasetSchema, seed: int = 0, **overrides: object) -> MTFM:
    torch.manual_seed(seed)
    return MTFM(schema, small_config(**overrides)).eval()


def perturb_tokens(batch: Batch, schema: DatasetSchema, rows: Iterable[int], seed: int = 1) -> Batch:
    """A copy of ``batch`` whose tokens at flat ``rows`` get new random feature ids (and dense
    features for T tokens); layout, timestamps and labels are unchanged."""
    rows_t = torch.tensor(sorted(set(rows)), dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    sizes = schema.sparse_feature_sizes()
    kjt = batch.sparse_features
    values = kjt.values().clone()
    lengths = kjt.length_per_key()
    start = 0
    for key, n in zip(kjt.keys(), lengths):
        parts = key.split("/")
        pos = batch.sequence_positions[parts[1]] if parts[0] == "seq" else batch.target_positions[parts[1]]
        hit = torch.isin(pos, rows_t)
        fresh = torch.randint(0, sizes[key], (n,), generator=gen)
        values[start : start + n] = torch.where(hit, fresh, values[start : start + n])
        start += n
    dense: Dict[str, torch.Tensor] = {}
    for name, x in batch.dense_features.items():
        hit = torch.isin(batch.target_positions[name], rows_t)[:, None]
        dense[name] = torch.where(hit, torch.rand(x.shape, generator=gen) * 50, x)
    new_kjt = KeyedJaggedTensor(keys=kjt.keys(), values=values, lengths=kjt.lengths())
    return dataclasses.replace(batch, sparse_features=new_kjt, dense_features=dense)


def exposure_scores(out: Dict[str, torch.Tensor], batch: Batch) -> Dict[int, torch.Tensor]:
    """Flat token row -> that exposure's probabilities (all tasks)."""
    scores: Dict[int, torch.Tensor] = {}
    for name, pos in batch.target_positions.items():
        for i, row in enumerate(pos.tolist()):
            scores[row] = out[name][i]
    return scores


def sample_rows(batch: Batch, b: int) -> List[int]:
    return list(range(int(batch.token_offsets[b]), int(batch.token_offsets[b + 1])))


def hidden_from(batch: Batch, i: int) -> List[int]:
    """The rows of T token ``i``'s sample that its mask hides: the other T tokens and the R tokens
    at or after its time (what must never change its score)."""
    kind, ts = batch.token_kind.tolist(), batch.token_ts.tolist()
    b = int(torch.searchsorted(batch.token_offsets, torch.tensor(i), right=True)) - 1
    return [
        r
        for r in sample_rows(batch, b)
        if r != i and (kind[r] == TokenKind.TARGET or (kind[r] == TokenKind.REALTIME and ts[r] >= ts[i]))
    ]


def dense_forward_on_meta(
    model: torch.nn.Module, batch: Batch
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The model's dense part run on the meta device (embeddings looked up on the CPU first):
    it completes only if nothing in it reads a tensor value on the host."""
    emb = model.embedding_collection(batch.sparse_features)
    meta = torch.device("meta")
    emb_meta = {
        k: JaggedTensor(values=v.values().to(meta), lengths=v.lengths().to(meta)) for k, v in emb.items()
    }
    return model.dense.to(meta)(emb_meta, batch.to(meta))
