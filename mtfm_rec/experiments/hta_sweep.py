"""``hta-sweep``: the (K target : P full) x B stacks of paper Table 3, quality against cost.

Each stack (``--stacks``, default the paper's rows) is trained with the config's budget and
seeds on the same data, and reported with its batch size, test AUC and GAUC (the mean over the
dataset's scenario x tasks; mean +/- std over seeds), training samples/s and the peak resident
memory of the training process. A stack is written ``K:PxB`` with optional suffixes::

    3:1x4            K=3 target layers after P=1 full layer, B=4 blocks; the config's kv heads
    3:1x4/nogqa      one kv head per query head (no GQA)
    3:1x4/batch2     the config's batch size doubled (what GQA's memory saving buys)

Writes ``<runs>/<name>/hta_sweep.{json,md,png}`` (the PNG: AUC against throughput, one point
per stack).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np

from mtfm_rec.config import ConfigError
from mtfm_rec.experiments import compare
from mtfm_rec.experiments.jobs import Job

PAPER_STACKS = ("0:16x1", "16:0x1", "1:1x8", "3:1x4", "5:1x3", "3:1x4/nogqa", "3:1x4/batch2")
_STACK = re.compile(r"^(\d+):(\d+)x(\d+)((?:/(?:nogqa|batch\d+))*)$")


@dataclass(frozen=True)
class Stack:
    """One row of the sweep (module docstring for the notation)."""

    name: str
    target_layers: int
    full_layers: int
    blocks: int
    gqa: bool = True
    batch_factor: int = 1

    @classmethod
    def parse(cls, text: str) -> "Stack":
        """``K:PxB[/nogqa][/batch<N>]``; a ``ConfigError`` naming the rule otherwise."""
        match = _STACK.match(text.strip())
        if not match or int(match.group(1)) + int(match.group(2)) == 0:
            raise ConfigError(
                f"--stacks: {text!r} is not K:PxB[/nogqa][/batch<N>] with K + P >= 1 (e.g. 3:1x4/nogqa)"
            )
        k, p, b, suffix = int(match.group(1)), int(match.group(2)), int(match.group(3)), match.group(4)
        factor = re.search(r"batch(\d+)", suffix)
        if b < 1 or (factor and int(factor.group(1)) < 1):
            raise ConfigError(f"--stacks: {text!r}: blocks and the batch factor must be >= 1")
        return cls(text.strip(), k, p, b, "nogqa" not in suffix, int(factor.group(1)) if factor else 1)

    def overrides(self, num_heads: int, num_kv_heads: int, batch_size: int) -> List[str]:
        return [
            f"model.target_layers_per_block={self.target_layers}",
            f"model.full_layers_per_block={self.full_layers}",
            f"model.num_blocks={self.blocks}",
            f"model.num_kv_heads={num_kv_heads if self.gqa else num_heads}",
            f"data.loader.batch_size={batch_size * self.batch_factor}",
        ]


def plan(config: str, stacks: Sequence[str], seeds: Sequence[int], overrides: Sequence[str]) -> List[Job]:
    """One MTFM job per stack and seed; the jobs differ only in the stack's overrides."""
    base = compare.experiment_config(config, overrides, seeds)
    if not stacks:
        raise ConfigError("--stacks: give at least one stack")
    parsed = [Stack.parse(s) for s in stacks]
    heads, kv, batch = base.model.num_heads, base.model.num_kv_heads, base.data.loader.batch_size
    jobs = []
    for stack in parsed:
        for seed in seeds:
            job_overrides = [
                *overrides,
                "model.name=mtfm",
                *stack.overrides(heads, kv, batch),
                f"train.seed={seed}",
                f"data.loader.seed={seed}",
            ]
            labels = {"model": stack.name, "seed": str(seed), "batch_size": str(batch * stack.batch_factor)}
            jobs.append(
                Job(
                    f"{stack.name.replace(':', '-').replace('/', '_')}/seed{seed}",
                    config,
                    job_overrides,
                    labels,
                )
            )
    return jobs


