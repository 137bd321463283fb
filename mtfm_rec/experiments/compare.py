"""``compare``: models x seeds on one config, the paper's Table 2 in our pipeline.

Jobs: for each model and seed one training job with ``model.name``, ``train.seed`` and
``data.loader.seed`` set; a per-scenario model (:data:`mtfm_rec.model.config.PER_SCENARIO_MODELS`,
as in the paper) is one job per scenario with ``data.scenarios=[<s>]`` whose test metrics of
that scenario are its row's. Every job runs the same config with the same overrides, so the
budget (``train.max_steps`` / ``train.max_minutes``) and the data are the same; each job's test
numbers are of its best validation step (``train.eval_every`` must be set: the checkpoint is
chosen on validation only).

Writes ``<runs>/<name>/compare.json`` (every job and every number), ``compare.md`` (AUC and
GAUC per scenario x task, mean +/- std over seeds; best in bold, second underlined) and
``compare.png``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np

from mtfm_rec.config import ConfigError, load_config
from mtfm_rec.experiments.jobs import Job
from mtfm_rec.model.config import MODEL_NAMES, PER_SCENARIO_MODELS

METRICS = ("auc", "gauc")
Summary = Dict[str, Dict[str, Dict[str, float]]]  # model -> "<s>/<t>" -> {auc_mean, auc_std, ...}


def plan(config: str, models: Sequence[str], seeds: Sequence[int], overrides: Sequence[str]) -> List[Job]:
    """The jobs of a comparison (module docstring).

    Raises:
        ConfigError: an unknown model, no seed, or a config without validation passes.
    """
    unknown = [m for m in models if m not in MODEL_NAMES]
    if unknown or not models:
        raise ConfigError(f"--models: unknown {unknown or 'empty list'}; choose from {MODEL_NAMES}")
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    base = load_config(config, overrides)
    if base.train.eval_every < 1:
        raise ConfigError(
            f"{config}: train.eval_every={base.train.eval_every}; compare chooses each model's "
            "checkpoint on validation, so set train.eval_every > 0"
        )
    if "valid" not in base.train.eval_splits or "test" not in base.train.eval_splits:
        raise ConfigError(
            f"{config}: train.eval_splits must hold valid and test, got {base.train.eval_splits}"
        )
    scenarios = list(dict.fromkeys(k.split("/")[0] for k in metric_keys(config, overrides)))
    jobs: List[Job] = []
    for model in models:
        for seed in seeds:
            common = [*overrides, f"model.name={model}", f"train.seed={seed}", f"data.loader.seed={seed}"]
            if model in PER_SCENARIO_MODELS:
                for s in scenarios:
                    labels = {"model": model, "seed": str(seed), "scenario": s}
                    one = [*common, f"data.scenarios=[{s}]"]
                    jobs.append(Job(f"{model}/seed{seed}/{s}", config, one, labels))
            else:
                jobs.append(Job(f"{model}/seed{seed}", config, common, {"model": model, "seed": str(seed)}))
    return jobs


def metric_keys(config: str, overrides: Sequence[str]) -> List[str]:
    """The "<scenario>/<task>" keys of the config's dataset, in schema order."""
    from mtfm_rec.data.schema import DatasetSchema
    from mtfm_rec.training.metrics import metric_keys as schema_keys

    raw = load_config(config, overrides).data.raw
    if not raw:
        raise ConfigError("data.raw is unset: compare needs the dataset to plan per-scenario jobs")
    return schema_keys(DatasetSchema.load(raw))


def job_rows(jobs: Sequence[Job], root: str) -> Dict[Tuple[str, str], Dict[str, Dict[str, float]]]:
    """(model, seed) -> test metrics per "<scenario>/<task>", a per-scenario model's jobs merged
    (each contributes its own scenario's keys only)."""
    rows: Dict[Tuple[str, str], Dict[str, Dict[str, float]]] = {}
    for job in jobs:
        metrics = job.metrics(root)
        scenario = job.labels.get("scenario")
        if scenario is not None:
            metrics = {k: v for k, v in metrics.items() if k.split("/")[0] == scenario}
        rows.setdefault((job.labels["model"], job.labels["seed"]), {}).update(metrics)
    return rows


