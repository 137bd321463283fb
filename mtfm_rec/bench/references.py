"""Reference scores for a synthetic dataset with known truth: Bayes and two logistic regressions.

    python -m mtfm_rec.bench.references data/q3k            # prints the table, writes nothing

On a dataset written by ``mtfm_rec.data.synthetic`` (which stores the true probability of every
label under ``truth/``), the test split (``ts >= recommended_eval_after``) is scored three ways,
per scenario x task, with the trainer's exact AUC / GAUC (``compute_key_metrics``):

* ``bayes``: the true probabilities. No model can beat them in expectation; a model above them
  by more than noise reads something it should not (a leak).
* ``plug_in`` and ``plug_in_intent``: the generator's own logits (it knows every item bias and
  feature effect: no estimation error) with the one thing a model cannot see, the user's taste,
  replaced by its posterior mode given what the model sees of it, the categories of the last
  ``max_len`` orders before the window (:meth:`_World.map_taste`). ``plug_in`` also replaces the
  true intent hit by ``realtime_hit`` below (a crude reading of the real-time sequence: a
  background click of the category counts as intent); ``plug_in_intent`` keeps the true one, which
  no model sees. What a model can reach lies near the two: above ``plug_in`` where it reads the
  intent better than one hit, below ``plug_in_intent`` (both ignore the taste the real-time clicks
  reveal, and use the posterior mode, not the mean of the probability).
* ``plug_in_posterior``: the same with the intent hit replaced by its posterior probability
  given a summary of the visible real-time actions, learned from the train split's true hits
  (:mod:`mtfm_rec.bench.intent_posterior`): an estimate of what reading the real-time sequence
  can tell of the intent, between the two above.
* ``plug_in_fit``: the cost of finite data. A logistic regression as ``lr_features`` plus the
  plug-in's two inputs, ``taste_affinity`` (the posterior-mode taste . the candidate's category
  vector) and ``realtime_hit``, with every effect (each item's bias, the feature effects, the
  weights of the two inputs) learned from the train split instead of known. It knows the
  generator's form and its taste model, which no model is told; what it loses against
  ``plug_in`` is what estimating the effects from the scenario's training rows costs (large in a
  sparse scenario: ~130 training exposures per coupon item).
* ``lr_features``: a logistic regression on the exposure's own features (every categorical
  column one-hot, every dense column standardised), trained on the train split
  (``ts < recommended_valid_after``) with its L2 strength chosen on the valid split.
* ``lr_history``: the same plus two hand-made history features, the bar of issue 10:
  ``history_share``, the share of the user's last ``max_len`` history actions before the window
  in the candidate's category, and ``realtime_hit``, whether a real-time action earlier the same
  window (``ts`` strictly smaller) had the candidate's category. The candidate's category is
  the generator's global one (search's ``poi_cat`` is a permutation of it): an engineer who
  builds these features knows the mapping; MTFM must learn it.

Both regressions see only what the model sees (nothing after the exposure's ``ts``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import torch

from mtfm_rec.bench.intent_posterior import SUMMARIES, IntentPosterior
from mtfm_rec.bench.sort_keys import sort_keys
from mtfm_rec.data.reader import read_parquet_folder
from mtfm_rec.data.schema import DatasetSchema, ScenarioSpec
from mtfm_rec.data.synthetic import (
    ITEM_ID_COLUMN,
    ORDER_TASTE_WEIGHT,
    SyntheticConfig,
    _World,
    generator_config,
    read_truth,
    world_of,
)
from mtfm_rec.training.metrics import compute_key_metrics

REFERENCES = (
    "bayes",
    "plug_in_intent",
    "plug_in_posterior",
    "plug_in",
    "plug_in_fit",
    "lr_features",
    "lr_history",
)
PLUG_INS = ("plug_in", "plug_in_intent", "plug_in_posterior", "plug_in_fit")  # they replay the world
L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3)  # per-sample mean penalty; chosen on the valid split
WINDOW_SECONDS = 86400  # the aggregation default: one sample = one user-day


def _aligned(root: str, scenario: ScenarioSpec) -> Tuple[pa.Table, pa.Table]:
    """The scenario's exposures and truth, row-aligned (checked on the repeated columns)."""
    exposures = read_parquet_folder(root, f"exposures/{scenario.name}")
    truth = read_truth(root, scenario.name)
    for column in ("user_id", "ts", "request_id", *scenario.tasks):
        if not exposures[column].equals(truth[column]):
            raise ValueError(
                f"{root}: truth/{scenario.name} does not follow exposures/{scenario.name} row by row "
                f"(column {column!r} differs); regenerate the dataset"
            )
    return exposures, truth


