"""Serving benchmark: per-request latency and candidates/s of five ways to score a request.

One request = one user's context of ``C`` tokens (3/4 history, 1/4 real time, every action
before the request time) and ``M`` candidates of one scenario, scored by

* (a) ``naive``: one training-layout forward per candidate, each with the full context (timed
  for one candidate, times M: every candidate's forward is the same size);
* (b) ``training_layout``: one training-layout forward with all M candidates as T tokens, on
  the model's own CPU kernel (``cpp``), which already skips every pair the mask hides, the
  candidate x candidate block included; and (b') ``training_layout_padded``: the same forward
  on the padded ``prefix`` backend, which computes every (query, key) pair of the
  ``[C + M] x [C + M]`` blocks and masks them (what a dense attention kernel does);
* (c) ``falcon``: M-Falcon eager (``ScenarioModel.score_inputs``): the context once, the
  candidates against its cached K/V, never against each other;
* (c') ``falcon_cached``: (c) for a request whose context is already in the
  :class:`~mtfm_rec.serve.falcon.ContextStore` (the same user's next request with an unchanged
  context): only the candidates are computed;
* (d) ``falcon_aoti``: (c) exported with ``torch.export`` and compiled by AOTInductor (one
  package with dynamic context and candidate counts, compiled once);
* (e) ``falcon_aoti_bf16``: (d) of the bf16 subgraph.

The timed model has one scenario (so (a) and (b) carry no other scenario's work); the
parameter counts are of the same model with three scenarios. Times are process CPU time of
one thread, the minimum of the repetitions (the machine is
shared: see ``mtfm_rec.bench.timing``). Beside them, the subgraph's parameters against the whole
model's, and the analytic FLOPs per request (``mtfm_rec.model.flops``).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Dict, List

CONTEXTS = (256, 1024)
CANDIDATES = (64, 256, 512, 1024)
MODES = (
    "naive",
    "training_layout",
    "training_layout_padded",
    "falcon",
    "falcon_cached",
    "falcon_aoti",
    "falcon_aoti_bf16",
)


def _model_and_schema(num_scenarios: int, attention_backend: str = "auto") -> Any:
    import torch

    from mtfm_rec.model import MTFM, ModelConfig
    from mtfm_rec.model.examples import long_history_schema

    schema = long_history_schema(num_scenarios=num_scenarios)
    config = ModelConfig(
        embedding_dim=16,
        d_model=64,
        tokenizer_hidden=[64],
        num_blocks=2,
        target_layers_per_block=3,
        full_layers_per_block=1,
        num_heads=4,
        num_kv_heads=1,
        attention_backend=attention_backend,
    )
    torch.manual_seed(0)
    return MTFM(schema, config).eval(), schema


def _request_batch(schema: Any, context: int, candidates: int) -> Any:
    """A one-sample batch of a one-scenario schema: ``context`` H+R tokens and ``candidates`` T
    tokens at one time after every R action (so the training layout and the request see the
    same context)."""
    from mtfm_rec.model.examples import fixed_size_batch

    history = context * 3 // 4
    batch = fixed_size_batch(schema, 1, history, context - history, candidates)
    batch.token_ts[batch.target_rows] = 10_000
    return batch


def _timer(fn: Callable[[], Any], reps: int) -> float:
    from mtfm_rec.bench.timing import time_fn

    return time_fn(fn, "cpu", reps=reps, warmup=1)


def _gflops(model: Any, schema: Any, batch: Any) -> Dict[str, float]:
    """Analytic forward GFLOPs of the request's training-layout batch (``mtfm_rec.model.flops``):
    over the (query, key) pairs the mask lets through (what (b) and M-Falcon compute: the same
    visible pairs, the same projections) and over the padded blocks ((b'))."""
    from mtfm_rec.model.flops import model_flops

    flops = model_flops(model.config, schema, batch)
    return {"useful": flops.forward / 1e9, "padded": flops.forward_padded / 1e9}


def _scorers(model: Any, schema: Any, example: Any, workdir: str) -> Dict[str, Callable[[Any], Any]]:
    """(c), (d), (e): eager M-Falcon and the two AOTInductor packages (compiled once each)."""
    from mtfm_rec.serve.compress import to_bf16
    from mtfm_rec.serve.export import export_scenario, load_package
    from mtfm_rec.serve.falcon import ContextStore
    from mtfm_rec.serve.subgraph import extract_subgraph

    sub = extract_subgraph(model, "s0")
    store = ContextStore(max_entries=4)  # the timer's warm-up call fills it
    fp32 = load_package(export_scenario(sub, schema, example, os.path.join(workdir, "fp32.pt2")))
    bf16 = load_package(export_scenario(to_bf16(sub), schema, example, os.path.join(workdir, "bf16.pt2")))
    return {
        "falcon": lambda x: sub.score_inputs(x),
        "falcon_cached": lambda x: sub.score_inputs(x, store=store),
        "falcon_aoti": fp32,
        "falcon_aoti_bf16": bf16,
    }


def _measure_row(
    models: Any, scorers: Dict[str, Callable[[Any], Any]], batch: Any, inputs: Any, naive_s: float, reps: int
) -> Dict[str, Any]:
    """One (context, candidates) row: every path's seconds per request, and counted GFLOPs."""
    model, padded = models
    m = int(inputs.cand_ts.shape[1])
    seconds = {
        "naive": naive_s * m,
        "training_layout": _timer(lambda: model(batch), reps),
        "training_layout_padded": _timer(lambda: padded(batch), reps),
    }
    for name, fn in scorers.items():
        seconds[name] = _timer(lambda fn=fn: fn(inputs), reps)  # type: ignore[misc]
    return {
        "candidates": m,
        "ms": {k: 1e3 * v for k, v in seconds.items()},
        "candidates_per_s": {k: m / v for k, v in seconds.items()},
        "gflops": _gflops(model, model.schema, batch),
    }


def run(quick: bool) -> Dict[str, Any]:
    import torch

    from mtfm_rec.serve.request import collate_requests, requests_from_batch
    from mtfm_rec.serve.subgraph import extract_subgraph, parameter_counts

    torch.set_num_threads(1)
    model, schema = _model_and_schema(num_scenarios=1)
    padded, _ = _model_and_schema(num_scenarios=1, attention_backend="prefix")  # same seed: same weights
    contexts, candidates, reps = ((256,), (64, 512), 2) if quick else (CONTEXTS, CANDIDATES, 3)
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as workdir, torch.no_grad():
        scorers: Dict[str, Callable[[Any], Any]] = {}
        for c in contexts:
            single = _request_batch(schema, c, 1)
            naive_s = _timer(lambda single=single: model(single), reps)  # type: ignore[misc]
            for m in candidates:
                batch = _request_batch(schema, c, m)
                (request,), _ = requests_from_batch(batch, schema, "s0")
                inputs = collate_requests([request], schema)
                scorers = scorers or _scorers(model, schema, inputs, workdir)  # compiled once
                row = {"context": c, **_measure_row((model, padded), scorers, batch, inputs, naive_s, reps)}
                rows.append(row)
                times = ", ".join(f"{k} {v:.1f} ms" for k, v in row["ms"].items())
                print(f"[bench] serving C={c} M={m}: {times}", flush=True)
    # the parameter count of a multi-scenario model: what a scenario's subgraph leaves out
    multi, _ = _model_and_schema(num_scenarios=3)
    whole, sub = parameter_counts(multi, extract_subgraph(multi, "s0"))
    return {"rows": rows, "parameters": {"whole_model": whole, "subgraph_s0": sub}, "threads": 1}


def _ratio(row: Dict[str, Any], a: str, b: str) -> float:
    return row["ms"][b] / row["ms"][a]


def render(result: Dict[str, Any]) -> str:
    lines = [
        "Per request latency (ms, one thread) of the scoring paths of module `mtfm_rec.bench.serving` "
        "(its docstring defines them); (a) is one forward per candidate (measured for one, times M). "
        "(b) runs the training kernel, which already skips every (query, key) pair the dynamic mask "
        "hides, the candidate x candidate block included, so it does the same attention work as "
        "M-Falcon; (b') is the same forward on the padded kernel, which computes the whole block.",
        "",
        f"![serving latency]({result['plot']})" if result.get("plot") else "",
        "",
        "| context | candidates | (a) naive | (b) training layout | (b') padded | (c) M-Falcon "
        "| (c') cached context | (d) AOTI | (e) AOTI bf16 | (c) vs (a) | (c) vs (b) | (c) vs (b') "
        "| (c') vs (b) | (d) vs (c) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        ms = row["ms"]
        lines.append(
            f"| {row['context']} | {row['candidates']} | "
            + " | ".join(f"{ms[k]:.1f}" for k in MODES)
            + f" | {_ratio(row, 'falcon', 'naive'):.1f}x | {_ratio(row, 'falcon', 'training_layout'):.2f}x"
            + f" | {_ratio(row, 'falcon', 'training_layout_padded'):.2f}x"
            + f" | {_ratio(row, 'falcon_cached', 'training_layout'):.2f}x"
            + f" | {_ratio(row, 'falcon_aoti', 'falcon'):.2f}x |"
        )
    lines += [
        "",
        "Candidates per second of (c) M-Falcon and (d) AOTI, and analytic forward GFLOPs per request "
        "(`mtfm_rec.model.flops`): over the visible (query, key) pairs, which (b), (c) and (d) all "
        "compute, and over the padded blocks, which (b') computes:",
        "",
        "| context | candidates | (c) cand/s | (d) cand/s | GFLOP visible pairs | GFLOP padded |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        cps, gf = row["candidates_per_s"], row["gflops"]
        lines.append(
            f"| {row['context']} | {row['candidates']} | {cps['falcon']:.0f} | {cps['falcon_aoti']:.0f} "
            f"| {gf['useful']:.2f} | {gf['padded']:.2f} |"
        )
    p = result["parameters"]
    lines += [
        "",
        f"Parameters: whole model (3 scenarios) {p['whole_model']:,}, scenario s0's subgraph "
        f"{p['subgraph_s0']:,} ({100 * p['subgraph_s0'] / p['whole_model']:.0f}%).",
        "",
        "Targets (issue 14): (c) >= 10x (a) at 512 candidates; (c) >= 1.5x (b) at 1024 candidates; "
        "(d) faster than (c).",
    ]
    return "\n".join(lines)


_LABELS = {
    "naive": "(a) naive, one forward per candidate",
    "training_layout": "(b) training layout, skipping kernel",
    "training_layout_padded": "(b') training layout, padded kernel",
    "falcon": "(c) M-Falcon eager",
    "falcon_cached": "(c') M-Falcon, context cached",
    "falcon_aoti": "(d) M-Falcon AOTInductor",
    "falcon_aoti_bf16": "(e) (d) in bf16",
}


def plot(result: Dict[str, Any], path: str) -> None:
    """Latency per request against the candidate count, one panel per context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({r["context"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(contexts), figsize=(6 * len(contexts), 4.5), squeeze=False)
    for ax, c in zip(axes[0], contexts):
        rows = [r for r in result["rows"] if r["context"] == c]
        for i, mode in enumerate(MODES):
            ax.plot(
                [r["candidates"] for r in rows],
                [r["ms"][mode] for r in rows],
                marker="o",
                color=f"C{i}",
                label=_LABELS[mode],
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("candidates per request")
        ax.set_ylabel("ms per request (one thread)")
        ax.set_title(f"context of {c} tokens")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
