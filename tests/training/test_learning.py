"""The trainer learns, and MTFM learns what the data holds.

The fast version uses the stand-in model on the stand-in data, whose click label is planted in
the user's order history (see standins.py). The real one trains ``configs/mtfm_small.yaml`` on
a fresh alignment-free synthetic dataset with known truth and holds it to the logistic
regression with hand-made history features and to the Bayes-optimal AUC
(``mtfm_rec.bench.references``); the full-size comparison is docs/BENCHMARKS.md ("quality").
"""

from __future__ import annotations

import os
import sys
from typing import Dict

from mtfm_rec.config import load_config
from mtfm_rec.training.trainer import Trainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from standins import QUIET, SCHEMA, StandinLoader, StandinModel, make_table  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMON = QUIET + ["train.resume=never", "train.log_every=50"]


def _standin_auc(tmp_path, use_sequences: bool, steps: int) -> Dict[str, float]:
    table = make_table(512, seed=1)
    cfg = load_config(
        None,
        COMMON
        + [
            f"train.run_dir={tmp_path}/{use_sequences}",
            f"train.max_steps={steps}",
            "train.lr=3e-3",
            "train.embedding_lr=0.1",
            "data.loader.batch_size=32",
            "train.eval_splits=[]",
        ],
    )
    trainer = Trainer(
        cfg,
        model_fn=lambda schema: StandinModel(schema, use_sequences=use_sequences),
        loader_fn=lambda split: StandinLoader(table, split, 32, 0, 1),
        schema=SCHEMA,
    )
    try:
        trainer.fit()
        metrics = trainer.evaluate("test")
    finally:
        trainer.close()
    return {k: m["auc"] for k, m in metrics.items()}


def test_sequence_model_beats_feature_only_on_planted_history(tmp_path) -> None:
    with_seq = _standin_auc(tmp_path, True, steps=60)
    without = _standin_auc(tmp_path, False, steps=60)
    # b/click is a function of (history taste, item category): only the sequence reveals taste
    # (measured: 0.84 with, 0.48 without)
    assert with_seq["b/click"] > 0.7, with_seq
    assert with_seq["b/click"] > without["b/click"] + 0.1, (with_seq, without)


def test_mtfm_small_learns_more_than_the_hand_made_history_regression(tmp_path) -> None:
    """On alignment-free data with known truth, MTFM must read the sequences better than a
    logistic regression on the exposure features plus two hand-made history features does, and
    never score above the Bayes-optimal AUC (that would be a leak)."""
    from mtfm_rec.bench.references import reference_metrics
    from mtfm_rec.data.synthetic import generate

    raw = str(tmp_path / "raw")
    generate(raw, num_users=USERS, num_days=DAYS, seed=11, shared_embeddings=False)
    references = reference_metrics(raw, ("bayes", "lr_history"))
    cfg = load_config(
        os.path.join(REPO, "configs", "mtfm_small.yaml"),
        COMMON
        + [
            f"data.raw={raw}",
            f"data.cache_dir={tmp_path}/cache",
            f"train.run_dir={tmp_path}/mtfm",
            f"train.max_steps={STEPS}",
            "train.max_minutes=0",
            "train.eval_splits=[]",
        ],
    )
    trainer = Trainer(cfg)
    try:
        trainer.fit()
        mtfm = trainer.evaluate("test")
    finally:
        trainer.close()
    for key, floor in FLOORS.items():
        auc, lr, bayes = (
            mtfm[key]["auc"],
            references["lr_history"][key]["auc"],
            references["bayes"][key]["auc"],
        )
        assert auc < bayes + 0.01, f"{key}: MTFM {auc:.4f} above Bayes {bayes:.4f}: a leak ({mtfm})"
        assert auc > lr + floor, f"{key}: MTFM {auc:.4f} vs LR + history {lr:.4f} (needs > +{floor}); {mtfm}"


# 10,000 users x 10 days (with fewer training days MTFM is below the regression even on feed:
# 6,000 users x 5 days gave .728 vs .744), 1500 steps (1.2 epochs), about 4.5 minutes on 2 CPU
# cores. Measured with seed 11 on the current defaults: feed click .7652 vs .7459 (Bayes .8050),
# feed order .7927 vs .7689 (.8345); 3000 steps gave .7685 / .7970. Search and coupon (2,400 test
# exposures) are level with the regression at this scale, so only feed is held to a margin here.
USERS, DAYS, STEPS = 10000, 10, 1500
FLOORS = {"feed/click": 0.01, "feed/order": 0.01}
