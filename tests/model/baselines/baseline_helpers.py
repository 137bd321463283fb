"""Trains a model of the zoo through the real Trainer on the shared small dataset, and the bar
every model must clear: better than the best constant predictor."""

from __future__ import annotations

import math
import os
from typing import Dict, Sequence, Tuple

import pyarrow.compute as pc
import pyarrow.parquet as pq

from mtfm_rec.config import load_config
from mtfm_rec.training.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
QUIET = [
    "train.progress_bar=false",
    "train.plots=false",
    "data.aggregation.progress=false",
    "train.log_every=1000",
    "train.resume=never",
    "train.max_minutes=0",
]

Metrics = Dict[str, Dict[str, float]]


def train_model(
    raw: str, run_dir: str, name: str, overrides: Sequence[str] = (), steps: int = 60
) -> Tuple[Metrics, Dict[str, float]]:
    """Trains ``model.name=name`` from ``configs/mtfm_small.yaml`` for ``steps`` steps.

    Returns:
        (test metrics, per "<scenario>/<task>" the test split's positive rate).
    """
    cfg = load_config(
        os.path.join(REPO, "configs", "mtfm_small.yaml"),
        QUIET
        + [
            f"data.raw={raw}",
            f"data.cache_dir={raw}-cache",  # aggregated once, shared by every test
            f"train.run_dir={run_dir}/run",
            f"model.name={name}",
            f"train.max_steps={steps}",
            "train.eval_every=0",
            "train.eval_splits=[]",
            "train.lr_warmup_steps=10",
            *overrides,
        ],
    )
    trainer = Trainer(cfg)
    try:
        trainer.fit()
        metrics = trainer.predict("test")
    finally:
        trainer.close()
    table = pq.read_table(os.path.join(run_dir, "run", "predictions.parquet"))
    rates: Dict[str, float] = {}
    for key in metrics:
        scenario, task = key.split("/")
        mask = pc.and_(pc.equal(table["scenario"], scenario), pc.equal(table["task"], task))
        labels = table.filter(mask)["label"].to_numpy()
        if len(labels):
            rates[key] = float(labels.mean())
    return metrics, rates


def constant_logloss(rate: float) -> float:
    """Logloss of the best constant predictor (the split's own positive rate)."""
    return -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))


def assert_beats_constant(metrics: Metrics, rates: Dict[str, float], key: str = "feed/click") -> None:
    """AUC above chance and logloss below the best constant's on ``key`` (the largest scenario)."""
    m = metrics[key]
    assert m["auc"] > 0.53, f"{key}: AUC {m['auc']:.4f} is no better than a constant; {metrics}"
    bar = constant_logloss(rates[key])
    assert m["logloss"] < bar, f"{key}: logloss {m['logloss']:.4f} not below the constant's {bar:.4f}"
