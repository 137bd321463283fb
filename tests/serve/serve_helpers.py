"""Shared helpers of the serving tests (imported as ``serve_helpers``; pytest puts this folder on
sys.path): a small MTFM on the demo schema and the training-layout scores of a batch."""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np
import torch

from mtfm_rec.data.batch import Batch
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.model import MTFM, ModelConfig
from mtfm_rec.model.examples import demo_schema, random_batch
from mtfm_rec.serve.request import Request, requests_from_batch


def small_model(schema: DatasetSchema, seed: int = 0, **overrides: Any) -> MTFM:
    """A small MTFM: (2:1) x 1 with GQA (4 heads, 2 kv heads), the demo schema's tables."""
    config: Dict[str, Any] = dict(
        embedding_dim=8,
        d_model=32,
        tokenizer_hidden=[32],
        num_blocks=1,
        target_layers_per_block=2,
        full_layers_per_block=1,
        num_heads=4,
        num_kv_heads=2,
        num_experts=3,
        expert_dim=16,
        tower_dim=8,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    return MTFM(schema, ModelConfig(**config)).eval()


def demo() -> Tuple[DatasetSchema, Batch]:
    """The demo schema (3 scenarios, 2 history and 1 real-time sequence) and a random batch."""
    schema = demo_schema(num_scenarios=3)
    return schema, random_batch(schema, batch_size=6, seed=3)


def training_scores(model: torch.nn.Module, batch: Batch) -> Dict[str, torch.Tensor]:
    """Per scenario ``[n_s, num_tasks]``: what ``Trainer.predict`` scores (the training layout)."""
    with torch.no_grad():
        _, out = model(batch)
    return {name: out[name] for name in batch.labels}


def replay_requests(
    batch: Batch, schema: DatasetSchema, scenario: str
) -> Tuple[List[Request], List[np.ndarray]]:
    return requests_from_batch(batch, schema, scenario)
