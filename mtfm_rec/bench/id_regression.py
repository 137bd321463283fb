"""The floor of any dataset: a logistic regression on the exposures' own features.

    python -m mtfm_rec.bench.id_regression data/ml1m_swr      # prints the table, writes nothing

Per scenario x task, the ``lr_features`` regression of :mod:`mtfm_rec.bench.references` (every
single-id categorical column one-hot, so one bias per id; every dense column standardised;
multi-hot columns left out) is fitted on the train split with its L2 strength chosen on the valid
split's log loss, and scored on the valid and the test split with the trainer's exact metrics
(``compute_key_metrics``), each task also pooled over the scenarios (``all/<task>``: the
"Total" of the Scenario-Wise Rec benchmark). It reads the raw Parquet directly, without our
aggregation, loader or trainer, so it is an independent check of what a dataset's splits hold: a
model below it learns less than its own ids say, and a valid-test gap it shares with the models
is the split's, not the pipeline's (docs/TRAINING.md, ML-1M).

Splits as the trainer's (:func:`mtfm_rec.data.splits.exposure_split`): an exposure's ``split``
column where set, else by time with the dataset's ``recommended_valid_after`` /
``recommended_eval_after``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Tuple

import numpy as np

from mtfm_rec.bench.references import design_matrix, fit_logistic
from mtfm_rec.data.reader import SPLIT, read_parquet_folder
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.data.splits import exposure_split
from mtfm_rec.training.metrics import compute_key_metrics

EVALUATED = {"valid": 1, "test": 2}
POOLED = "all"


def id_regression_metrics(root: str) -> Dict[str, Dict[str, Dict[str, float]]]:
    """``{"valid" | "test": {"<scenario>/<task>" | "all/<task>": metrics}}``.

    Raises:
        ValueError: a scenario with no train, valid or test exposure (naming it).
    """
    schema = DatasetSchema.load(f"{root.rstrip('/')}/dataset.yaml")
    eval_after = schema.extra.get("recommended_eval_after")
    valid_after = schema.extra.get("recommended_valid_after")
    out: Dict[str, Dict[str, Dict[str, float]]] = {name: {} for name in EVALUATED}
    pooled: Dict[Tuple[str, str], List[Tuple[np.ndarray, ...]]] = {}  # (split, task) -> rows
    for scenario in schema.scenarios:
        exposures = read_parquet_folder(root, f"exposures/{scenario.name}")
        ts = exposures["ts"].to_numpy()
        stored = np.full(len(ts), -1, np.int64)
        if SPLIT in exposures.column_names:
            stored = exposures[SPLIT].fill_null(-1).to_numpy().astype(np.int64)
        split = exposure_split(
            ts,
            stored,
            None if eval_after is None else int(eval_after),
            None if valid_after is None else int(valid_after),
        )
        missing = [name for name, code in (("train", 0), *EVALUATED.items()) if not (split == code).any()]
        if missing:
            raise ValueError(f"{root}: exposures/{scenario.name} has no {'/'.join(missing)} exposure")
        onehot, dense, num_ids = design_matrix(exposures, scenario)
        user = exposures["user_id"].to_numpy()
        for task in scenario.tasks:
            labels = exposures[task].to_numpy().astype(np.int8)
            scores = fit_logistic(onehot, dense, num_ids, labels, split)
            for name, code in EVALUATED.items():
                rows = split == code
                key = f"{scenario.name}/{task}"
                out[name][key] = compute_key_metrics(scores[rows], labels[rows], user[rows], key=key)
                pooled.setdefault((name, task), []).append((scores[rows], labels[rows], user[rows]))
    for (name, task), parts in pooled.items():
        score, label, user = (np.concatenate(p) for p in zip(*parts))
        key = f"{POOLED}/{task}"
        out[name][key] = compute_key_metrics(score, label, user, key=key)
    return out


def format_table(metrics: Dict[str, Dict[str, Dict[str, float]]]) -> str:
    lines = ["| scenario/task | valid AUC | test AUC | test GAUC | test logloss | test n |", "|---" * 6 + "|"]
    for key, test in metrics["test"].items():
        valid = metrics["valid"][key]
        lines.append(
            f"| {key} | {valid['auc']:.4f} | {test['auc']:.4f} | {test['gauc']:.4f} | "
            f"{test['logloss']:.4f} | {test['count']} |"
        )
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", help="a dataset in the raw contract (dataset.yaml + exposures/)")
    args = parser.parse_args(argv)
    print(format_table(id_regression_metrics(args.root)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
