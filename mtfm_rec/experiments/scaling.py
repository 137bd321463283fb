"""``scaling``: paper Figure 4, quality against (a) model size and (b) data seen.

(a) A ladder of MTFM sizes (``--sizes``, each ``D x B x H``: d_model, blocks of the config's
(K:P) stack, query heads; one kv head: GQA), trained with the config's budget and seeds, and a
baseline (``--baseline``, default ``mmoe``) beside them. Each point is the test GAUC per scenario
x task against the inference GFLOPs per sample, counted by ``torch.utils.flop_counter`` on a
forward of one validation batch with the reference attention (so MTFM and the baseline are
counted alike; it counts the padded attention blocks). The table gives each key's fitted slope:
GAUC per decade of FLOPs, over the MTFM sizes.

(b) For the smallest, the middle and the largest size: validation GAUC (the mean over scenario x
task, from the evaluations during training, ``log.csv``) against training tokens seen, which is
the samples seen times the training split's mean tokens per sample (measured on its first 20
batches).

Writes ``<runs>/<name>/scaling.{json,md}``, ``scaling_size.png`` and ``scaling_data.png``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from mtfm_rec.config import ConfigError, load_config
from mtfm_rec.experiments import compare
from mtfm_rec.experiments.jobs import Job

DEFAULT_SIZES = ("16x1x1", "32x1x2", "48x2x2", "64x2x4", "96x3x4")
_SIZE = re.compile(r"^(\d+)x(\d+)x(\d+)$")


def size_overrides(text: str) -> List[str]:
    """``DxBxH`` -> the model overrides of that size (a ``ConfigError`` naming the rule otherwise)."""
    match = _SIZE.match(text.strip())
    if not match or min(int(g) for g in match.groups()) < 1:
        raise ConfigError(
            f"--sizes: {text!r} is not DxBxH (d_model x blocks x heads, each >= 1), e.g. 64x2x4"
        )
    d, b, h = (int(g) for g in match.groups())
    if d % h:
        raise ConfigError(f"--sizes: {text!r}: d_model {d} is not divisible by {h} heads")
    return [f"model.d_model={d}", f"model.num_blocks={b}", f"model.num_heads={h}", "model.num_kv_heads=1"]


def plan(
    config: str, sizes: Sequence[str], seeds: Sequence[int], overrides: Sequence[str], baseline: str = "mmoe"
) -> List[Job]:
    """One MTFM job per size and seed, then the baseline's jobs (``compare.plan``)."""
    compare.experiment_config(config, overrides, seeds)
    if len(sizes) < 2:
        raise ConfigError("--sizes: a ladder needs at least 2 sizes")
    jobs = []
    for size in sizes:
        for seed in seeds:
            common = [
                *overrides,
                "model.name=mtfm",
                *size_overrides(size),
                f"train.seed={seed}",
                f"data.loader.seed={seed}",
            ]
            jobs.append(
                Job(
                    f"mtfm_{size}/seed{seed}",
                    config,
                    common,
                    {"model": size, "seed": str(seed), "size": size},
                )
            )
    if baseline:
        jobs += compare.plan(config, [baseline], seeds, overrides)
    return jobs


def _job_config(job: Job) -> Any:
    return load_config(job.config, job.overrides)


def counted_gflops(job: Job) -> float:
    """Inference GFLOPs per sample of ``job``'s model on one validation batch (module docstring)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mtfm_rec.data.aggregate import ensure_aggregated
    from mtfm_rec.data.config import fill_recommended_splits
    from mtfm_rec.data.loader import ResumableLoader
    from mtfm_rec.data.schema import DatasetSchema
    from mtfm_rec.model.zoo import build_model

    cfg = _job_config(job)
    dataset = ensure_aggregated(cfg.data.raw, cfg.data.cache_dir, cfg.data.aggregation)
    schema = DatasetSchema.load(dataset)
    fill_recommended_splits(cfg.data, schema.extra)
    batch = next(iter(ResumableLoader.from_config(dataset, cfg.data, split="valid", rank=0, world_size=1)))
    model = build_model(schema, dataclasses.replace(cfg.model, attention_backend="reference")).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(batch)
    return counter.get_total_flops() / 1e9 / batch.batch_size


def tokens_per_sample(job: Job, batches: int = 20) -> float:
    """The training split's mean tokens per sample over its first ``batches`` batches."""
    from mtfm_rec.data.aggregate import ensure_aggregated
    from mtfm_rec.data.config import fill_recommended_splits
    from mtfm_rec.data.loader import ResumableLoader
    from mtfm_rec.data.schema import DatasetSchema

    cfg = _job_config(job)
    dataset = ensure_aggregated(cfg.data.raw, cfg.data.cache_dir, cfg.data.aggregation)
    fill_recommended_splits(cfg.data, DatasetSchema.load(dataset).extra)
    loader = ResumableLoader.from_config(
        dataset, cfg.data, split="train", rank=0, world_size=1, shuffle=False
    )
    tokens = samples = 0
    for i, batch in enumerate(loader):
        if i == batches:
            break
        tokens, samples = tokens + batch.num_tokens, samples + batch.batch_size
    return tokens / max(1, samples)


