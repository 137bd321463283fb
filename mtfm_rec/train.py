"""Train, validate and test an MTFM model: the entry point, also the torchx / torchrun script.

    python -m mtfm_rec.train --config configs/ml1m_genre.yaml data.raw=data/ml1m_genre
    torchrun --nproc_per_node 2 -m mtfm_rec.train --config configs/synthetic.yaml data.raw=...
    torchx run -s local_cwd dist.ddp -j 1x2 --script mtfm_rec/train.py -- --config ...

Writes into ``train.run_dir``: ``metrics.json`` (test split), ``valid_metrics.json``,
``predictions.parquet`` (with ``train.save_predictions=true``), ``fit_summary.json`` (steps,
samples, throughput, data-wait share, peak memory), ``log.csv``, ``tb/``,
``curves.png``, ``checkpoints/`` and ``config.yaml``; prints AUC / GAUC per scenario x task of
the test split beside the validation split.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a file (torchx --script mtfm_rec/train.py): sys.path[0] is mtfm_rec/, whose
    # data/, config.py, ... would shadow top-level modules of the same name. Put the repo
    # root there instead, so ``import mtfm_rec`` works from a checkout without installing.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Type  # noqa: E402

import yaml  # noqa: E402


def format_table(splits: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """A fixed-width table: one row per scenario/task, AUC and GAUC per split, plus counts."""
    names = list(splits)
    keys: List[str] = []
    for metrics in splits.values():
        keys += [k for k in metrics if k not in keys]

    def cell(v: Optional[float]) -> str:
        return "   -  " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

    width = max([len("scenario/task")] + [len(k) for k in keys])
    head = f"{'scenario/task':<{width}}" + "".join(f"  {n + ' AUC':>11}  {n + ' GAUC':>11}" for n in names)
    head += "".join(f"  {n + ' n':>9}" for n in names)
    lines = [head, "-" * len(head)]
    for key in keys:
        row = f"{key:<{width}}"
        for n in names:
            m = splits[n].get(key, {})
            row += f"  {cell(m.get('auc')):>11}  {cell(m.get('gauc')):>11}"
        for n in names:
            row += f"  {int(splits[n].get(key, {}).get('count', 0)):>9d}"
        lines.append(row)
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train an MTFM model (see docs/TRAINING.md).")
    parser.add_argument("--config", default=None, help="YAML config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Runs fit, then evaluates ``train.eval_splits``; returns {split: metrics}."""
    from mtfm_rec.config import load_config, to_dict
    from mtfm_rec.training.metrics import write_metrics_json
    from mtfm_rec.training.trainer import Trainer, log0

    args = parse_args(argv)
    config = load_config(args.config, args.overrides)
    trainer = Trainer(config)
    results: Dict[str, Dict[str, Dict[str, float]]] = {}
    try:
        if trainer.info.is_main:
            with open(os.path.join(trainer.run_dir, "config.yaml"), "w") as fh:
                yaml.safe_dump(to_dict(config), fh, sort_keys=False)
        summary = trainer.fit()
        run_dir = trainer.run_dir
        if trainer.info.is_main:
            with open(os.path.join(run_dir, "fit_summary.json"), "w") as fh:
                json.dump({**summary, "world_size": trainer.info.world_size}, fh, indent=2, default=str)
        for split in config.train.eval_splits:
            if split == "test" and config.train.save_predictions:
                results[split] = trainer.predict(split)
            else:
                results[split] = trainer.evaluate(split)
            if trainer.info.is_main:
                name = "metrics.json" if split == "test" else f"{split}_metrics.json"
                write_metrics_json(os.path.join(run_dir, name), results[split])
        if trainer.info.is_main and results:
            best = summary.get("best")
            chosen = f"best validation step {best['step']}" if best else f"last step {summary['step']}"
            order = sorted(results, key=lambda s: s != "test")  # test first, then valid
            print(f"\n[train] {run_dir}: model of the {chosen}; {summary['samples_seen']} samples seen")
            print(format_table({s: results[s] for s in order}), flush=True)
        log0(trainer.info, f"wrote {run_dir}/metrics.json")
    finally:
        trainer.close()
    return results


def known_errors() -> Tuple[Type[BaseException], ...]:
    """The project's error classes, whose messages say all there is (docs/TRAINING.md "Errors")."""
    from mtfm_rec.config import ConfigError
    from mtfm_rec.data.errors import AggregationError, LoaderError
    from mtfm_rec.data.reader import DataContractError
    from mtfm_rec.data.schema import SchemaError
    from mtfm_rec.training.checkpoint_files import CheckpointError
    from mtfm_rec.training.metrics import NonFiniteError
    from mtfm_rec.training.run_checks import EmptySplitError
    from mtfm_rec.training.run_lock import RunDirLockedError

    return (
        ConfigError,
        EmptySplitError,
        NonFiniteError,
        RunDirLockedError,
        CheckpointError,
        DataContractError,
        SchemaError,
        AggregationError,
        LoaderError,
    )


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """:func:`main` for the command line: one of :func:`known_errors` is printed as one line
    naming its class, exit code 2; anything else keeps its traceback."""
    errors = known_errors()
    try:
        main(argv)
    except errors as exc:
        rank = os.environ.get("RANK")
        where = f" (rank {rank})" if rank not in (None, "0") else ""
        print(f"[train] error{where}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
