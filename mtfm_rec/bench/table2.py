"""``table2``: the paper's Table 2 on open data, MTFM against its seven baselines on MovieLens-1M's
genre scenarios (``configs/ml1m_genre.yaml``: four scenarios with their own schemas x click/like).

The comparison is long (every model trained to early stopping on validation, the single-scenario
models once per scenario), so it is not run by ``make bench``: ``make compare-genre`` runs it
(``python -m mtfm_rec.experiments compare``, docs/EXPERIMENTS.md) and then ``python -m
mtfm_rec.bench --only table2``, which reads its ``compare.json`` (``MTFM_TABLE2_DIR``, default
``runs/ml1m_genre``; a comparison run in parts lists them, :mod:`mtfm_rec.bench.compare_parts`)
into ``docs/bench/table2.json`` and renders the section.

The table has the paper's shape: rows are models, columns AUC and GAUC per scenario x task, the
best of each column in bold and the second underlined. Below it the paper's pattern (MTFM best in
every column) is checked column by column: every column where a baseline's mean is above MTFM's
is listed with the gap, so a reader sees where the claim does not hold here.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from mtfm_rec.bench.compare_parts import best_steps, model_seeds, part_commands, part_time, read_parts
from mtfm_rec.bench.compare_parts import measured as measured  # the heading: every part's machine
from mtfm_rec.experiments.compare import METRICS, POOLED, Summary, markdown_table
from mtfm_rec.experiments.compare import plot as bar_plot

OURS = "mtfm"


def run(quick: bool) -> Dict[str, Any]:
    """Reads the comparison's results, merging its parts.

    Raises:
        FileNotFoundError: no ``compare.json`` (run ``make compare-genre`` first).
        ValueError: parts that disagree on config or overrides or share a model, or no MTFM row.
    """
    source, compare = read_parts("MTFM_TABLE2_DIR", "runs/ml1m_genre", "make compare-genre")
    if OURS not in compare["models"]:
        raise ValueError(f"{source}: no {OURS} row; Table 2 compares MTFM against the baselines")
    return {"compare": compare, "source": source}


def _ordered(summary: Summary) -> Summary:
    """MTFM's row first, then the parts' order (the paper lists the baselines above, but the
    row to compare against is ours)."""
    return {m: summary[m] for m in sorted(summary, key=lambda m: m != OURS)}


def _keys(summary: Summary) -> Tuple[List[str], List[str]]:
    """The "<scenario>/<task>" columns and the pooled "all/<task>" ones, in table order."""
    keys = list(summary[OURS])
    pooled = [k for k in keys if k.startswith(f"{POOLED}/")]
    return [k for k in keys if k not in pooled], pooled


def losses(summary: Summary, keys: List[str], metric: str) -> List[Tuple[str, str, float, float, float]]:
    """``(key, baseline, its mean, MTFM's mean, the two rows' std summed)`` for every column
    ``key`` of ``metric`` where the best baseline's mean is above MTFM's: where the paper's
    pattern does not hold. The summed std says whether the gap is beyond the seeds' spread (a row
    of one seed has none, so a gap against it is the less certain)."""
    out = []
    for key in keys:
        ours = summary[OURS][key]
        rival = max((m for m in summary if m != OURS), key=lambda m: summary[m][key][f"{metric}_mean"])
        theirs = summary[rival][key]
        if theirs[f"{metric}_mean"] > ours[f"{metric}_mean"]:
            spread = ours[f"{metric}_std"] + theirs[f"{metric}_std"]
            out.append((key, rival, theirs[f"{metric}_mean"], ours[f"{metric}_mean"], spread))
    return out


def _pattern(summary: Summary, keys: List[str]) -> List[str]:
    lines = []
    for metric in METRICS:
        lost = losses(summary, keys, metric)
        lines.append(
            f"- {metric.upper()}: MTFM >= every baseline in {len(keys) - len(lost)} of {len(keys)} columns"
            + ("." if not lost else "; below the best baseline in:")
        )
        lines += [
            f"  - {key}: {rival} {theirs:.4f} against MTFM {ours:.4f} ({ours - theirs:+.4f}, "
            + ("beyond" if theirs - ours > spread else "within")
            + f" the rows' std summed, {spread:.4f})"
            for key, rival, theirs, ours, spread in lost
        ]
    return lines


def render(result: Dict[str, Any]) -> str:
    compare = result["compare"]
    summary = _ordered(compare["summary"])
    keys, pooled = _keys(summary)
    seeds = model_seeds(compare)
    lines = part_commands(compare)
    lines += [
        "Test AUC / GAUC per scenario x task, mean ± sample std over the row's seeds (one seed: its",
        "value alone), each job's model chosen on validation; best in bold, second underlined. Seeds: "
        + "; ".join(f"{m} {','.join(map(str, seeds[m]))}" for m in summary)
        + ".",
        "",
        markdown_table(summary, keys, METRICS),
        "",
    ]
    if pooled:
        lines += [
            "Every scenario's test rows pooled:",
            "",
            markdown_table(summary, pooled, (*METRICS, "logloss")),
            "",
        ]
    lines += ["The paper's pattern, MTFM >= every baseline in every column (means over seeds):", ""]
    lines += _pattern(summary, keys)
    if result.get("plot"):
        lines += ["", f"![Table 2 on ml1m_genre]({result['plot']})"]
    lines += ["", "Training time of the jobs, each part on the machine it ran on:", ""]
    lines += [f"- {part_time(part)}" for part in compare["parts"]]
    lines += ["", "Each job's best validation step (`*`: the step cap, a run the budget stopped):", ""]
    lines += [f"- {model}: {best_steps(compare['jobs'], model)}" for model in summary]
    return "\n".join(lines)


def plot(result: Dict[str, Any], path: str) -> None:
    summary = _ordered(result["compare"]["summary"])
    keys, pooled = _keys(summary)
    bar_plot(summary, [*keys, *pooled], path, f"Table 2 on {result['compare']['config']}: test AUC")