class HistoryFeatures:
    """The two hand-made features of every exposure, from the shared behaviour sequences."""

    def __init__(self, root: str, schema: DatasetSchema, num_categories: int) -> None:
        self.num_categories = num_categories
        history = [q for q in schema.sequences if q.kind == "history"]
        realtime = [q for q in schema.sequences if q.kind == "realtime"]
        self.max_len = history[0].max_len
        self.history = self._by_user(read_parquet_folder(root, f"behaviors/{history[0].name}"))
        self.realtime = self._by_user(read_parquet_folder(root, f"behaviors/{realtime[0].name}"))
        # history_cum[i] = per-category counts over the first i history actions (built once: every
        # scenario's features and the plug-ins read windows of it)
        onehot = np.zeros((len(self.history["user"]) + 1, num_categories), np.int32)
        onehot[np.arange(1, len(self.history["user"]) + 1), self.history["category"]] = 1
        self.history_cum = np.cumsum(onehot, axis=0)

    @staticmethod
    def _by_user(table: pa.Table) -> Dict[str, np.ndarray]:
        user, ts, cat = (table[c].to_numpy().astype(np.int64) for c in ("user_id", "ts", "category"))
        order = np.lexsort((ts, user))
        return {"user": user[order], "ts": ts[order], "category": cat[order]}

    def category_counts(self, user: np.ndarray, window_start: np.ndarray) -> np.ndarray:
        """``[n, num_categories]`` counts of the last ``max_len`` history actions with
        ``ts < window_start``, per category."""
        h = self.history
        keys, queries = sort_keys(h["user"], h["ts"], user, window_start)
        end = np.searchsorted(keys, queries, side="left")  # first action at or after window_start
        start = np.maximum(np.searchsorted(h["user"], user, side="left"), end - self.max_len)
        return self.history_cum[end] - self.history_cum[start]

    def history_share(self, user: np.ndarray, window_start: np.ndarray, category: np.ndarray) -> np.ndarray:
        """Share of the last ``max_len`` history actions with ``ts < window_start`` in ``category``."""
        counts = self.category_counts(user, window_start)
        total = counts.sum(axis=1)
        hits = counts[np.arange(len(category)), category]
        return np.where(total > 0, hits / np.maximum(total, 1), 0.0)

    def realtime_hit(
        self, user: np.ndarray, ts: np.ndarray, window_start: np.ndarray, category: np.ndarray
    ) -> np.ndarray:
        """1 where a real-time action of ``category`` has ``window_start <= ts' < ts``."""
        r = self.realtime
        group = r["user"] * self.num_categories + r["category"]
        order = np.lexsort((r["ts"], group))
        q_group = user * self.num_categories + category
        n = len(user)
        keys, queries = sort_keys(
            group[order],
            r["ts"][order],
            np.concatenate([q_group, q_group]),
            np.concatenate([ts, window_start]),
        )
        below = np.searchsorted(keys, queries, side="left")  # actions strictly before each bound
        return (below[:n] > below[n:]).astype(np.float64)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1.0 - 1e-12)
    return np.log(p) - np.log1p(-p)


