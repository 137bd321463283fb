"""``python -m mtfm_rec.experiments <command> --config ... [key=value ...]`` (see the package doc)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import List, Optional, Sequence


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mtfm_rec.experiments", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    compare = sub.add_parser("compare", help="models x seeds, the paper's Table 2 (docs/EXPERIMENTS.md)")
    compare.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    compare.add_argument("--models", required=True, help="comma-separated model.name values")
    compare.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    compare.add_argument("--name", default="", help="experiment directory name (default: the config's)")
    compare.add_argument("--runs-dir", default="runs", help="parent of the experiment directory")
    compare.add_argument(
        "--launcher",
        default="",
        help="runs each job's module with this instead of python, e.g. 'torchrun --nproc_per_node 8'",
    )
    compare.add_argument("overrides", nargs="*", help="dotted key=value overrides applied to every job")
    return parser.parse_args(argv)


def _ints(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mtfm_rec.config import ConfigError
    from mtfm_rec.experiments import compare
    from mtfm_rec.experiments.jobs import JobFailedError, run_jobs

    args = _parse(argv)
    name = args.name or os.path.splitext(os.path.basename(args.config))[0]
    root = os.path.join(args.runs_dir, name)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        jobs = compare.plan(args.config, models, _ints(args.seeds), args.overrides)
        os.makedirs(root, exist_ok=True)
        run_jobs(jobs, root, shlex.split(args.launcher))
    except (ConfigError, JobFailedError) as exc:
        print(f"[experiments] error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 2
    meta = {
        "config": args.config,
        "models": models,
        "seeds": _ints(args.seeds),
        "overrides": args.overrides,
    }
    compare.report(jobs, root, compare.metric_keys(args.config, args.overrides), meta)
    print(f"[experiments] wrote {root}/compare.json, compare.md, compare.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
