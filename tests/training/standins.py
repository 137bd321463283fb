"""Small stand-ins for the data and model packages, used by the trainer's unit tests.

They let the trainer's mechanics (sharding, pipeline, resume, reductions) be tested in
isolation and fast: a tiny in-memory multi-scenario dataset in the aggregated-sample format, a
rank-sharded resumable loader over it and a small model with the ``MTFM`` interface
(``forward(batch) -> (loss, {scenario: probs})``, ``embedding_collection`` child).
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List

import numpy as np
import pyarrow as pa
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor

from mtfm_rec.data import sample_format as fmt
from mtfm_rec.data.batch import Batch, collate
from mtfm_rec.data.schema import DatasetSchema

# Overrides that keep a test's training run quiet: no progress bar, TensorBoard, plots or plan.
QUIET = [
    "train.progress_bar=false",
    "train.tensorboard=false",
    "train.plots=false",
    "train.sharding.print_plan=false",
]

SCHEMA = DatasetSchema.from_dict(
    {
        "name": "standin",
        "time_unit": "s",
        "sequences": [
            {"name": "orders", "kind": "history", "max_len": 8, "features": {"item": 50, "cat": 5}}
        ],
        "scenarios": [
            {
                "name": "a",
                "user_features": {"u": 20},
                "item_features": {"item": 50},
                "tasks": ["click", "buy"],
            },
            {"name": "b", "item_features": {"item": 50, "cat": 5}, "tasks": ["click"]},
        ],
    }
)


def make_table(num_users: int = 256, seed: int = 0) -> pa.Table:
    """Aggregated samples whose click label depends on the user's history (planted signal)."""
    rng = np.random.default_rng(seed)
    cols: Dict[str, List[Any]] = {c: [] for c in [fmt.USER_ID, fmt.WINDOW_START, fmt.WINDOW_END]}
    for u in range(num_users):
        taste = rng.integers(0, 5)  # the user likes items with item % 5 == taste
        hist = [int(i) for i in rng.integers(0, 10, size=rng.integers(1, 8)) * 5 + taste]
        cols[fmt.USER_ID].append(u)
        cols[fmt.WINDOW_START].append(1000)
        cols[fmt.WINDOW_END].append(2000)
        cols.setdefault(fmt.seq_ts("orders"), []).append(
            sorted(int(t) for t in rng.integers(0, 999, len(hist)))
        )
        cols.setdefault(fmt.seq_feature("orders", "item"), []).append(hist)
        cols.setdefault(fmt.seq_feature("orders", "cat"), []).append([i % 5 for i in hist])
        for s in SCHEMA.scenarios:
            n = int(rng.integers(1, 4))
            items = rng.integers(0, 50, size=n)
            click = ((items % 5 == taste) | (rng.random(n) < 0.1)).astype(np.int8)
            cols.setdefault(fmt.exp_ts(s.name), []).append(
                sorted(int(t) for t in rng.integers(1000, 2000, n))
            )
            cols.setdefault(fmt.exp_request_id(s.name), []).append([-1] * n)
            cols.setdefault(fmt.exp_split(s.name), []).append([-1] * n)
            for g, c, _ in s.categorical():
                vals = items if c == "item" else (items % 5 if c == "cat" else np.full(n, u % 20))
                cols.setdefault(fmt.exp_feature(s.name, g, c), []).append([int(v) for v in vals])
            for t in s.tasks:
                lab = click if t == "click" else (click & (rng.random(n) < 0.5)).astype(np.int8)
                cols.setdefault(f"exp/{s.name}/label/{t}", []).append([int(v) for v in lab])
    return pa.table(cols)


