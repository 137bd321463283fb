"""Replay: an evaluation split scored request by request through the serving path.

The trainer's evaluation loader yields the split's batches; each batch is cut into requests
(:func:`mtfm_rec.serve.request.requests_from_batch`: one per sample, scenario and exposure
time, with the sample's own context), the :class:`~mtfm_rec.serve.predictor.Predictor` scores
them, and the scores go back beside the batch's labels into the same
:class:`~mtfm_rec.training.metrics.MetricAccumulator` that ``Trainer.predict`` fills. So the
output is ``predictions.parquet``'s format (scenario, task, user_id, ts, label, score) and the
metrics are comparable with the run's ``metrics.json`` key by key: with the fp32 M-Falcon path
they are equal (the parity that ``tests/serve`` asserts).
"""

from __future__ import annotations

import logging
import time
from typing import Dict, Optional

import torch

from mtfm_rec.config import Config
from mtfm_rec.data.aggregate import ensure_aggregated
from mtfm_rec.data.batch import Batch
from mtfm_rec.data.config import fill_recommended_splits
from mtfm_rec.data.loader import ResumableLoader
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.serve.predictor import Predictor
from mtfm_rec.serve.request import requests_from_batch
from mtfm_rec.training.metrics import MetricAccumulator, MetricDict

logger = logging.getLogger(__name__)


def served_scores(predictor: Predictor, batch: Batch, schema: DatasetSchema) -> Dict[str, torch.Tensor]:
    """Per scenario the predictor serves, ``[n_s, num_tasks]`` scores of the batch's exposures
    in KJT order (the layout of ``batch.labels``), each exposure scored in its request."""
    out: Dict[str, torch.Tensor] = {}
    for scenario in predictor.scorers:
        requests, rows = requests_from_batch(batch, schema, scenario)
        n = int(batch.exposure_sample[scenario].shape[0])
        scores = torch.zeros(n, len(predictor.tasks(scenario)))
        for index, probs in zip(rows, predictor.score(requests)):
            scores[torch.from_numpy(index)] = torch.from_numpy(probs)
        out[scenario] = scores
    return out


def replay_split(
    predictor: Predictor,
    config: Config,
    split: str = "test",
    predictions_path: Optional[str] = None,
    dataset_dir: Optional[str] = None,
) -> MetricDict:
    """Scores ``split`` of ``config``'s data through ``predictor``; returns the metrics of the
    served scenarios (and writes the predictions to ``predictions_path`` if given).

    Args:
        predictor: the scenarios to score (any it serves).
        config: the run's config (``data.raw``, aggregation, split times, loader batch size).
        split: ``test`` or ``valid``.
        dataset_dir: the aggregated dataset (default: ``ensure_aggregated`` of ``config.data``).
    """
    dcfg = config.data
    dataset_dir = dataset_dir or ensure_aggregated(dcfg.raw, dcfg.cache_dir, dcfg.aggregation)
    schema = DatasetSchema.load(dataset_dir)
    fill_recommended_splits(dcfg, schema.extra)
    loader = ResumableLoader.from_config(dataset_dir, dcfg, split=split, rank=0, world_size=1, schema=schema)
    keys = [f"{s}/{t}" for s in predictor.scorers for t in predictor.tasks(s)]
    acc = MetricAccumulator(keys, save_predictions=predictions_path is not None)
    start, batches, last_log = time.monotonic(), 0, time.monotonic()
    for batch in loader:
        acc.update_batch(batch, served_scores(predictor, batch, schema))
        batches += 1
        if time.monotonic() - last_log > 10:
            last_log = time.monotonic()
            logger.info("replay: %d batches in %.0f s", batches, last_log - start)
    return acc.compute(predictions_path=predictions_path)
