"""Shared helpers of the serving tests (imported as ``serve_helpers``; pytest puts this folder on
sys.path): a small MTFM on the demo schema and the training-layout scores of a batch."""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch

from mtfm_rec.data.batch import Batch
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.model import MTFM
from mtfm_rec.model.examples import demo_schema, random_batch, small_config


def small_model(schema: DatasetSchema, seed: int = 0, **overrides: Any) -> MTFM:
    """``small_config`` with two target layers after the full one ((2:1) x 1), for the schema."""
    torch.manual_seed(seed)
    return MTFM(schema, small_config(**{"target_layers_per_block": 2, **overrides})).eval()


# multi-hot features in the user and the item group (as tests/model/test_multi_hot_model.py); b
# has no single-id feature at all
MULTI_HOT = DatasetSchema.from_dict(
    {
        "name": "mhm",
        "time_unit": "s",
        "sequences": [{"name": "orders", "kind": "history", "max_len": 8, "features": {"item": 6}}],
        "scenarios": [
            {
                "name": "a",
                "item_features": {"item": 6, "genres": {"size": 5, "pooling": "mean"}},
                "dense_features": ["price"],
                "tasks": ["click"],
            },
            {
                "name": "b",
                "user_features": {"tags": {"size": 4, "pooling": "sum"}},
                "tasks": ["click", "buy"],
            },
        ],
    }
)


def demo() -> Tuple[DatasetSchema, Batch]:
    """The demo schema (3 scenarios, 2 history and 1 real-time sequence) and a random batch."""
    schema = demo_schema(num_scenarios=3)
    return schema, random_batch(schema, batch_size=6, seed=3)


def training_scores(model: torch.nn.Module, batch: Batch) -> Dict[str, torch.Tensor]:
    """Per scenario ``[n_s, num_tasks]``: what ``Trainer.predict`` scores (the training layout)."""
    with torch.no_grad():
        _, out = model(batch)
    return {name: out[name] for name in batch.labels}
