"""A comparison run in parts, reported as one (the ``baselines`` and ``table2`` bench sections).

``python -m mtfm_rec.experiments compare`` writes one ``compare.json`` per experiment directory. A
long comparison is often run in parts (the slow models later or on another machine, the close ones
re-run over more seeds): each part's directory is listed in an environment variable, separated by
``os.pathsep``. The parts must agree on config and overrides (the same budget and data; overrides
of where files go, ``NEUTRAL_OVERRIDES``, may differ) and share no seed of a model, and each
part's training time is given on its own machine. An entry may also be a ``.json`` file holding an
earlier report (``docs/bench/<section>.json``) or a ``compare.json``: a new part joins the table
already published without the earlier parts' run directories. A model that a later part runs over
new seeds (the same model config) joins its row: the row's mean and sample std become those over
all its seeds, exactly as if one run had trained them all. A model that a later part re-runs
replaces the earlier part's row only when ``MTFM_COMPARE_RERUN`` names it (comma-separated);
otherwise a repeated seed is refused as a mistake.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Sequence, Set, Tuple

from mtfm_rec.bench import machine_name

# What the parts of one comparison must share: the same budget and data for every model. Not the
# seeds: a row's mean is over its own part's seeds, and the table says which.
MUST_AGREE = ("config", "overrides")
# Overrides that change where files go or what is shown, never what is trained: parts may differ
# in them (a part run on another machine keeps its aggregation cache elsewhere). The log interval
# decides when the loss is read back and logged; it reaches training only through the time budget
# (train.max_minutes), which parts must share.
NEUTRAL_OVERRIDES = (
    "data.cache_dir",
    "data.loader.index_cache_dir",
    "train.progress_bar",
    "train.tensorboard",
    "train.log_every",
)


def _agreed(part: Dict[str, Any], key: str) -> Any:
    """``part[key]``, its neutral overrides left out (what two parts are compared on)."""
    if key != "overrides":
        return part[key]
    return [o for o in part[key] if o.split("=", 1)[0] not in NEUTRAL_OVERRIDES]


def read_parts(variable: str, default: str, make: str) -> Tuple[str, Dict[str, Any]]:
    """The ``os.pathsep``-joined paths read and the merged comparison of the parts that the
    environment variable ``variable`` lists (``default`` when it is unset); ``make`` is the
    target that runs the comparison, for the error when there is none.

    Raises:
        FileNotFoundError: a part has no ``compare.json``.
        ValueError: parts that disagree on config or overrides, or share a model.
    """
    roots = os.environ.get(variable, default).split(os.pathsep)
    rerun = [m for m in os.environ.get("MTFM_COMPARE_RERUN", "").split(",") if m]
    parts = [read_part(root, make) for root in roots]
    return os.pathsep.join(p for p, _ in parts), merge_parts(parts, rerun)


def read_part(root: str, make: str) -> Tuple[str, Dict[str, Any]]:
    """One part: a run directory's ``compare.json``, or a ``.json`` file that is one or holds an
    earlier report's ``compare``."""
    path = root if root.endswith(".json") else os.path.join(root, "compare.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no comparison to report; run `{make}` first")
    with open(path) as fh:
        part = json.load(fh)
    return path, part.get("compare", part)


