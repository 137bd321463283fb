"""Which split (train, valid, test) each exposure belongs to, and which rows of a shard that keeps.

An exposure's split is its stored ``exp/<s>/split`` value when that is ``>= 0``; otherwise it is
split by time with ``eval_after`` / ``valid_after`` (dataset ticks). The loader
(:mod:`mtfm_rec.data.shard_index`, :mod:`mtfm_rec.data.sharded_dataset`) and the trainer use
these rules; docs/LOADER.md ("Splits") describes them.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtfm_rec.data import sample_format as fmt
from mtfm_rec.data.errors import LoaderError
from mtfm_rec.data.schema import DatasetSchema

SPLITS = ("train", "valid", "test", "all")
_SPLIT_CODE = {"train": fmt.SPLIT_TRAIN, "valid": fmt.SPLIT_VALID, "test": fmt.SPLIT_TEST}


def exposure_split(
    ts: np.ndarray,
    split_col: np.ndarray,
    eval_after: Optional[int],
    valid_after: Optional[int],
) -> np.ndarray:
    """The split code (0 train, 1 valid, 2 test) of each exposure.

    An explicit ``split`` value (>= 0) wins; otherwise the exposure is split by time:
    ``ts >= eval_after`` is test, ``valid_after <= ts < eval_after`` is valid, the rest train.

    Args:
        ts: exposure timestamps (dataset ticks).
        split_col: the stored ``exp/<s>/split`` values (``-1``: split by time).
        eval_after: first test tick, or None (no test by time).
        valid_after: first validation tick, or None (no validation by time).
    """
    out = np.full(len(ts), fmt.SPLIT_TRAIN, np.int8)
    if valid_after is not None:
        out[ts >= valid_after] = fmt.SPLIT_VALID
    if eval_after is not None:
        out[ts >= eval_after] = fmt.SPLIT_TEST
    explicit = split_col >= 0
    out[explicit] = split_col[explicit]
    return out


def split_masks(
    table: pa.Table,
    schema: DatasetSchema,
    split: str,
    eval_after: Optional[int],
    valid_after: Optional[int],
    scenarios: Sequence[str] = (),
) -> Tuple[np.ndarray, Optional[Dict[str, np.ndarray]]]:
    """Which rows and exposures of ``table`` belong to ``split``.

    Args:
        scenarios: when not empty, only these scenarios' exposures are kept (``data.scenarios``:
            a per-scenario model trains and is evaluated on its scenario's exposures alone).

    Returns:
        (row_keep [num_rows] bool, exposure_keep per scenario over the flattened exposures, or
        None for ``split="all"`` over every scenario). A row is kept when at least one of its
        exposures is.
    """
    if split == "all" and not scenarios:
        return np.ones(table.num_rows, bool), None
    row_keep = np.zeros(table.num_rows, bool)
    exposure_keep: Dict[str, np.ndarray] = {}
    for s in schema.scenarios:
        ts_col = table.column(fmt.exp_ts(s.name))
        lengths = pc.fill_null(pc.list_value_length(ts_col), 0).to_numpy().astype(np.int64)
        if scenarios and s.name not in scenarios:
            exposure_keep[s.name] = np.zeros(int(lengths.sum()), bool)
            continue
        if split == "all":
            keep = np.ones(int(lengths.sum()), bool)
        else:
            keep = _split_keep(table, s.name, ts_col, split, eval_after, valid_after)
        exposure_keep[s.name] = keep
        rows = np.repeat(np.arange(table.num_rows), lengths)
        row_keep[rows[keep]] = True
    return row_keep, exposure_keep


def _split_keep(
    table: pa.Table,
    scenario: str,
    ts_col: pa.ChunkedArray,
    split: str,
    eval_after: Optional[int],
    valid_after: Optional[int],
) -> np.ndarray:
    """Which of ``scenario``'s flattened exposures belong to ``split``."""
    ts = pc.list_flatten(ts_col).to_numpy(zero_copy_only=False).astype(np.int64)
    raw_split = pc.list_flatten(table.column(fmt.exp_split(scenario)))
    raw_split = raw_split.to_numpy(zero_copy_only=False).astype(np.int8)
    if len(raw_split) != len(ts):
        raise LoaderError(
            f"{fmt.exp_split(scenario)} and {fmt.exp_ts(scenario)} differ in length; "
            "all list columns of a scenario must share lengths"
        )
    return exposure_split(ts, raw_split, eval_after, valid_after) == _SPLIT_CODE[split]
