"""``compare``: models x seeds on one config, the paper's Table 2 in our pipeline.

Jobs: for each model and seed one training job with ``model.name``, ``train.seed`` and
``data.loader.seed`` set; a per-scenario model (:data:`mtfm_rec.model.config.PER_SCENARIO_MODELS`,
as in the paper) is one job per scenario with ``data.scenarios=[<s>]`` whose test metrics of
that scenario are its row's. Every job runs the same config with the same overrides, so the
budget (``train.max_steps`` / ``train.max_minutes``) and the data are the same; each job's test
numbers are of its best validation step (``train.eval_every`` must be set: the checkpoint is
chosen on validation only).

A model may have a config of its own (``--model-config mtfm=configs/ml1m_swr_mtfm.yaml``, usually
``base:`` the experiment's config plus a ``model:`` section): the paper's baselines were each
tuned, and one shared ``model:`` section suits some models more than others. Its ``data`` and
``train`` sections must resolve to the experiment config's, so the data and budget stay the same.

Writes ``<runs>/<name>/compare.json`` (every job and every number), ``compare.md`` (AUC and
GAUC per scenario x task, mean +/- std over seeds; best in bold, second underlined) and
``compare.png``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import yaml

from mtfm_rec.config import Config, ConfigError, load_config, to_dict
from mtfm_rec.config_parsing import config_diff
from mtfm_rec.experiments.jobs import Job
from mtfm_rec.model.config import MODEL_NAMES, PER_SCENARIO_MODELS

METRICS = ("auc", "gauc")  # the table's columns per scenario x task
STATISTICS = ("auc", "gauc", "logloss")  # summarised over seeds
POOLED = "all"  # "<POOLED>/<task>": every scenario's test exposures of the task pooled
Summary = Dict[str, Dict[str, Dict[str, float]]]  # model -> "<s>/<t>" -> {auc_mean, auc_std, ...}


def plan(
    config: str,
    models: Sequence[str],
    seeds: Sequence[int],
    overrides: Sequence[str],
    model_configs: Optional[Mapping[str, str]] = None,
) -> List[Job]:
    """The jobs of a comparison (module docstring); ``model_configs``: model -> its own config.

    Raises:
        ConfigError: an unknown model, no seed, a config without validation passes, or a model's
            config whose data or training differs from the experiment's.
    """
    model_configs = dict(model_configs or {})
    unknown = [m for m in [*models, *model_configs] if m not in MODEL_NAMES]
    if unknown or not models:
        raise ConfigError(f"--models: unknown {unknown or 'empty list'}; choose from {MODEL_NAMES}")
    stray = [m for m in model_configs if m not in models]
    if stray:
        raise ConfigError(f"--model-config for {stray}, which --models does not list")
    base = experiment_config(config, overrides, seeds)
    for model, path in model_configs.items():
        same_data_and_budget(base, load_config(path, overrides), f"--model-config {model}={path}")
    scenarios = list(dict.fromkeys(k.split("/")[0] for k in metric_keys(config, overrides)))
    jobs: List[Job] = []
    for model in models:
        model_config = model_configs.get(model, config)
        for seed in seeds:
            common = [*overrides, f"model.name={model}", f"train.seed={seed}", f"data.loader.seed={seed}"]
            if model in PER_SCENARIO_MODELS:
                for s in scenarios:
                    labels = {"model": model, "seed": str(seed), "scenario": s}
                    one = [*common, f"data.scenarios=[{s}]"]
                    jobs.append(Job(f"{model}/seed{seed}/{s}", model_config, one, labels))
            else:
                labels = {"model": model, "seed": str(seed)}
                jobs.append(Job(f"{model}/seed{seed}", model_config, common, labels))
    return jobs


def same_data_and_budget(base: Config, other: Config, where: str) -> None:
    """Refuses a model's own config that trains on other data or with another budget.

    Raises:
        ConfigError: naming ``where`` and each differing ``data.*`` / ``train.*`` key.
    """
    changed = config_diff(
        {"data": to_dict(base.data), "train": to_dict(base.train)},
        {"data": to_dict(other.data), "train": to_dict(other.train)},
    )
    if changed:
        diff = "; ".join(f"{k}: {b!r}, not {a!r}" for k, (a, b) in changed.items())
        raise ConfigError(
            f"{where}: a model's own config may change its model section only, so every model "
            f"sees the same data and budget ({diff})"
        )


def experiment_config(config: str, overrides: Sequence[str], seeds: Sequence[int]) -> Config:
    """The config every job of an experiment starts from, checked for what a fair comparison
    needs: at least one seed, validation passes (each job's checkpoint is chosen on validation
    only) and both the valid and test splits evaluated.

    Raises:
        ConfigError: naming the setting.
    """
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    base = load_config(config, overrides)
    if base.train.eval_every < 1:
        raise ConfigError(
            f"{config}: train.eval_every={base.train.eval_every}; an experiment chooses each job's "
            "checkpoint on validation, so set train.eval_every > 0"
        )
    if "valid" not in base.train.eval_splits or "test" not in base.train.eval_splits:
        raise ConfigError(
            f"{config}: train.eval_splits must hold valid and test, got {base.train.eval_splits}"
        )
    return base


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


def pooled_rows(jobs: Sequence[Job], root: str) -> Dict[Tuple[str, str], Dict[str, Dict[str, float]]]:
    """(model, seed) -> metrics of ``"all/<task>"``: each task over every scenario's test
    exposures pooled (the "Total" of the Scenario-Wise Rec benchmark's Table 7), from the jobs'
    ``predictions.parquet`` (``train.save_predictions=true``); empty when a job has none."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from mtfm_rec.training.metrics import compute_key_metrics

    paths = [os.path.join(j.run_dir(root), "predictions.parquet") for j in jobs]
    if not all(os.path.exists(p) for p in paths):
        return {}
    tables: Dict[Tuple[str, str], List[pa.Table]] = {}
    for job, path in zip(jobs, paths):
        table = pq.read_table(path, columns=["scenario", "task", "user_id", "label", "score"])
        scenario = job.labels.get("scenario")
        if scenario is not None:  # a one-scenario job predicts only its own scenario's rows
            table = table.filter(pc.equal(table["scenario"], scenario))
        tables.setdefault((job.labels["model"], job.labels["seed"]), []).append(table)
    out: Dict[Tuple[str, str], Dict[str, Dict[str, float]]] = {}
    for key, parts in tables.items():
        table = pa.concat_tables(parts)
        out[key] = {}
        for task in dict.fromkeys(table["task"].to_pylist()):
            rows = table.filter(pc.equal(table["task"], task))
            out[key][f"{POOLED}/{task}"] = compute_key_metrics(
                rows["score"].to_numpy(), rows["label"].to_numpy(), rows["user_id"].to_numpy(), task
            )
    return out


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
            for metric in STATISTICS:
                values = np.array([r[key][metric] for r in runs], dtype=np.float64)
                if np.isnan(values).any():
                    raise ValueError(f"{model} {key}: a seed has no {metric} (NaN): {values.tolist()}")
                cell[f"{metric}_mean"] = float(values.mean())
                cell[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            out[model][key] = cell
    return out


def markdown_table(summary: Summary, keys: Sequence[str], metrics: Sequence[str] = METRICS) -> str:
    """Rows = models, columns = ``metrics`` per key ("<scenario>/<task>"); the best of each
    column in bold, the second underlined (lower is better for logloss); ``mean ± std``, the
    mean alone where one seed ran."""
    models = list(summary)
    head = "| model | " + " | ".join(f"{k} {m.upper()}" for k in keys for m in metrics) + " |"
    lines = [head, "|---" * (1 + len(keys) * len(metrics)) + "|"]
    sign = {m: 1.0 if m == "logloss" else -1.0 for m in metrics}
    ranks = {
        (k, m): sorted(models, key=lambda name: sign[m] * summary[name][k][f"{m}_mean"])
        for k in keys
        for m in metrics
    }
    for model in models:
        cells = []
        for k in keys:
            for m in metrics:
                c = summary[model][k]
                text = f"{c[f'{m}_mean']:.4f}"
                if c["seeds"] > 1:  # one seed has no spread: a "± 0" would claim one
                    text += f" ± {c[f'{m}_std']:.4f}"
                place = ranks[(k, m)].index(model)
                cells.append(f"**{text}**" if place == 0 else f"<u>{text}</u>" if place == 1 else text)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _seed_label(model: str, seeds: float) -> str:
    """``"mtfm (3 seeds)"``: the legend entry of a model averaged over ``seeds`` runs."""
    n = int(seeds)
    return f"{model} ({n} seed{'s' if n != 1 else ''})"


def plot(summary: Summary, keys: Sequence[str], path: str, title: str) -> None:
    """Grouped bars: test AUC per key, one bar per model, std over seeds as error bars; the
    legend gives each model's seed count, so a bar without an error bar reads as one seed,
    not as no spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(summary)
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(keys)), 4.0))
    for i, model in enumerate(models):
        x = np.arange(len(keys)) + (i - (len(models) - 1) / 2) * width
        mean = [summary[model][k]["auc_mean"] for k in keys]
        std = [summary[model][k]["auc_std"] for k in keys]
        ax.bar(
            x, mean, width, yerr=std, capsize=2, label=_seed_label(model, summary[model][keys[0]]["seeds"])
        )
    low = min(summary[m][k]["auc_mean"] for m in models for k in keys)
    ax.set_ylim(max(0.0, math.floor((low - 0.02) * 50) / 50), None)
    ax.set_xticks(np.arange(len(keys)), keys, rotation=20)
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=min(4, len(models)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fit_entry(job: Job, root: str) -> Dict[str, Any]:
    """The job's ``fit()`` wall time (a resumed job's last part only), its last and best
    validation step and its step cap: a best step at the cap means a run that was still
    improving when the budget stopped it, not a converged one."""
    run_dir = job.run_dir(root)
    with open(os.path.join(run_dir, "fit_summary.json")) as fh:
        fit = json.load(fh)
    with open(os.path.join(run_dir, "config.yaml")) as fh:
        max_steps = (yaml.safe_load(fh) or {}).get("train", {}).get("max_steps")
    return {
        "fit_seconds": float(fit.get("seconds", 0.0)),
        "steps": fit.get("step"),
        "best_step": (fit.get("best") or {}).get("step"),
        "max_steps": max_steps,
    }


def report(jobs: Sequence[Job], root: str, keys: Sequence[str], meta: Mapping[str, object]) -> Summary:
    """Writes compare.json, compare.md and compare.png under ``root`` for the metric ``keys``
    ("<scenario>/<task>", in table order); returns the summary."""
    rows = job_rows(jobs, root)
    pooled = pooled_rows(jobs, root)
    for key, metrics in pooled.items():
        rows[key].update(metrics)
    pooled_keys = list(next(iter(pooled.values()))) if pooled else []
    summary = summarize(rows, [*keys, *pooled_keys])
    table = markdown_table(summary, keys)
    if pooled_keys:
        table += "\n\nPooled over scenarios (test AUC / GAUC / logloss):\n\n"
        table += markdown_table(summary, pooled_keys, ("auc", "gauc", "logloss"))
    with open(os.path.join(root, "compare.json"), "w") as fh:
        entries = [{"name": j.name, **j.labels, **_fit_entry(j, root)} for j in jobs]
        fit = sum(e["fit_seconds"] for e in entries)
        json.dump({**meta, "jobs": entries, "fit_seconds": fit, "summary": summary}, fh, indent=2)
    with open(os.path.join(root, "compare.md"), "w") as fh:
        fh.write(f"Test AUC / GAUC, mean ± std over seeds {meta.get('seeds')}; {meta.get('config')}\n\n")
        fh.write(table + "\n")
    title = f"{os.path.basename(root)}: {meta.get('config')}"
    plot(summary, [*keys, *pooled_keys], os.path.join(root, "compare.png"), title)
    print(table, flush=True)
    return summary