class TasteModes:
    """The posterior-mode taste (:meth:`_World.map_taste`) of every (user, window) of the rows it
    is built from, each window solved once however many scenarios' rows share it."""

    def __init__(
        self, world: _World, history: HistoryFeatures, user: np.ndarray, window_start: np.ndarray
    ) -> None:
        windows = np.unique(np.stack([user, window_start], axis=1), axis=0)  # sorted by (user, start)
        counts = history.category_counts(windows[:, 0], windows[:, 1]).astype(np.float64)
        self._windows = windows
        self._taste = world.map_taste(counts, windows[:, 0])

    def __call__(self, user: np.ndarray, window_start: np.ndarray) -> np.ndarray:
        """``[n, LATENT_DIM]`` tastes of the rows' windows (each must be among those built)."""
        keys, queries = sort_keys(self._windows[:, 0], self._windows[:, 1], user, window_start)
        at = np.minimum(np.searchsorted(keys, queries), len(keys) - 1)
        if len(queries) and not np.array_equal(keys[at], queries):
            raise KeyError("TasteModes: a row's (user, window) was not among those it was built from")
        return self._taste[at]


def plug_in_scores(
    cfg: SyntheticConfig,
    world: _World,
    scenario: ScenarioSpec,
    exposures: pa.Table,
    truth: pa.Table,
    taste: np.ndarray,
    hits: Mapping[str, np.ndarray],
) -> Dict[str, Dict[str, np.ndarray]]:
    """``{name: {task: probabilities}}`` of the rows of ``exposures`` for each ``name`` of
    ``hits`` (module docstring): the true logits with ``taste . item`` replaced by the rows'
    posterior-mode ``taste``'s and the intent hit by ``hits[name]``, the probability of a hit
    (0/1 for a hit read as certain), over which the click probability is averaged."""
    local = exposures[ITEM_ID_COLUMN[scenario.name]].to_numpy().astype(np.int64)
    items = world.ranges[scenario.name][0] + local
    error = np.einsum("nk,nk->n", taste, world.item_vec[items]) - truth["affinity"].to_numpy()
    intent = truth["intent_hit"].to_numpy().astype(np.float64)
    p_click = truth["p_click"].to_numpy()
    weight = cfg.intent_weight[scenario.name]
    # the click logit without its intent term
    z = _logit(p_click) + cfg.taste_weight[scenario.name] * error - weight * intent
    out: Dict[str, Dict[str, np.ndarray]] = {}
    for name, hit in hits.items():
        click = hit / (1.0 + np.exp(-(z + weight))) + (1.0 - hit) / (1.0 + np.exp(-z))
        out[name] = {"click": click}
        if "order" in scenario.tasks:
            z_order = _logit(truth["p_order"].to_numpy() / p_click)
            z_order = z_order + ORDER_TASTE_WEIGHT[scenario.name] * error
            out[name]["order"] = click / (1.0 + np.exp(-z_order))
    return out


def design_matrix(exposures: pa.Table, scenario: ScenarioSpec) -> Tuple[np.ndarray, np.ndarray, int]:
    """(one-hot column index [n, c] int64, dense values [n, d] float64, column count) of the
    exposure's own features: each categorical column gets its own id range, nulls one more id."""
    index, offset = [], 0
    for _, column, _ in scenario.categorical():
        col = exposures[column].combine_chunks()
        values = col.fill_null(-1).to_numpy().astype(np.int64)
        _, dense_id = np.unique(values, return_inverse=True)
        index.append(offset + dense_id)
        offset += int(dense_id.max(initial=0)) + 1
    dense = [exposures[c].to_numpy().astype(np.float64) for c in scenario.dense_features]
    dense_arr = np.stack(dense, axis=1) if dense else np.zeros((exposures.num_rows, 0))
    return np.stack(index, axis=1), dense_arr, offset


