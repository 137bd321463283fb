"""Model quality against known optima: MTFM beside Bayes and two logistic regressions.

On a fresh alignment-free synthetic dataset with known truth (``mtfm_rec.data.synthetic``,
100,000 users x 10 days, no ``shared_embeddings``: the model must learn that the exposures'
category columns mean what the history's do), per scenario x task on the test day:

* ``bayes``, ``plug_in_intent``, ``plug_in_posterior``, ``plug_in``, ``plug_in_fit``,
  ``lr_features``, ``lr_history``:
  :mod:`mtfm_rec.bench.references` (the plug-ins estimate what a model that sees only the
  model's inputs can reach: Bayes is not reachable; ``plug_in_fit`` what it costs to learn the
  generator's effects from the training rows, fitted for the sparse scenario only: feed and
  search's millions of rows would make it the bench's slowest part by far);
* ``mtfm``: ``configs/mtfm_small.yaml`` with ``train.max_steps`` raised to what 15 minutes of
  training on 2 CPU cores hold (``train.max_minutes=15`` guards the budget): under one epoch of
  this set. Why 100,000 users and not 30,000 (the set of 2026-12-01/02): on 30,000 the sparse
  scenario has ~130 training exposures per coupon, too few for even ``plug_in_fit`` to reach its
  target (docs/TRAINING.md, "Model quality", findings 9 and 10);
* the target of issue 10: ``max(lr_history + 0.03, (lr_history + bayes) / 2)``.

The feature-only model is left out (``lr_features`` is that bar); ``mtfm_rec.bench.training``
measures throughput.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Dict

from mtfm_rec.bench.references import reference_metrics
from mtfm_rec.bench.training import run_training_job

CONFIG = "configs/mtfm_small.yaml"
MARGIN = 0.03  # above the hand-made-feature regression
FIT_SCENARIOS = ("coupon",)  # plug_in_fit's: the sparse scenario, where finite data costs most


def target_auc(lr_history: float, bayes: float) -> float:
    """The AUC issue 10 asks of MTFM: 0.03 above the regression and half way to Bayes."""
    return max(lr_history + MARGIN, (lr_history + bayes) / 2.0)


def run(quick: bool) -> Dict[str, Any]:
    users, days = (400, 5) if quick else (100000, 10)
    steps, minutes = (60, 0) if quick else (10000, 15)
    out: Dict[str, Any] = {
        "dataset": {
            "generator": "mtfm_rec.data.synthetic",
            "users": users,
            "days": days,
            "shared_embeddings": False,
            "seed": 11,
        },
        "config": CONFIG,
    }
    with tempfile.TemporaryDirectory() as tmp:
        from mtfm_rec.data.synthetic import generate

        raw = os.path.join(tmp, "raw")
        generate(raw, num_users=users, num_days=days, seed=11, shared_embeddings=False)
        out.update(reference_metrics(raw, fit_scenarios=FIT_SCENARIOS))
        print("[bench.quality] references done", flush=True)
        job = run_training_job(
            raw,
            os.path.join(tmp, "mtfm"),
            1,
            [
                f"train.max_steps={steps}",
                f"train.max_minutes={minutes}",
                "train.eval_splits=[test]",
                "train.log_every=250",
            ],
            os.path.join(tmp, "cache"),
            config=CONFIG,
        )
        out["mtfm"] = job["metrics"]  # metrics.json: the test split
        out["mtfm_summary"] = {
            k: job["summary"].get(k) for k in ("step", "samples_seen", "seconds", "samples_per_s")
        }
        out["mtfm_overrides"] = [f"train.max_steps={steps}", f"train.max_minutes={minutes}"]
        print(f"[bench.quality] MTFM done: {out['mtfm_summary']}", flush=True)
    return out


def _auc(result: Dict[str, Any], reference: str, key: str) -> str:
    """A reference's AUC, or '-' where it was not computed (before it existed, or
    ``plug_in_fit`` outside :data:`FIT_SCENARIOS`)."""
    return f"{result[reference][key]['auc']:.4f}" if key in result.get(reference, {}) else "-"


def render(result: Dict[str, Any]) -> str:
    ds = result["dataset"]
    s = result["mtfm_summary"]
    lines = [
        f"Alignment-free synthetic data with known truth ({ds['users']} users x {ds['days']} days, "
        f"seed {ds['seed']}, `{ds['generator']}`, no `shared_embeddings`), test day. "
        f"MTFM: `{result['config']}` "
        f"with {' '.join(f'`{o}`' for o in result['mtfm_overrides'])} "
        f"({s['step']} steps, {s['samples_seen']} samples, "
        f"{s['seconds']:.0f} s of "
        "training on this machine). References: `mtfm_rec.bench.references` (Bayes = the true probabilities; "
        "plug-in = the true logits with the user's taste replaced by its posterior mode given the "
        "visible order history, and the intent either true (not visible), its posterior given the visible "
        "real-time actions (learned from the train split's true hits) or read as one real-time hit; "
        "plug-in, fit = the hit plug-in's two inputs in a logistic regression with every effect learned "
        "from the train split, for the sparse scenario only; LR = logistic regression on the exposure "
        "features, + the two hand-made history features). "
        f"Target: max(LR+history + {MARGIN}, half way from it to Bayes).",
        "",
        "| scenario/task | Bayes | plug-in, true intent | plug-in, posterior | plug-in, hit | plug-in, fit "
        "| LR features | LR + history | MTFM | target | met | gap closed | n |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, bayes in result["bayes"].items():
        lr, mtfm = result["lr_history"][key]["auc"], result["mtfm"][key]["auc"]
        target = target_auc(lr, bayes["auc"])
        closed = (mtfm - lr) / (bayes["auc"] - lr)
        lines.append(
            f"| {key} | {bayes['auc']:.4f} | {_auc(result, 'plug_in_intent', key)} | "
            f"{_auc(result, 'plug_in_posterior', key)} | "
            f"{_auc(result, 'plug_in', key)} | {_auc(result, 'plug_in_fit', key)} | "
            f"{result['lr_features'][key]['auc']:.4f} | {lr:.4f} | "
            f"**{mtfm:.4f}** | {target:.4f} | "
            f"{'yes' if mtfm >= target else 'no'} | {100 * closed:.0f} % | {bayes['count']} |"
        )
    return "\n".join(lines) + "\n"
