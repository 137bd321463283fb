"""Checks a run makes before and while it trains, and the messages that explain a split.

:func:`check_start` refuses a run that cannot start (before any process group or file is
touched); :class:`EmptySplitError` is raised when a split the run needs is empty, with
:func:`split_rule` and :func:`describe_time_range` saying which exposures each split holds and
where the data's timestamps lie, so the user can fix ``data.eval_after`` / ``data.valid_after``.
"""

from __future__ import annotations

import os
from typing import List, Optional

import numpy as np
import torch

from mtfm_rec.config import Config, ConfigError
from mtfm_rec.data import sample_format as fmt
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.data.splits import exposure_split
from mtfm_rec.training.checkpoint_files import is_complete
from mtfm_rec.training.config import RESUME_MODES


class EmptySplitError(ValueError):
    """A split that ``fit`` needs (train; valid when validating) has no batches or no labelled
    exposures; the message gives the split boundaries and the data's time range."""


def check_start(config: Config) -> None:
    """Refuses a run that cannot start, before any process group or file is touched.

    Raises:
        ConfigError: ``train.run_dir`` is an existing file; ``train.device=cuda`` without a
            visible GPU; ``train.resume`` is a path that is not a complete checkpoint.
    """
    tcfg = config.train
    if os.path.exists(tcfg.run_dir) and not os.path.isdir(tcfg.run_dir):
        raise ConfigError(
            f"train.run_dir={tcfg.run_dir!r} is an existing file, not a directory: "
            "pass a directory (created if missing)"
        )
    if tcfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.device=cuda but PyTorch sees no GPU (torch.cuda.is_available() is False): "
            "use train.device=auto or train.device=cpu"
        )
    if tcfg.resume not in RESUME_MODES:
        if not is_complete(tcfg.resume):
            exists = os.path.isdir(tcfg.resume)
            why = "is not a complete checkpoint (no COMPLETE marker)" if exists else "does not exist"
            raise ConfigError(
                f"train.resume={tcfg.resume!r} {why}: pass a checkpoint directory "
                "(<run_dir>/checkpoints/step_<N>), auto (the newest in train.run_dir) or never"
            )


def filled_note(filled: List[str]) -> str:
    """Where split boundaries the user did not set came from, for error messages."""
    return "".join(f" (data.{key} is the dataset's recommended_{key})" for key in filled)


def split_rule(split: str, eval_after: Optional[int], valid_after: Optional[int]) -> str:
    """The time rule of ``split`` in words (``mtfm_rec.data.splits.exposure_split``)."""
    if split == "train":
        first = valid_after if valid_after is not None else eval_after
        return "train is every exposure" if first is None else f"train is ts < {first}"
    if split == "valid":
        if valid_after is None:
            return "valid by time is empty: data.valid_after is unset"
        return f"valid is {valid_after} <= ts" + (f" < {eval_after}" if eval_after is not None else "")
    if split == "test":
        if eval_after is None:
            return "test by time is empty: data.eval_after is unset"
        return f"test is ts >= {eval_after}"
    return "all is every exposure"


def describe_time_range(
    dataset_dir: str, schema: DatasetSchema, eval_after: Optional[int], valid_after: Optional[int]
) -> str:
    """The exposures' ts range of an aggregated dataset and how the boundaries split them.

    Reads only the ``exp/<s>/ts`` and ``exp/<s>/split`` columns of every shard: meant for the
    message of an error, not for the training path.
    """
    import fsspec
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs, root = fsspec.core.url_to_fs(dataset_dir)
    columns = [c for s in schema.scenarios for c in (fmt.exp_ts(s.name), fmt.exp_split(s.name))]
    lo, hi, explicit = None, None, 0
    counts = np.zeros(3, np.int64)  # train, valid, test
    for path in sorted(fs.glob(f"{root.rstrip('/')}/{fmt.SHARD_GLOB}")):
        with fs.open(path, "rb") as fh:
            table = pq.read_table(fh, columns=columns)
        for s in schema.scenarios:
            ts = (
                pc.list_flatten(table.column(fmt.exp_ts(s.name)))
                .to_numpy(zero_copy_only=False)
                .astype(np.int64)
            )
            if not len(ts):
                continue
            raw = (
                pc.list_flatten(table.column(fmt.exp_split(s.name)))
                .to_numpy(zero_copy_only=False)
                .astype(np.int8)
            )
            lo = int(ts.min()) if lo is None else min(lo, int(ts.min()))
            hi = int(ts.max()) if hi is None else max(hi, int(ts.max()))
            counts += np.bincount(exposure_split(ts, raw, eval_after, valid_after), minlength=3)[:3]
            explicit += int((raw >= 0).sum())
    if lo is None or hi is None:
        return f"the aggregated data ({dataset_dir}) has no exposures"
    year = 1970 + hi / schema.ticks_per_second / 31_556_952
    unit = f"in {schema.time_unit} by dataset.yaml"
    if year > 2200:  # e.g. milliseconds declared as seconds
        unit += f", which puts them in the year {year:.0f}: are they in a finer unit than {schema.time_unit}?"
    by_column = f" ({explicit} of them by the split column)" if explicit else ""
    return (
        f"the aggregated exposures' ts run from {lo} to {hi} ({unit}); these boundaries split them into "
        f"train {counts[0]}, valid {counts[1]}, test {counts[2]}{by_column}"
    )