def fit_logistic(
    onehot: np.ndarray, dense: np.ndarray, num_ids: int, labels: np.ndarray, split: np.ndarray
) -> np.ndarray:
    """Probabilities ``[n]`` of every row under an L2 logistic regression trained on split 0.

    Args:
        onehot: [n, c] column ids into one weight vector of ``num_ids`` entries.
        dense: [n, d] dense inputs, standardised here with the train split's moments.
        labels: [n] 0/1.
        split: [n] 0 train, 1 valid (chooses the L2 strength by log loss), 2 test.
    """
    train = split == 0
    mean, std = dense[train].mean(axis=0), dense[train].std(axis=0) + 1e-6
    x_dense = torch.from_numpy((dense - mean) / std)
    ids = torch.from_numpy(onehot)
    y = torch.from_numpy(labels.astype(np.float64))
    best: Tuple[float, np.ndarray] = (float("inf"), np.zeros(0))
    weights: Tuple[torch.Tensor, ...] | None = None
    # strongest penalty first, each fit starting from the previous optimum (a few steps away)
    for l2 in sorted(L2_GRID, reverse=True):
        weights = _lbfgs(ids[train], x_dense[train], y[train], num_ids, l2, weights)
        logits = _logits(ids, x_dense, weights).numpy()
        valid = split == 1
        p = np.clip(1.0 / (1.0 + np.exp(-logits[valid])), 1e-7, 1 - 1e-7)
        loss = float(-np.mean(labels[valid] * np.log(p) + (1 - labels[valid]) * np.log(1 - p)))
        if loss < best[0]:
            best = (loss, 1.0 / (1.0 + np.exp(-logits)))
    return best[1]


def _logits(ids: torch.Tensor, dense: torch.Tensor, w: Tuple[torch.Tensor, ...]) -> torch.Tensor:
    table, linear, bias = w
    return table[ids].sum(dim=1) + dense @ linear + bias