def merge_parts(parts: List[Tuple[str, Dict[str, Any]]], rerun: Sequence[str] = ()) -> Dict[str, Any]:
    """One comparison from its parts' ``(path, compare.json)``, models in the parts' order; the
    ``parts`` entry keeps each part's models, own configs, training time and machine (an earlier
    merge's own parts are kept as they were). A model of ``rerun`` found again in a later part
    takes that part's row; its earlier part keeps its other models and their time. Any other
    model found again joins its row over the later part's seeds (``join_rows``).

    Raises:
        ValueError: naming the part and the setting it disagrees on, or the model and seeds it
            repeats, or a model joined under another config.
    """
    first_path, first = parts[0]
    merged: Dict[str, Any] = {k: first[k] for k in MUST_AGREE}
    merged.update(seeds=[], models=[], jobs=[], summary={}, model_configs={}, parts=[])
    for path, part in parts:
        for key in MUST_AGREE:
            if _agreed(part, key) != _agreed(first, key):
                raise ValueError(
                    f"{path}: {key}={part[key]!r} differs from {first_path}'s {first[key]!r}; "
                    "parts of one comparison need the same config and overrides (other than "
                    f"{', '.join(NEUTRAL_OVERRIDES)})"
                )
        repeated = [m for m in part["models"] if m in merged["models"]]
        for model in (m for m in repeated if m in rerun):
            drop_model(merged, model)
        joined = [m for m in repeated if m not in rerun]
        seen, new = model_seeds(merged), model_seeds(part)
        _check_join(merged, path, part, joined)
        own = part.get("model_configs") or {}
        merged["models"] += [m for m in part["models"] if m not in joined]
        merged["jobs"] += part.get("jobs", [])
        for model, rows in part["summary"].items():
            if model in joined:
                rows = join_rows(merged["summary"][model], len(seen[model]), rows, len(new[model]))
            merged["summary"][model] = rows
        merged["model_configs"].update(own)
        merged["seeds"] = sorted(set(merged["seeds"]) | set(part["seeds"]))
        # An earlier merge's parts predate per-part seeds when they all had the merge's seeds.
        merged["parts"] += [{"seeds": part["seeds"], **p} for p in part.get("parts") or []] or [
            {
                "source": path,
                "models": part["models"],
                "seeds": part["seeds"],
                "overrides": part["overrides"],
                "model_configs": own,
                "fit_seconds": part.get("fit_seconds"),
                "machine": part.get("machine"),
            }
        ]
    return merged


def _check_join(merged: Dict[str, Any], path: str, part: Dict[str, Any], joined: List[str]) -> None:
    """A model already in the merge may join its row only over new seeds and the same config."""
    seen, new = model_seeds(merged), model_seeds(part)
    for model in joined:
        again = sorted(set(seen[model]) & set(new[model]))
        if again:
            raise ValueError(
                f"{path}: model {model} seeds {again} are already in an earlier part (a later part "
                "may add other seeds to a row; MTFM_COMPARE_RERUN=<models> lets it replace the row)"
            )
        ours, theirs = ((p.get("model_configs") or {}).get(model) for p in (part, merged))
        if ours != theirs:
            raise ValueError(
                f"{path}: model {model} was trained with --model-config {ours!r}, an earlier part "
                f"with {theirs!r}; seeds of one row need the same config"
            )


def model_seeds(compare: Dict[str, Any]) -> Dict[str, List[int]]:
    """Each model's seeds, over every part that trained it (a single run's ``compare.json`` has
    no parts: every model has its seeds)."""
    if not compare.get("parts"):
        return {m: sorted(compare["seeds"]) for m in compare["models"]}
    seeds: Dict[str, List[int]] = {}
    for part in compare["parts"]:
        for model in part["models"]:
            seeds[model] = sorted(set(seeds.get(model, [])) | set(part["seeds"]))
    return seeds


def join_rows(rows: Dict[str, Any], n: int, more: Dict[str, Any], m: int) -> Dict[str, Any]:
    """One model's summary over ``n + m`` seeds from its summaries over ``n`` and over ``m``:
    each metric's mean and sample std (ddof 1, as ``experiments.compare.summarize``) by the
    pooled-variance identity, so the result equals a summary of all the seeds' values at once.

    Raises:
        ValueError: the two summaries have different columns.
    """
    if set(rows) != set(more):
        raise ValueError(f"columns {sorted(set(rows) ^ set(more))} are in one part of a row only")
    out: Dict[str, Any] = {}
    for key, a in rows.items():
        b, cell = more[key], {"seeds": float(n + m)}
        for metric in (k[: -len("_mean")] for k in a if k.endswith("_mean")):
            mean_a, mean_b = a[f"{metric}_mean"], b[f"{metric}_mean"]
            mean = (n * mean_a + m * mean_b) / (n + m)
            squares = (n - 1) * a[f"{metric}_std"] ** 2 + (m - 1) * b[f"{metric}_std"] ** 2
            squares += n * m / (n + m) * (mean_a - mean_b) ** 2
            cell[f"{metric}_mean"], cell[f"{metric}_std"] = mean, math.sqrt(squares / (n + m - 1))
        out[key] = cell
    return out


