"""The Python serving API: a trained run (or an exported package) -> scores of requests.

::

    predictor = Predictor.from_run("runs/mtfm_small")          # best validation checkpoint
    scores = predictor.score([request])                         # per request [M, num_tasks]
    predictor.tasks("hp")                                       # ["click", "order"]

:func:`load_run` rebuilds a run's model from its ``config.yaml`` and loads a checkpoint into
the unsharded module (DCP gathers the sharded tables), which is also what ``replay`` and
``export`` start from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from mtfm_rec.config import Config, load_config
from mtfm_rec.data.aggregate import ensure_aggregated
from mtfm_rec.data.config import fill_recommended_splits
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.model.sparse_dense import SparseDenseModel
from mtfm_rec.model.zoo import build_model
from mtfm_rec.serve.falcon import ContextStore
from mtfm_rec.serve.request import Request, ScenarioInputs, collate_requests
from mtfm_rec.serve.subgraph import ScenarioModel, ServingError, extract_subgraph
from mtfm_rec.training.checkpoint import CheckpointManager, load_checkpoint

# what scores padded inputs: a ScenarioModel, or an exported program's callable
ScoreFn = Callable[[ScenarioInputs], torch.Tensor]


@dataclass
class TrainedRun:
    """A run directory's model with trained weights, and what it was trained on."""

    config: Config
    schema: DatasetSchema
    dataset_dir: str
    model: SparseDenseModel
    checkpoint: str


def load_run(run_dir: str, checkpoint: str = "best") -> TrainedRun:
    """Rebuilds ``run_dir``'s model and loads its weights.

    Args:
        run_dir: a ``mtfm_rec.train`` run directory (``config.yaml``, ``checkpoints/``).
        checkpoint: ``best`` (the best validation step, what ``metrics.json`` was computed
            with), ``latest``, or a checkpoint directory.

    Raises:
        ServingError: no config.yaml, or no such checkpoint.
    """
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise ServingError(f"{run_dir}: no config.yaml: not a mtfm_rec.train run directory")
    config = load_config(path)
    dcfg = config.data
    dataset_dir = ensure_aggregated(dcfg.raw, dcfg.cache_dir, dcfg.aggregation)
    schema = DatasetSchema.load(dataset_dir)
    fill_recommended_splits(dcfg, schema.extra)
    manager = CheckpointManager(os.path.join(run_dir, "checkpoints"))
    if checkpoint == "best":
        best = manager.best()
        ckpt = best["path"] if best is not None else manager.latest()
    elif checkpoint == "latest":
        ckpt = manager.latest()
    else:
        ckpt = checkpoint
    if ckpt is None:
        raise ServingError(f"{run_dir}/checkpoints: no complete checkpoint to serve ({checkpoint=})")
    torch.manual_seed(config.train.seed)
    model = build_model(schema, config.model)
    load_checkpoint(ckpt, model, None, restore_rng=False)
    model.eval()
    return TrainedRun(config, schema, dataset_dir, model, ckpt)


class Predictor:
    """Scores requests with one scoring function per scenario.

    Args:
        schema: the dataset schema (scenarios, tasks, features).
        scorers: scenario -> what scores its padded inputs (a :class:`ScenarioModel`, or an
            exported program loaded by ``mtfm_rec.serve.export``).
        max_batch_requests: requests scored together in one padded batch.
    """

    def __init__(
        self, schema: DatasetSchema, scorers: Dict[str, ScoreFn], max_batch_requests: int = 64
    ) -> None:
        if max_batch_requests < 1:
            raise ValueError(f"max_batch_requests={max_batch_requests} must be >= 1")
        self.schema, self.scorers, self.max_batch_requests = schema, scorers, max_batch_requests

    @classmethod
    def from_run(
        cls,
        run_dir: str,
        scenarios: Optional[Sequence[str]] = None,
        checkpoint: str = "best",
        micro_batch: int = 0,
        max_batch_requests: int = 64,
        context_cache: int = 0,
    ) -> "Predictor":
        """A predictor of every scenario (or ``scenarios``) of a trained run: eager M-Falcon,
        candidates in micro-batches of ``micro_batch`` (0: all of a request at once), and with
        ``context_cache > 0`` an LRU of that many encoded contexts per scenario."""
        run = load_run(run_dir, checkpoint)
        names = list(scenarios) if scenarios else [s.name for s in run.schema.scenarios]
        subgraphs = {name: extract_subgraph(run.model, name) for name in names}
        scorers = {
            n: eager_scorer(m, micro_batch, ContextStore(context_cache) if context_cache else None)
            for n, m in subgraphs.items()
        }
        return cls(run.schema, scorers, max_batch_requests)

    def tasks(self, scenario: str) -> List[str]:
        return list(self.schema.scenario(scenario).tasks)

    @torch.no_grad()
    def score(self, requests: Sequence[Request]) -> List[np.ndarray]:
        """Per request, ``[num_candidates, num_tasks]`` float32 probabilities (tasks in schema
        order), whatever mix of scenarios ``requests`` holds."""
        out: List[Optional[np.ndarray]] = [None] * len(requests)
        by_scenario: Dict[str, List[int]] = {}
        for i, r in enumerate(requests):
            if r.scenario not in self.scorers:
                raise ServingError(
                    f"request {i}: scenario {r.scenario!r} is not served; served: {sorted(self.scorers)}"
                )
            by_scenario.setdefault(r.scenario, []).append(i)
        for scenario, index in by_scenario.items():
            for lo in range(0, len(index), self.max_batch_requests):
                chunk = index[lo : lo + self.max_batch_requests]
                probs = self.scorers[scenario](collate_requests([requests[i] for i in chunk], self.schema))
                for row, i in enumerate(chunk):
                    out[i] = probs[row, : requests[i].num_candidates].float().numpy()
        return [o for o in out if o is not None]


def eager_scorer(model: ScenarioModel, micro_batch: int = 0, store: Optional[ContextStore] = None) -> ScoreFn:
    """A :data:`ScoreFn` of an eager subgraph: candidates in micro-batches of ``micro_batch``,
    contexts looked up in ``store`` first when one is given."""
    return lambda inputs: model.score_inputs(inputs, micro_batch, store)