def summarize(
    rows: Mapping[Tuple[str, str], Mapping[str, Mapping[str, float]]], keys: Sequence[str]
) -> Summary:
    """Mean and sample std over seeds of each metric of ``keys`` (std 0 with one seed).

    Raises:
        ValueError: a seed lacks a key or has a NaN there (a number would hide it).
    """
    by_model: Dict[str, List[Mapping[str, Mapping[str, float]]]] = {}
    for (model, _), metrics in rows.items():
        by_model.setdefault(model, []).append(metrics)
    out: Summary = {}
    for model, runs in by_model.items():
        out[model] = {}
        for key in keys:
            missing = [i for i, r in enumerate(runs) if key not in r]
            if missing:
                raise ValueError(f"{model} {key}: no test metrics in {len(missing)} of {len(runs)} seed(s)")
            cell: Dict[str, float] = {"seeds": float(len(runs))}
            for metric in METRICS:
                values = np.array([r[key][metric] for r in runs], dtype=np.float64)
                if np.isnan(values).any():
                    raise ValueError(f"{model} {key}: a seed has no {metric} (NaN): {values.tolist()}")
                cell[f"{metric}_mean"] = float(values.mean())
                cell[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            out[model][key] = cell
    return out


def markdown_table(summary: Summary) -> str:
    """Rows = models, columns = AUC and GAUC per scenario x task; best bold, second underlined."""
    models = list(summary)
    keys = list(next(iter(summary.values())))
    head = "| model | " + " | ".join(f"{k} {m.upper()}" for k in keys for m in METRICS) + " |"
    lines = [head, "|---" * (1 + len(keys) * len(METRICS)) + "|"]
    ranks = {
        (k, m): sorted(models, key=lambda name: -summary[name][k][f"{m}_mean"]) for k in keys for m in METRICS
    }
    for model in models:
        cells = []
        for k in keys:
            for m in METRICS:
                c = summary[model][k]
                text = f"{c[f'{m}_mean']:.4f} ± {c[f'{m}_std']:.4f}"
                place = ranks[(k, m)].index(model)
                cells.append(f"**{text}**" if place == 0 else f"<u>{text}</u>" if place == 1 else text)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: Summary, path: str, title: str) -> None:
    """Grouped bars: test AUC per scenario x task, one bar per model, std over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(summary)
    keys = list(next(iter(summary.values())))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(keys)), 4.0))
    for i, model in enumerate(models):
        x = np.arange(len(keys)) + (i - (len(models) - 1) / 2) * width
        mean = [summary[model][k]["auc_mean"] for k in keys]
        std = [summary[model][k]["auc_std"] for k in keys]
        ax.bar(x, mean, width, yerr=std, capsize=2, label=model)
    low = min(summary[m][k]["auc_mean"] for m in models for k in keys)
    ax.set_ylim(max(0.0, math.floor((low - 0.02) * 50) / 50), None)
    ax.set_xticks(np.arange(len(keys)), keys, rotation=20)
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=min(4, len(models)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(jobs: Sequence[Job], root: str, keys: Sequence[str], meta: Mapping[str, object]) -> Summary:
    """Writes compare.json, compare.md and compare.png under ``root`` for the metric ``keys``
    ("<scenario>/<task>", in table order); returns the summary."""
    summary = summarize(job_rows(jobs, root), keys)
    table = markdown_table(summary)
    with open(os.path.join(root, "compare.json"), "w") as fh:
        json.dump(
            {**meta, "jobs": [{"name": j.name, **j.labels} for j in jobs], "summary": summary}, fh, indent=2
        )
    with open(os.path.join(root, "compare.md"), "w") as fh:
        fh.write(f"Test AUC / GAUC, mean ± std over seeds {meta.get('seeds')}; {meta.get('config')}\n\n")
        fh.write(table + "\n")
    plot(summary, os.path.join(root, "compare.png"), f"{os.path.basename(root)}: {meta.get('config')}")
    print(table, flush=True)
    return summary