def drop_model(merged: Dict[str, Any], model: str) -> None:
    """Removes ``model``'s row, jobs and training time from a merge (a later part re-ran it)."""
    seconds = sum(j.get("fit_seconds", 0.0) for j in merged["jobs"] if j.get("model") == model)
    merged["models"].remove(model)
    merged["jobs"] = [j for j in merged["jobs"] if j.get("model") != model]
    merged["summary"].pop(model)
    merged["model_configs"].pop(model, None)
    for part in merged["parts"]:
        if model in part["models"]:
            part["models"] = [m for m in part["models"] if m != model]
            (part.get("model_configs") or {}).pop(model, None)
            if part.get("fit_seconds") is not None:
                part["fit_seconds"] -= seconds
    merged["parts"] = [p for p in merged["parts"] if p["models"]]


def part_commands(compare: Dict[str, Any]) -> List[str]:
    """One ``compare`` command line per part, each as it was run, a blank line after each."""
    lines: List[str] = []
    for part in compare["parts"]:  # one command per part, each as it was run
        lines += [
            f"`python -m mtfm_rec.experiments compare --config {compare['config']} --models "
            f"{','.join(part['models'])} --seeds {','.join(map(str, part['seeds']))} "
            + "".join(f"--model-config {m}={c} " for m, c in (part.get("model_configs") or {}).items())
            + " ".join(part.get("overrides") or compare["overrides"])
            + "`",
            "",
        ]
    return lines


def best_steps(jobs: List[Dict[str, Any]], model: str) -> str:
    """``seed0 d0 500, ...``: the best step of each of ``model``'s jobs, in the jobs' order."""
    steps = []
    for job in (j for j in jobs if j.get("model") == model):
        where = " ".join(job[k] for k in ("seed", "scenario") if k in job)
        if job.get("best_step") is None:  # jobs reported before compare.json kept their steps
            steps.append(f"seed{where} not recorded")
            continue
        cap = "*" if job["best_step"] == job.get("max_steps") else ""
        steps.append(f"seed{where} {job['best_step']}{cap}")
    if all(step.endswith("not recorded") for step in steps):
        return "not recorded"
    return ", ".join(steps)


def part_time(part: Dict[str, Any]) -> str:
    """``models: N min on <cpu> (<cores> cores), <date>``: a part's training time and machine."""
    models = ", ".join(part["models"])
    if part.get("fit_seconds") is None:
        return f"{models}: not recorded"
    m = part.get("machine") or {}
    where = f"{machine_name(m)}, {m['date']}" if m else "machine not recorded"
    return f"{models}: {part['fit_seconds'] / 60:.0f} min on {where}"


def measured(result: Dict[str, Any]) -> str:
    """The heading line of a report merged from parts: the machines its jobs trained on, each
    with its dates, and where the report itself was assembled (``result["machine"]``), so that a
    table whose parts ran on different CPUs does not name only the newest one."""
    trained: Dict[str, Set[str]] = {}
    for part in result["compare"]["parts"]:
        m = part.get("machine") or {}
        dates = trained.setdefault(machine_name(m) if m else "a machine not recorded", set())
        dates.update([m["date"]] if m.get("date") else [])
    jobs = "; ".join(where + (f" ({', '.join(sorted(d))})" if d else "") for where, d in trained.items())
    here = result.get("machine", {})
    return (
        f"Jobs trained on {jobs}; report assembled {here.get('date')} on {machine_name(here)}, "
        f"torch {here.get('torch')}."
    )