def _lbfgs(
    ids: torch.Tensor,
    dense: torch.Tensor,
    y: torch.Tensor,
    num_ids: int,
    l2: float,
    init: Tuple[torch.Tensor, ...] | None = None,
) -> Tuple[torch.Tensor, ...]:
    """(id table, dense weights, bias) minimising the penalised log loss, from ``init`` or 0."""
    if init is None:
        init = (
            torch.zeros(num_ids, dtype=torch.float64),
            torch.zeros(dense.shape[1], dtype=torch.float64),
            torch.zeros((), dtype=torch.float64),
        )
    w = tuple(t.clone().requires_grad_(True) for t in init)
    opt = torch.optim.LBFGS(w, lr=1.0, max_iter=200, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(_logits(ids, dense, w), y)
        loss = loss + l2 * (w[0].pow(2).sum() + w[1].pow(2).sum())
        loss.backward()
        return loss

    opt.step(closure)
    return tuple(t.detach() for t in w)


def reference_metrics(
    root: str,
    names: Sequence[str] = REFERENCES,
    fit_scenarios: Optional[Sequence[str]] = None,
    intent_summary: str = "timed",
) -> Dict[str, Dict[str, Dict[str, float]]]:
    """``{reference: {"<scenario>/<task>": metrics}}`` on the test split of a synthetic dataset,
    for the references in ``names`` (each regression is a few L-BFGS fits per scenario x task).

    ``fit_scenarios``: the scenarios ``plug_in_fit`` is computed for (``None``: every one). Its
    posterior tastes cover every training window of a scenario and its fits every training row,
    the slowest reference by far (most of the 25 minutes all references took on 30,000 users; it
    grows with the rows), while it tells most where data is scarce; the other scenarios have no
    ``plug_in_fit`` entry.

    ``intent_summary``: the summary of the visible actions ``plug_in_posterior`` reads, one of
    :data:`mtfm_rec.bench.intent_posterior.SUMMARIES` (``timed``, the default; the time-free
    ``ordered`` and ``day_count`` measure what the times are worth).

    Runs on one torch thread: the regressions are many small gathers, which extra threads only
    slow down (measured 5.5 s on one thread against 117 s on two busy cores, 600 users).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference_metrics(root, names, fit_scenarios, intent_summary)
    finally:
        torch.set_num_threads(threads)


def _reference_metrics(
    root: str, names: Sequence[str], fit_scenarios: Optional[Sequence[str]], intent_summary: str
) -> Dict[str, Dict[str, Dict[str, float]]]:
    unknown = sorted(set(names) - set(REFERENCES))
    if unknown:
        raise ValueError(f"unknown reference(s) {unknown}; expected some of {list(REFERENCES)}")
    if intent_summary not in SUMMARIES:
        raise ValueError(f"unknown intent_summary {intent_summary!r}; expected one of {list(SUMMARIES)}")
    schema = DatasetSchema.load(f"{root.rstrip('/')}/dataset.yaml")
    scenario_names = [s.name for s in schema.scenarios]
    if fit_scenarios is None:
        fit_scenarios = scenario_names
    elif set(fit_scenarios) - set(scenario_names):
        raise ValueError(
            f"fit_scenarios {sorted(set(fit_scenarios) - set(scenario_names))} are not scenarios "
            f"of {root}/dataset.yaml ({scenario_names})"
        )
    fitted = set(fit_scenarios) if "plug_in_fit" in names else set()
    valid_after = int(schema.extra["recommended_valid_after"])
    eval_after = int(schema.extra["recommended_eval_after"])
    cfg = generator_config(schema)
    history = HistoryFeatures(root, schema, cfg.num_categories)
    loaded = {scenario.name: _aligned(root, scenario) for scenario in schema.scenarios}
    world, tastes = None, None
    if set(PLUG_INS) & set(names):
        world = world_of(cfg)
        users, starts = [], []
        for scenario_name, (exposures, _) in loaded.items():
            ts = exposures["ts"].to_numpy()
            # plug_in_fit trains on every split; the other plug-ins score the test split alone
            keep = ts >= (np.iinfo(np.int64).min if scenario_name in fitted else eval_after)
            users.append(exposures["user_id"].to_numpy()[keep])
            starts.append((ts - np.mod(ts, WINDOW_SECONDS))[keep])
        tastes = TasteModes(world, history, np.concatenate(users), np.concatenate(starts))
    posteriors = (
        _intent_posteriors(loaded, history, valid_after, eval_after, intent_summary)
        if "plug_in_posterior" in names
        else {}
    )
    out: Dict[str, Dict[str, Dict[str, float]]] = {name: {} for name in REFERENCES if name in names}
    for scenario in schema.scenarios:
        exposures, truth = loaded[scenario.name]
        ts = exposures["ts"].to_numpy()
        split = np.where(ts >= eval_after, 2, np.where(ts >= valid_after, 1, 0))
        asked = [name for name in out if name != "plug_in_fit" or scenario.name in fitted]
        scores = _scenario_scores(
            scenario,
            exposures,
            truth,
            split,
            history,
            asked,
            world,
            tastes,
            cfg,
            posteriors.get(scenario.name),
        )
        labels_user = exposures["user_id"].to_numpy()[split == 2]
        for name, by_task in scores.items():
            for task, score in by_task.items():
                key = f"{scenario.name}/{task}"
                labels = exposures[task].to_numpy().astype(np.int8)[split == 2]
                out[name][key] = compute_key_metrics(score, labels, labels_user, key=key)
    return out


def _scenario_scores(
    scenario: ScenarioSpec,
    exposures: pa.Table,
    truth: pa.Table,
    split: np.ndarray,
    history: HistoryFeatures,
    names: Sequence[str],
    world: _World | None,
    tastes: TasteModes | None,
    cfg: SyntheticConfig,
    intent_posterior: np.ndarray | None = None,
) -> Dict[str, Dict[str, np.ndarray]]:
    """``{reference: {task: test-split probabilities}}`` of one scenario (``intent_posterior``:
    the test rows' probability of an intent hit, for ``plug_in_posterior``)."""
    user, ts = exposures["user_id"].to_numpy(), exposures["ts"].to_numpy()
    category = truth["category"].to_numpy().astype(np.int64)
    window_start = ts - np.mod(ts, WINDOW_SECONDS)
    test = split == 2
    onehot, dense, num_ids = design_matrix(exposures, scenario)
    hit = history.realtime_hit(user, ts, window_start, category)
    inputs = {
        "lr_features": dense,
        "lr_history": np.column_stack([dense, history.history_share(user, window_start, category), hit]),
    }
    out: Dict[str, Dict[str, np.ndarray]] = {}
    hits = {
        "plug_in_intent": truth["intent_hit"].to_numpy()[test].astype(np.float64),
        "plug_in_posterior": intent_posterior,
        "plug_in": hit[test],
    }
    hits = {name: q for name, q in hits.items() if name in names and q is not None}
    if world is not None and tastes is not None and hits:
        keep = pa.array(test)
        out = plug_in_scores(
            cfg,
            world,
            scenario,
            exposures.filter(keep),
            truth.filter(keep),
            tastes(user[test], window_start[test]),
            hits,
        )
    if world is not None and tastes is not None and "plug_in_fit" in names:
        affinity = np.einsum("nk,nk->n", tastes(user, window_start), world.cat_vec[category])
        inputs["plug_in_fit"] = np.column_stack([dense, affinity, hit])
    out = {name: out[name] for name in out if name in names}
    for task in scenario.tasks:
        labels = exposures[task].to_numpy().astype(np.int8)
        if "bayes" in names:
            out.setdefault("bayes", {})[task] = truth[f"p_{task}"].to_numpy()[test]
        for name in names:
            if name in inputs:
                scores = fit_logistic(onehot, inputs[name], num_ids, labels, split)
                out.setdefault(name, {})[task] = scores[test]
    return out


def _intent_posteriors(
    loaded: Mapping[str, Tuple[pa.Table, pa.Table]],
    history: HistoryFeatures,
    valid_after: int,
    eval_after: int,
    summary_name: str,
) -> Dict[str, np.ndarray]:
    """``{scenario: [test rows] P(intent hit | visible real-time actions)}`` under the summary
    named, learned from the train split of every scenario at once (:class:`IntentPosterior`)."""
    summary = SUMMARIES[summary_name]
    cells, train, test = {}, [], []
    for name, (exposures, truth) in loaded.items():
        user, ts = exposures["user_id"].to_numpy(), exposures["ts"].to_numpy()
        category = truth["category"].to_numpy().astype(np.int64)
        cells[name] = summary.cells(history.realtime, user, ts, ts - np.mod(ts, WINDOW_SECONDS), category)
        is_train = ts < valid_after
        train.append(
            ({c: v[is_train] for c, v in cells[name].items()}, truth["intent_hit"].to_numpy()[is_train])
        )
        test.append(ts >= eval_after)
    fit_cells = {c: np.concatenate([part[c] for part, _ in train]) for c in summary.sizes}
    posterior = IntentPosterior(fit_cells, np.concatenate([hits for _, hits in train]), summary.sizes)
    return {
        name: posterior({c: v[is_test] for c, v in cells[name].items()}) for name, is_test in zip(cells, test)
    }


def format_table(metrics: Mapping[str, Mapping[str, Mapping[str, float]]], columns: List[str]) -> str:
    """A Markdown table, a row per scenario x task; '-' where a reference was not computed
    (``plug_in_fit`` outside ``fit_scenarios``)."""
    keys = list(dict.fromkeys(key for c in columns for key in metrics[c]))
    lines = [
        "| scenario/task | " + " | ".join(f"{c} AUC" for c in columns) + " | test n |",
        "|---" * (len(columns) + 2) + "|",
    ]
    for key in keys:
        cells = [metrics[c].get(key) for c in columns]
        aucs = " | ".join("-" if m is None else f"{m['auc']:.4f}" for m in cells)
        count = next(m["count"] for m in cells if m is not None)
        lines.append(f"| {key} | {aucs} | {count} |")
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", help="a dataset written by mtfm_rec.data.synthetic")
    parser.add_argument(
        "--fit-scenarios",
        default=None,
        help="comma-separated scenarios to compute plug_in_fit for (default: every scenario)",
    )
    parser.add_argument(
        "--intent-summary",
        default="timed",
        choices=list(SUMMARIES),
        help="what plug_in_posterior reads of the real-time actions (default: timed)",
    )
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated references to compute (default: all of {list(REFERENCES)})",
    )
    args = parser.parse_args(argv)
    fit = None if args.fit_scenarios is None else [s for s in args.fit_scenarios.split(",") if s]
    names = REFERENCES if args.only is None else tuple(s for s in args.only.split(",") if s)
    metrics = reference_metrics(args.root, names, fit_scenarios=fit, intent_summary=args.intent_summary)
    print(format_table(metrics, list(metrics)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