class StandinLoader:
    """Global batch ``i`` = rows ``[i*G, (i+1)*G)``; rank ``r`` takes its ``G/world`` slice.

    Splits: the last quarter of users are "valid"/"test" (equal), the rest "train".
    """

    def __init__(self, table: pa.Table, split: str, global_batch: int, rank: int, world_size: int) -> None:
        n = table.num_rows
        cut = n * 3 // 4
        self.table = table.slice(0, cut) if split == "train" else table.slice(cut)
        self.global_batch, self.rank, self.world = global_batch, rank, world_size
        self.local = global_batch // world_size
        self.num_batches = self.table.num_rows // global_batch
        self.epoch, self.batches_in_epoch = 0, 0

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batches_in_epoch = epoch, 0

    def __iter__(self) -> Iterator[Batch]:
        while self.batches_in_epoch < self.num_batches:
            start = self.batches_in_epoch * self.global_batch + self.rank * self.local
            self.batches_in_epoch += 1
            yield collate(self.table.slice(start, self.local), SCHEMA)
        self.epoch, self.batches_in_epoch = self.epoch + 1, 0

    def state_dict(self) -> Dict[str, int]:
        return {
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "batch_size": self.local,
            "rank": self.rank,
            "world_size": self.world,
        }

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Exact for this layout; a resharded state (``resharded_from``: the saving world size, per-rank
        keys dropped) resumes the same epoch at the global batch its samples reach, like the real loader."""
        if "resharded_from" in state:
            samples = int(state["batches_in_epoch"]) * int(state["batch_size"]) * int(state["resharded_from"])
            self.epoch = int(state["epoch"])
            self.batches_in_epoch = min(samples // self.global_batch, self.num_batches)
            return
        if (state["rank"], state["world_size"], state["batch_size"]) != (self.rank, self.world, self.local):
            raise ValueError(f"loader state of another layout: {state}")
        self.epoch, self.batches_in_epoch = int(state["epoch"]), int(state["batches_in_epoch"])


@torch.fx.wrap
def _exposure_inputs(
    emb: Dict[str, JaggedTensor],
    seq_values: torch.Tensor,
    seq_lengths: torch.Tensor,
    exposure_sample: Dict[str, torch.Tensor],
    keys: Dict[str, List[str]],
    match_keys: Dict[str, str],
    use_sequences: bool,
) -> Dict[str, torch.Tensor]:
    """Per scenario: exposure feature embeddings, the user's mean history category embedding
    and its product with the exposure's category (else item) embedding; zeros without
    sequences."""
    b = seq_lengths.numel()
    sample = torch.repeat_interleave(torch.arange(b), seq_lengths)
    pooled = torch.zeros(b, seq_values.shape[1]).index_add_(0, sample, seq_values)
    pooled = pooled / seq_lengths.clamp(min=1).unsqueeze(1)
    out = {}
    for s, ks in keys.items():
        feats = [emb[k].values() for k in ks]
        user = pooled[exposure_sample[s]]
        if not use_sequences:
            user = torch.zeros_like(user)
        match = emb[match_keys[s]].values()
        out[s] = torch.cat(feats + [user, user * match], dim=1)
    return out


class StandinModel(nn.Module):
    """Exposure feature embeddings (+ mean history item embedding) -> an MLP per scenario."""

    def __init__(self, schema: DatasetSchema = SCHEMA, dim: int = 8, use_sequences: bool = True) -> None:
        super().__init__()
        sizes = schema.sparse_feature_sizes()
        self.keys = {
            s.name: [f"exp/{s.name}/{g}/{c}" for g, c, _ in s.categorical()] for s in schema.scenarios
        }
        self.use_sequences = use_sequences
        # history and exposure categories share one table: their product reveals the taste
        cats = [k for k in sizes if k.endswith("/cat")]
        self.match_keys = {
            s: f"exp/{s}/item/cat" if f"exp/{s}/item/cat" in sizes else f"exp/{s}/item/item"
            for s in self.keys
        }
        tables = [
            EmbeddingConfig(
                name="cat_table", num_embeddings=sizes[cats[0]], embedding_dim=dim, feature_names=cats
            )
        ]
        tables += [
            EmbeddingConfig(name=k.replace("/", "__"), num_embeddings=n, embedding_dim=dim, feature_names=[k])
            for k, n in sizes.items()
            if k not in cats
        ]
        self.embedding_collection = EmbeddingCollection(tables=tables, device=torch.device("cpu"))
        self.towers = nn.ModuleDict(
            {
                s.name: nn.Sequential(
                    nn.Linear(dim * (len(self.keys[s.name]) + 2), 16), nn.ReLU(), nn.Linear(16, len(s.tasks))
                )
                for s in schema.scenarios
            }
        )
        self.loss_fn = nn.BCEWithLogitsLoss(reduction="sum")

    def forward(self, batch: Batch):  # -> Tuple[Tensor, Dict[str, Tensor]]
        emb = self.embedding_collection(batch.sparse_features)
        seq = emb["seq/orders/cat"]
        x = _exposure_inputs(
            emb,
            seq.values(),
            seq.lengths(),
            batch.exposure_sample,
            self.keys,
            self.match_keys,
            self.use_sequences,
        )
        return self._heads(x, batch.labels, batch.label_mask)

    def _heads(
        self, x: Dict[str, torch.Tensor], labels: Dict[str, torch.Tensor], mask: Dict[str, torch.Tensor]
    ):
        total = torch.zeros(())
        count = torch.zeros(())
        preds = {}
        for s, tower in self.towers.items():
            logits = tower(x[s])
            m = mask[s]
            total = total + self.loss_fn(logits[m], labels[s][m])
            count = count + m.sum()
            preds[s] = torch.sigmoid(logits)
        return total / count.clamp(min=1), preds
