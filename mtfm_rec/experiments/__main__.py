"""``python -m mtfm_rec.experiments <command> --config ... [key=value ...]`` (see the package doc)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from typing import Any, Dict, List, Optional, Sequence


def _common(parser: argparse.ArgumentParser) -> None:
    """The arguments of every experiment that plans training jobs."""
    parser.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--name", default="", help="experiment directory name (default: the config's)")
    parser.add_argument("--runs-dir", default="runs", help="parent of the experiment directory")
    parser.add_argument(
        "--launcher",
        default="",
        help="runs each job's module with this instead of python, e.g. 'torchrun --nproc_per_node 8'",
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="jobs at once (default 1), each with cores/N threads and, on a GPU machine, its own GPUs",
    )
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides applied to every job")


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    from mtfm_rec.experiments import heatmap, hta_sweep, scaling

    parser = argparse.ArgumentParser(prog="python -m mtfm_rec.experiments", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    compare = sub.add_parser("compare", help="models x seeds, the paper's Table 2 (docs/EXPERIMENTS.md)")
    compare.add_argument("--models", required=True, help="comma-separated model.name values")
    compare.add_argument(
        "--model-config",
        action="append",
        default=[],
        metavar="MODEL=PATH",
        help="a model's own config (its model section; same data and train as --config), repeatable",
    )
    _common(compare)
    sweep = sub.add_parser("hta-sweep", help="(K:P) x B stacks: quality against cost, the paper's Table 3")
    sweep.add_argument(
        "--stacks", default=",".join(hta_sweep.PAPER_STACKS), help="K:PxB[/nogqa][/batch<N>], ..."
    )
    _common(sweep)
    scale = sub.add_parser("scaling", help="quality against model size and data, the paper's Figure 4")
    scale.add_argument(
        "--sizes", default=",".join(scaling.DEFAULT_SIZES), help="d_model x blocks x heads, ..."
    )
    scale.add_argument(
        "--baseline", default="mmoe", help="a baseline model.name beside the ladder ('' for none)"
    )
    _common(scale)
    heat = sub.add_parser("heatmap", help="attention of T tokens over H tokens, the paper's Figure 5")
    heatmap.add_arguments(heat)
    return parser.parse_args(argv)


def _ints(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> List[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _model_configs(items: Sequence[str]) -> Dict[str, str]:
    """``["mtfm=configs/x.yaml"]`` -> ``{"mtfm": "configs/x.yaml"}``."""
    from mtfm_rec.config import ConfigError

    out: Dict[str, str] = {}
    for item in items:
        model, _, path = item.partition("=")
        if not model or not path or model in out:
            raise ConfigError(f"--model-config {item!r}: expected MODEL=PATH, once per model")
        out[model] = path
    return out


def _plan(args: argparse.Namespace) -> List[Any]:
    from mtfm_rec.experiments import compare, hta_sweep, scaling

    seeds = _ints(args.seeds)
    if args.command == "compare":
        models = _names(args.models)
        return compare.plan(args.config, models, seeds, args.overrides, _model_configs(args.model_config))
    if args.command == "hta-sweep":
        return hta_sweep.plan(args.config, _names(args.stacks), seeds, args.overrides)
    return scaling.plan(args.config, _names(args.sizes), seeds, args.overrides, args.baseline)


def _report(args: argparse.Namespace, jobs: List[Any], root: str, meta: Dict[str, Any]) -> str:
    from mtfm_rec.experiments import compare, hta_sweep, scaling

    keys = compare.metric_keys(args.config, args.overrides)
    if args.command == "compare":
        configs = _model_configs(args.model_config)
        compare.report(jobs, root, keys, {**meta, "models": _names(args.models), "model_configs": configs})
        return "compare.json, compare.md, compare.png"
    if args.command == "hta-sweep":
        hta_sweep.report(jobs, root, keys, {**meta, "stacks": _names(args.stacks)})
        return "hta_sweep.json, hta_sweep.md, hta_sweep.png"
    scaling.report(jobs, root, keys, _names(args.sizes), {**meta, "sizes": _names(args.sizes)})
    return "scaling.json, scaling.md, scaling_size.png, scaling_data.png"


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mtfm_rec.config import ConfigError
    from mtfm_rec.experiments.jobs import JobFailedError, run_jobs

    args = _parse(argv)
    if args.command == "heatmap":
        from mtfm_rec.experiments import heatmap

        return heatmap.run_from_args(args)
    name = args.name or os.path.splitext(os.path.basename(args.config))[0]
    root = os.path.join(args.runs_dir, name)
    start = time.perf_counter()
    try:
        jobs = _plan(args)
        os.makedirs(root, exist_ok=True)
        run_jobs(jobs, root, shlex.split(args.launcher), parallel=args.parallel)
    except (ConfigError, JobFailedError) as exc:
        print(f"[experiments] error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 2
    from mtfm_rec.bench import machine

    # The machine goes with the results: comparisons run in parts on different machines are
    # reported together (mtfm_rec.bench.baselines), each part's wall times on its own machine.
    meta = {"config": args.config, "seeds": _ints(args.seeds), "overrides": args.overrides}
    meta["machine"] = machine()
    written = _report(args, jobs, root, {**meta, "wall_seconds": time.perf_counter() - start})
    print(f"[experiments] wrote {root}/{{{written}}}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