def size_points(jobs: Sequence[Job], root: str, keys: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """Per ladder size and the baseline: GFLOPs per sample and the test GAUC / AUC per key
    (mean over seeds)."""
    summary = compare.summarize(compare.job_rows(jobs, root), keys)
    first: Dict[str, Job] = {}
    for job in jobs:
        first.setdefault(job.labels["model"], job)
    return {
        name: {
            "gflops_per_sample": counted_gflops(job),
            "is_baseline": "size" not in job.labels,
            "gauc": {k: summary[name][k]["gauc_mean"] for k in keys},
            "auc": {k: summary[name][k]["auc_mean"] for k in keys},
        }
        for name, job in first.items()
    }


def slopes(points: Mapping[str, Mapping[str, Any]], keys: Sequence[str]) -> Dict[str, float]:
    """Per key, the least-squares slope of GAUC against log10 GFLOPs over the MTFM sizes."""
    ladder = [p for p in points.values() if not p["is_baseline"]]
    x = np.log10([p["gflops_per_sample"] for p in ladder])
    return {k: float(np.polyfit(x, [p["gauc"][k] for p in ladder], 1)[0]) for k in keys}


def data_curves(jobs: Sequence[Job], root: str, sizes: Sequence[str]) -> Dict[str, List[Tuple[float, float]]]:
    """(b): per chosen size (smallest, middle, largest), [(training tokens seen, valid GAUC)]."""
    from mtfm_rec.training.logger import read_log

    chosen = list(dict.fromkeys([sizes[0], sizes[len(sizes) // 2], sizes[-1]]))
    curves: Dict[str, List[Tuple[float, float]]] = {}
    for size in chosen:
        job = next(j for j in jobs if j.labels.get("size") == size)
        per_token = tokens_per_sample(job)
        batch = _job_config(job).data.loader.batch_size
        series = read_log(job.run_dir(root)).get("valid/gauc", [])
        curves[size] = [(step * batch * per_token, value) for step, value in series]
    return curves


def markdown(points: Mapping[str, Mapping[str, Any]], keys: Sequence[str], slope: Mapping[str, float]) -> str:
    head = "| model | GFLOPs / sample | " + " | ".join(f"{k} GAUC" for k in keys) + " |"
    lines = [head, "|---" * (2 + len(keys)) + "|"]
    for name, p in points.items():
        label = f"{name} (baseline)" if p["is_baseline"] else f"MTFM {name}"
        cells = " | ".join(f"{p['gauc'][k]:.4f}" for k in keys)
        lines.append(f"| {label} | {p['gflops_per_sample']:.4f} | {cells} |")
    lines.append(
        "| slope (GAUC per 10x FLOPs, MTFM) | | " + " | ".join(f"{slope[k]:+.4f}" for k in keys) + " |"
    )
    return "\n".join(lines)


def plot_sizes(points: Mapping[str, Mapping[str, Any]], keys: Sequence[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ladder = [(n, p) for n, p in points.items() if not p["is_baseline"]]
    ladder.sort(key=lambda item: item[1]["gflops_per_sample"])
    for i, k in enumerate(keys):
        xs = [p["gflops_per_sample"] for _, p in ladder]
        ax.plot(xs, [p["gauc"][k] for _, p in ladder], marker="o", color=f"C{i}", label=f"MTFM {k}")
        for p in points.values():
            if p["is_baseline"]:
                ax.scatter([p["gflops_per_sample"]], [p["gauc"][k]], marker="x", s=60, color=f"C{i}")
    baseline = [n for n, p in points.items() if p["is_baseline"]]
    if baseline:
        ax.scatter([], [], marker="x", color="gray", label=f"{baseline[0]} (baseline)")
    ax.set_xscale("log")
    ax.set_xlabel("inference GFLOPs per sample (counted, padded attention)")
    ax.set_ylabel("test GAUC")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_data(curves: Mapping[str, Sequence[Tuple[float, float]]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    for i, (size, points) in enumerate(curves.items()):
        if points:
            x, y = zip(*points)
            ax.plot(x, y, marker="o", color=f"C{i}", label=f"MTFM {size}")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("validation GAUC (mean over scenario x task)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(
    jobs: Sequence[Job], root: str, keys: Sequence[str], sizes: Sequence[str], meta: Mapping[str, object]
) -> Dict[str, Any]:
    """Writes scaling.json / .md and the two PNGs under ``root``; returns what the JSON holds."""
    points = size_points(jobs, root, keys)
    slope = slopes(points, keys)
    curves = data_curves(jobs, root, sizes)
    out = {**meta, "keys": list(keys), "points": points, "slopes": slope, "data_curves": curves}
    with open(os.path.join(root, "scaling.json"), "w") as fh:
        json.dump(out, fh, indent=2)
    text = markdown(points, keys, slope)
    with open(os.path.join(root, "scaling.md"), "w") as fh:
        seeds, config = meta.get("seeds"), meta.get("config")
        fh.write(f"Test GAUC against inference GFLOPs per sample; seeds {seeds}; {config}\n\n")
        fh.write(text + "\n")
    name = os.path.basename(root)
    plot_sizes(points, keys, os.path.join(root, "scaling_size.png"), f"{name}: quality against model size")
    plot_data(curves, os.path.join(root, "scaling_data.png"), f"{name}: quality against data seen")
    print(text, flush=True)
    return out
