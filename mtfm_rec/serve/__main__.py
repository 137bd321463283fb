"""``python -m mtfm_rec.serve``: export a scenario, replay an evaluation split, serve over HTTP.

::

    python -m mtfm_rec.serve export --run-dir RUN --scenario S --out S.pt2 [--bf16] [--sparse-2to4]
    python -m mtfm_rec.serve replay --model S.pt2 [--model ...] --out scores.parquet [--raw ROOT] [k=v ...]
    python -m mtfm_rec.serve replay --run-dir RUN --out scores.parquet [--bf16] [--sparse-2to4] [k=v ...]
    python -m mtfm_rec.serve http --model MODEL.pt2 [--model ...] --port 8000
    python -m mtfm_rec.serve http --run-dir RUN --port 8000 [--context-cache 1024]

``replay`` writes ``predictions.parquet``'s columns and prints the metrics (the run's
``metrics.json`` keys); a package carries its run's config, so ``--raw`` (and ``key=value``
overrides such as ``data.eval_after=TS``) only say where the raw data is now or what differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, Optional, Sequence

import yaml

from mtfm_rec.config import Config, to_dict
from mtfm_rec.config_parsing import apply_overrides, from_dict
from mtfm_rec.serve.falcon import ContextStore
from mtfm_rec.serve.predictor import Predictor, ScoreFn, TrainedRun, eager_scorer, load_run
from mtfm_rec.serve.request import ScenarioInputs, collate_requests
from mtfm_rec.serve.subgraph import ScenarioModel, ServingError, extract_subgraph


def _load(args: argparse.Namespace) -> TrainedRun:
    """The run, its HSTU projections pruned to 2:4 and fine-tuned first when asked."""
    run = load_run(args.run_dir, args.checkpoint)
    steps = getattr(args, "finetune_steps", 0)
    if steps and not args.sparse_2to4:
        raise ServingError("--finetune-steps fine-tunes a 2:4-pruned model: add --sparse-2to4")
    if steps:
        from mtfm_rec.data.loader import ResumableLoader
        from mtfm_rec.serve.compress import finetune_pruned

        loader = ResumableLoader.from_config(
            run.dataset_dir, run.config.data, split="train", rank=0, world_size=1
        )
        losses = finetune_pruned(run.model, loader, steps, args.finetune_lr)
        print(f"[serve] 2:4 fine-tune: {steps} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
    return run


def _subgraph(run: TrainedRun, scenario: str, bf16: bool, sparse: bool) -> ScenarioModel:
    from mtfm_rec.serve.compress import prune_2to4, to_bf16

    sub = extract_subgraph(run.model, scenario)
    if sparse:
        prune_2to4(sub)  # a no-op on weights already pruned by the fine-tune
    return to_bf16(sub) if bf16 else sub


def _example(run: TrainedRun, scenario: str, count: int = 8) -> ScenarioInputs:
    """A few real requests of the run's evaluation split: the export's tracing example."""
    from mtfm_rec.data.loader import ResumableLoader
    from mtfm_rec.serve.request import requests_from_batch

    loader = ResumableLoader.from_config(run.dataset_dir, run.config.data, split="test", rank=0, world_size=1)
    for batch in loader:
        requests, _ = requests_from_batch(batch, run.schema, scenario)
        if requests:
            return collate_requests(requests[:count], run.schema)
    raise ServingError(f"the test split of {run.config.data.raw} has no request of scenario {scenario!r}")


def _export(args: argparse.Namespace) -> None:
    from mtfm_rec.serve.export import export_scenario

    run = _load(args)
    sub = _subgraph(run, args.scenario, args.bf16, args.sparse_2to4)
    config_yaml = yaml.safe_dump(to_dict(run.config), sort_keys=False)
    path = export_scenario(sub, run.schema, _example(run, args.scenario), args.out, run_config=config_yaml)
    print(f"[serve] wrote {path} (scenario {args.scenario}, checkpoint {run.checkpoint})")


def _packages(paths: Sequence[str]) -> Predictor:
    from mtfm_rec.serve.export import load_package

    scorers: Dict[str, ScoreFn] = {}
    schema = None
    for path in paths:
        scorer = load_package(path)
        if scorer.scenario in scorers:
            raise ServingError(f"{path}: a second package for scenario {scorer.scenario!r}")
        if schema is not None and scorer.schema.to_dict() != schema.to_dict():
            raise ServingError(f"{path}: trained on another dataset schema than {paths[0]}")
        schema = scorer.schema
        scorers[scorer.scenario] = scorer
    assert schema is not None
    return Predictor(schema, scorers)


def _run_predictor(args: argparse.Namespace) -> Predictor:
    run = _load(args)
    names = args.scenario or [s.name for s in run.schema.scenarios]
    store_size = getattr(args, "context_cache", 0)
    scorers: Dict[str, ScoreFn] = {}
    for name in names:
        sub = _subgraph(run, name, getattr(args, "bf16", False), getattr(args, "sparse_2to4", False))
        scorers[name] = eager_scorer(sub, args.micro_batch, ContextStore(store_size) if store_size else None)
    return Predictor(run.schema, scorers)


def _replay_config(args: argparse.Namespace) -> Config:
    if args.run_dir:
        with open(f"{args.run_dir}/config.yaml") as fh:
            raw = yaml.safe_load(fh)
    else:
        from mtfm_rec.serve.export import read_metadata

        meta = read_metadata(args.model[0])
        if not meta.run_config:
            raise ServingError(f"{args.model[0]}: the package holds no run config; replay with --run-dir")
        raw = yaml.safe_load(meta.run_config)
    overrides = list(args.overrides) + ([f"data.raw={args.raw}"] if args.raw else [])
    return from_dict(Config, apply_overrides(raw, overrides), "replay config")


def _replay(args: argparse.Namespace) -> None:
    from mtfm_rec.serve.replay import replay_split

    predictor = _run_predictor(args) if args.run_dir else _packages(args.model)
    metrics = replay_split(predictor, _replay_config(args), args.split, args.out)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    print(f"[serve] wrote {args.out}")


def _http(args: argparse.Namespace) -> None:
    from mtfm_rec.serve.http import serve

    predictor = _run_predictor(args) if args.run_dir else _packages(args.model)
    serve(predictor, host=args.host, port=args.port, max_batch_wait_ms=args.max_batch_wait_ms)


def _source(parser: argparse.ArgumentParser, with_compression: bool = True) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--model", action="append", help="an exported .pt2 package (repeat for more scenarios)"
    )
    group.add_argument("--run-dir", help="a training run directory (eager M-Falcon)")
    parser.add_argument("--checkpoint", default="best", help="with --run-dir: best | latest | <path>")
    parser.add_argument(
        "--scenario", action="append", help="with --run-dir: scenarios to serve (default all)"
    )
    parser.add_argument(
        "--micro-batch", type=int, default=0, help="with --run-dir: candidates per step (0: all)"
    )
    if with_compression:
        parser.add_argument("--bf16", action="store_true", help="with --run-dir: bf16 subgraphs")
        _compression(parser)


def _compression(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sparse-2to4", action="store_true", help="2:4-pruned HSTU projections")
    parser.add_argument(
        "--finetune-steps", type=int, default=0, help="with --sparse-2to4: fine-tune steps, masks fixed"
    )
    parser.add_argument("--finetune-lr", type=float, default=1e-3)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mtfm_rec.serve", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="AOTInductor package of one scenario's subgraph")
    exp.add_argument("--run-dir", required=True)
    exp.add_argument("--scenario", required=True)
    exp.add_argument("--out", required=True, help="the .pt2 package to write")
    exp.add_argument("--checkpoint", default="best")
    exp.add_argument("--bf16", action="store_true")
    _compression(exp)
    rep = sub.add_parser("replay", help="score an evaluation split through the serving path")
    _source(rep)
    rep.add_argument("--raw", help="the raw dataset root (default: the run's data.raw)")
    rep.add_argument("--out", required=True, help="scores.parquet")
    rep.add_argument("--split", default="test", choices=["test", "valid"])
    rep.add_argument("overrides", nargs="*", help="config overrides, e.g. data.eval_after=TS")
    web = sub.add_parser("http", help="the HTTP scoring service")
    _source(web, with_compression=False)
    web.add_argument("--host", default="127.0.0.1")
    web.add_argument("--port", type=int, default=8000)
    web.add_argument("--max-batch-wait-ms", type=float, default=2.0)
    web.add_argument(
        "--context-cache", type=int, default=0, help="with --run-dir: LRU entries of encoded contexts"
    )
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    commands = {"export": _export, "replay": _replay, "http": _http}
    try:
        commands[args.command](args)
    except ServingError as exc:
        sys.exit(f"[serve] error: {exc}")


if __name__ == "__main__":
    main()