def _fit(job: Job, root: str) -> Dict[str, Any]:
    with open(os.path.join(job.run_dir(root), "fit_summary.json")) as fh:
        return json.load(fh)


def rows(jobs: Sequence[Job], root: str, keys: Sequence[str]) -> List[Dict[str, Any]]:
    """Per stack: batch size, AUC / GAUC (mean over ``keys``; mean and std over seeds), samples/s
    and peak memory (means over seeds), in the order of the plan."""
    per_seed = compare.job_rows(jobs, root)
    out: Dict[str, Dict[str, Any]] = {}
    for job in jobs:
        stack, seed = job.labels["model"], job.labels["seed"]
        metrics = per_seed[(stack, seed)]
        fit = _fit(job, root)
        row = out.setdefault(stack, {"stack": stack, "batch_size": int(job.labels["batch_size"]), "runs": []})
        row["runs"].append(
            {
                "seed": int(seed),
                "auc": float(np.mean([metrics[k]["auc"] for k in keys])),
                "gauc": float(np.mean([metrics[k]["gauc"] for k in keys])),
                "samples_per_s": float(fit["samples_per_s"]),
                "peak_rss_gb": float(fit.get("peak_host_rss_gb", float("nan"))),
                "per_key": {k: metrics[k] for k in keys},
            }
        )
    for row in out.values():
        for metric in ("auc", "gauc", "samples_per_s", "peak_rss_gb"):
            values = np.array([r[metric] for r in row["runs"]], dtype=np.float64)
            if metric != "peak_rss_gb" and np.isnan(values).any():
                raise ValueError(f"stack {row['stack']}: a seed has no {metric} (NaN)")
            row[f"{metric}_mean"] = float(values.mean())
            row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return list(out.values())


def markdown(table: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| stack | batch | test AUC | test GAUC | samples/s | peak RSS (GB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| ({r['stack']}) | {r['batch_size']} | {r['auc_mean']:.4f} ± {r['auc_std']:.4f} "
            f"| {r['gauc_mean']:.4f} ± {r['gauc_std']:.4f} | {r['samples_per_s_mean']:.0f} "
            f"| {r['peak_rss_gb_mean']:.2f} |"
        )
    return "\n".join(lines)


def plot(table: Sequence[Mapping[str, Any]], path: str, title: str) -> None:
    """Test AUC (std over seeds as error bars) against training samples/s, one point per stack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    for i, r in enumerate(table):
        ax.errorbar(
            r["samples_per_s_mean"], r["auc_mean"], yerr=r["auc_std"], fmt="o", color=f"C{i}", capsize=3
        )
        ax.annotate(
            f"({r['stack']})",
            (r["samples_per_s_mean"], r["auc_mean"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    ax.set_xlabel("training samples / s (this machine)")
    ax.set_ylabel("test AUC, mean over scenario x task")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(
    jobs: Sequence[Job], root: str, keys: Sequence[str], meta: Mapping[str, object]
) -> List[Dict[str, Any]]:
    """Writes hta_sweep.json / .md / .png under ``root``; returns the rows."""
    table = rows(jobs, root, keys)
    with open(os.path.join(root, "hta_sweep.json"), "w") as fh:
        json.dump({**meta, "keys": list(keys), "rows": table}, fh, indent=2)
    text = markdown(table)
    with open(os.path.join(root, "hta_sweep.md"), "w") as fh:
        fh.write(
            f"HTA stacks, test metrics over {list(keys)}; seeds {meta.get('seeds')}; {meta.get('config')}\n\n"
        )
        fh.write(text + "\n")
    plot(table, os.path.join(root, "hta_sweep.png"), f"{os.path.basename(root)}: (K:P) x B stacks")
    print(text, flush=True)
    return table
