"""A training job for the distributed tests, run as ``python worker.py OUT_JSON [overrides]``
under torchrun (any world size) or alone.

It trains the stand-in model on the stand-in dataset (see standins.py) with the global batch
fixed at 16 samples whatever the world size, then writes ``OUT_JSON``: the per-step losses
from log.csv, step and samples seen, the step it resumed from, torchrun's restart count, the
test metrics and (world size 1) every parameter.

``WORKER_SIGKILL=RANK:STEP`` makes rank RANK SIGKILL itself, on a torchrun job's first attempt
only (``TORCHELASTIC_RESTART_COUNT`` 0), when its train loader hands out the batch of step STEP
(the pipeline pulls two batches ahead, so steps up to STEP - 3 are done by then): a hard kill
mid-step that no ``finally`` or signal handler sees.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Callable, Dict, Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from standins import QUIET, SCHEMA, StandinLoader, StandinModel, make_table  # noqa: E402

from mtfm_rec.config import load_config  # noqa: E402
from mtfm_rec.data.batch import Batch  # noqa: E402
from mtfm_rec.training.logger import read_log  # noqa: E402
from mtfm_rec.training.sharding import describe_plan  # noqa: E402
from mtfm_rec.training.trainer import Trainer  # noqa: E402

GLOBAL_BATCH = 16


class SigkillLoader(StandinLoader):
    """A StandinLoader whose process SIGKILLs itself when it hands out the batch of ``kill_step``
    (batch ``b`` of epoch ``e`` is trained at step ``e * len(self) + b + 1``)."""

    def __init__(self, *args: object, kill_step: int) -> None:
        super().__init__(*args)
        self.kill_step = kill_step

    def __iter__(self) -> Iterator[Batch]:
        for batch in super().__iter__():
            if self.epoch * self.num_batches + self.batches_in_epoch == self.kill_step:
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch


def make_loader_fn(table: pa.Table, rank: int, world: int) -> Callable[[str], StandinLoader]:
    """The loaders of the job, the train one a :class:`SigkillLoader` when ``WORKER_SIGKILL``
    names this rank and this is the first attempt."""
    kill_rank, _, kill_step = os.environ.get("WORKER_SIGKILL", "").partition(":")
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if kill_rank and int(kill_rank) == rank and first_attempt:
        return lambda split: (
            SigkillLoader(table, split, GLOBAL_BATCH, rank, world, kill_step=int(kill_step))
            if split == "train"
            else StandinLoader(table, split, GLOBAL_BATCH, rank, world)
        )
    return lambda split: StandinLoader(table, split, GLOBAL_BATCH, rank, world)


def full_parameters(trainer: Trainer) -> Dict[str, list]:
    """Every tensor of a one-rank model's state as a list (ShardedTensors assembled)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    out = {}
    for key, value in trainer.model.state_dict().items():
        if isinstance(value, ShardedTensor):
            full = torch.zeros(value.size())
            for shard in value.local_shards():
                md = shard.metadata
                idx = tuple(slice(o, o + s) for o, s in zip(md.shard_offsets, md.shard_sizes))
                full[idx] = shard.tensor.detach().float().cpu()
            value = full
        out[key.replace("_dmp_wrapped_module.", "").replace("module.", "")] = (
            value.detach().float().cpu().tolist()
        )
    return out


def main() -> None:
    """``WORKER_EVAL_AT_RESUME=1``: also evaluate the test split right after resuming."""
    out_path, overrides = sys.argv[1], sys.argv[2:]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cfg = load_config(
        None,
        [
            f"data.loader.batch_size={GLOBAL_BATCH // world}",
            *QUIET,
            "train.log_every=1",
            "train.deterministic=true",
            *overrides,
        ],
    )
    torch.set_num_threads(1)
    table = make_table(256)
    trainer = Trainer(
        cfg,
        model_fn=lambda schema: StandinModel(schema),
        loader_fn=make_loader_fn(table, rank, world),
        schema=SCHEMA,
    )
    try:
        # fit() would resume the same way; resuming here first records the step it resumed at
        result = {
            "resumed_step": trainer.step if trainer.maybe_resume() else None,
            "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        }
        if os.environ.get("WORKER_EVAL_AT_RESUME"):
            result["test_at_resume"] = trainer.evaluate("test")
        summary = trainer.fit()
        result.update(
            {
                "step": summary["step"],
                "samples_seen": summary["samples_seen"],
                "best": summary["best"],
                "plan": describe_plan(trainer.plan),
                "test": trainer.evaluate("test"),
            }
        )
        if trainer.info.is_main:
            result["losses"] = read_log(trainer.run_dir).get("train/loss", [])
            if world == 1:
                result["params"] = full_parameters(trainer)
            with open(out_path, "w") as fh:
                json.dump(result, fh)
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
