"""What the visible real-time actions say about the planted intent: its posterior per exposure.

In a dataset of ``mtfm_rec.data.synthetic`` an exposure's click gets the intent boost
(``intent_hit``) when its session began with a burst on the exposure's category and the burst's
first action came before the exposure. A model never sees sessions or bursts: it sees the
user's real-time actions of the window (the day) strictly before the exposure, the bursts',
background browses drawn from taste and the echoes of earlier clicks alike, each a (ts,
category). The plug-in references bracket what that is worth with the true hit (which no model
sees) and one real-time hit (which reads a background click as intent); this module estimates
the posterior in between.

:class:`IntentPosterior` summarises each exposure's visible actions in a few counts
(:func:`visible_intent_cells`) and learns ``P(intent_hit | cell)`` as the smoothed rate of true
hits in each cell over the train split, pooled over scenarios (the rule that makes a hit is the
same in all). The summary only ever drops information, so a model reading every action could
know more; the rates are learned from the true hits, a supervision no model gets. The
``plug_in_posterior`` reference (:mod:`mtfm_rec.bench.references`) plugs the posterior in::

    p(click) = q * sigmoid(z + w) + (1 - q) * sigmoid(z)

with ``z`` the plug-in's click logit without the intent term and ``w`` the scenario's intent
weight: the posterior mean of the probability, not a thresholded hit.

The summary, per exposure at ``ts`` of category ``c`` (``reach``: the longest time a burst's
first action can precede an exposure of its session, 1800 s):

================  =================================================================  ======
cell              visible actions with ``max(window start, ts - reach) <= ts' < ts``  values
================  =================================================================  ======
``recent``        of category ``c``, counted (3 = 3 or more)                          0-3
``since_first``   seconds since the first of them, bucketed at 20, 60, 240, 600 s      0-5
``paired``        the first two of them within one burst's span (240 s)                0-1
``rival``         the most actions of any one other category (2 = 2 or more)           0-2
``earlier``       of category ``c``, from the window start to the reach (2 = 2+)       0-2
================  =================================================================  ======

Two time-free summaries (:data:`SUMMARIES`) measure what the times are worth: ``ordered`` knows
the order of the day's actions but not their times (the day's count of ``c``, its count among
the last three actions, whether the last one has it, the most of any other category), and
``day_count`` the day's count of ``c`` alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import numpy as np

from mtfm_rec.bench.sort_keys import sort_keys
from mtfm_rec.data.synthetic import BURST_SECONDS, REQUEST_OFFSET_SECONDS

# An exposure is at most this long after its session's start, and a burst begins at or after it.
REACH_SECONDS = REQUEST_OFFSET_SECONDS[1]
SINCE_FIRST_EDGES = (20, 60, BURST_SECONDS, 600)  # buckets of ts - the first recent c-action
CELL_SIZES = {"recent": 4, "since_first": len(SINCE_FIRST_EDGES) + 2, "paired": 2, "rival": 3, "earlier": 3}
ORDERED_SIZES = {"day": 4, "last_three": 4, "last": 2, "rival": 3}
DAY_COUNT_SIZES = {"day": 4}
PRIOR_WEIGHT = 1.0  # pseudo-exposures at the overall rate in every cell (a cell of 0 rows gets it)


def visible_intent_cells(
    actions: Dict[str, np.ndarray],
    user: np.ndarray,
    ts: np.ndarray,
    window_start: np.ndarray,
    category: np.ndarray,
) -> Dict[str, np.ndarray]:
    """The summary cells (module docstring) of every exposure's visible real-time actions.

    Args:
        actions: the real-time actions, ``user``, ``ts`` and ``category`` arrays sorted by
            (user, ts) (:class:`mtfm_rec.bench.references.HistoryFeatures`' ``realtime``).
        user, ts, window_start, category: [n] per exposure (the global category).

    Returns:
        ``{cell: [n] int64}`` for each name of :data:`CELL_SIZES`.
    """
    reach_start = np.maximum(window_start, ts - REACH_SECONDS)
    pair_row, pair_ts, pair_cat = _actions_in(actions, user, reach_start, ts)
    same = pair_cat == category[pair_row]
    n = len(user)
    recent = np.bincount(pair_row[same], minlength=n)
    # pairs are in (row, ts) order: a row's first two same-category pairs are its first two
    same_rows, same_ts = pair_row[same], pair_ts[same]
    first_at = np.searchsorted(same_rows, np.arange(n), side="left")
    padded = np.append(same_ts, 0)  # rows without a first or second action read the pad
    has_first = recent >= 1
    first_ts = np.where(has_first, padded[first_at], 0)
    second_ts = np.where(recent >= 2, padded[np.minimum(first_at + 1, len(same_ts))], 0)
    since = np.where(has_first, 1 + np.searchsorted(SINCE_FIRST_EDGES, ts - first_ts, side="left"), 0)
    paired = (recent >= 2) & (second_ts - first_ts < BURST_SECONDS)
    rival = _most_of_another_category(pair_row[~same], pair_cat[~same], n)
    earlier = _count_in(actions, user, window_start, reach_start, category)
    return {
        "recent": np.minimum(recent, CELL_SIZES["recent"] - 1),
        "since_first": since.astype(np.int64),
        "paired": paired.astype(np.int64),
        "rival": np.minimum(rival, CELL_SIZES["rival"] - 1),
        "earlier": np.minimum(earlier, CELL_SIZES["earlier"] - 1),
    }


def _actions_in(
    actions: Dict[str, np.ndarray], user: np.ndarray, start: np.ndarray, end: np.ndarray
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, ts, category) of every action of row's user with ``start <= ts' < end``, in (row,
    ts) order: each row's actions are one contiguous run of the (user, ts)-sorted table."""
    lo = _position(actions, user, start)
    hi = _position(actions, user, end)
    counts = np.maximum(hi - lo, 0)
    rows = np.repeat(np.arange(len(user)), counts)
    offset = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    at = np.repeat(lo, counts) + offset
    return rows, actions["ts"][at], actions["category"][at]


def _position(actions: Dict[str, np.ndarray], user: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Index of the first action of ``user`` at or after ``ts`` in the (user, ts)-sorted table."""
    keys, queries = sort_keys(actions["user"], actions["ts"], user, ts)
    return np.searchsorted(keys, queries, side="left")


def _count_in(
    actions: Dict[str, np.ndarray],
    user: np.ndarray,
    start: np.ndarray,
    end: np.ndarray,
    category: np.ndarray,
) -> np.ndarray:
    """Actions of each row's user and ``category`` with ``start <= ts' < end``."""
    rows, _, cat = _actions_in(actions, user, start, end)
    return np.bincount(rows[cat == category[rows]], minlength=len(user))


def _most_of_another_category(rows: np.ndarray, category: np.ndarray, n: int) -> np.ndarray:
    """[n] the largest count of one category among each row's (row, category) pairs."""
    out = np.zeros(n, np.int64)
    if len(rows):
        pairs, counts = np.unique(rows * (int(category.max()) + 1) + category, return_counts=True)
        np.maximum.at(out, pairs // (int(category.max()) + 1), counts)
    return out


def ordered_cells(
    actions: Dict[str, np.ndarray],
    user: np.ndarray,
    ts: np.ndarray,
    window_start: np.ndarray,
    category: np.ndarray,
) -> Dict[str, np.ndarray]:
    """The ``ordered`` summary (module docstring) of each exposure's actions of the day before it."""
    rows, _, cat = _actions_in(actions, user, window_start, ts)
    n = len(user)
    count = np.bincount(rows, minlength=n)
    from_end = np.cumsum(count)[rows] - 1 - np.arange(len(rows))  # 0 = the row's latest action
    same = cat == category[rows]
    return {
        "day": np.minimum(np.bincount(rows[same], minlength=n), ORDERED_SIZES["day"] - 1),
        "last_three": np.bincount(rows[same & (from_end < 3)], minlength=n),
        "last": np.bincount(rows[same & (from_end == 0)], minlength=n),
        "rival": np.minimum(
            _most_of_another_category(rows[~same], cat[~same], n), ORDERED_SIZES["rival"] - 1
        ),
    }


def day_count_cells(
    actions: Dict[str, np.ndarray],
    user: np.ndarray,
    ts: np.ndarray,
    window_start: np.ndarray,
    category: np.ndarray,
) -> Dict[str, np.ndarray]:
    """The ``day_count`` summary: the day's actions of the candidate's category before it."""
    day = _count_in(actions, user, window_start, ts, category)
    return {"day": np.minimum(day, DAY_COUNT_SIZES["day"] - 1)}


# (actions, user, ts, window_start, category) -> {cell: [n] int64}: the three functions above
Cells = Callable[
    [Dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, np.ndarray], Dict[str, np.ndarray]
]


@dataclass(frozen=True)
class Summary:
    """A summary of the visible actions: its cell function and each cell's number of values."""

    cells: Cells
    sizes: Dict[str, int]


SUMMARIES = {
    "timed": Summary(visible_intent_cells, CELL_SIZES),
    "ordered": Summary(ordered_cells, ORDERED_SIZES),
    "day_count": Summary(day_count_cells, DAY_COUNT_SIZES),
}


def cell_index(cells: Dict[str, np.ndarray], sizes: Dict[str, int]) -> np.ndarray:
    """One flat index per exposure over the product of ``sizes``."""
    index = np.zeros(len(next(iter(cells.values()))), np.int64)
    for name, size in sizes.items():
        index = index * size + cells[name]
    return index


class IntentPosterior:
    """``P(intent_hit | cell)``: the smoothed rate of true hits per cell of the rows it is fit on.

    Args:
        cells: a summary's cells of the fitting rows (the train split).
        intent_hit: [n] the rows' true hits (the truth's ``intent_hit``).
        sizes: the summary's cell sizes (:data:`CELL_SIZES` for :func:`visible_intent_cells`).
    """

    def __init__(
        self, cells: Dict[str, np.ndarray], intent_hit: np.ndarray, sizes: Dict[str, int] = CELL_SIZES
    ) -> None:
        self.sizes = sizes
        size = int(np.prod(list(sizes.values())))
        index = cell_index(cells, sizes)
        hits = np.bincount(index, weights=intent_hit.astype(np.float64), minlength=size)
        rows = np.bincount(index, minlength=size).astype(np.float64)
        overall = hits.sum() / max(rows.sum(), 1.0)
        self.rate = (hits + PRIOR_WEIGHT * overall) / (rows + PRIOR_WEIGHT)

    def __call__(self, cells: Dict[str, np.ndarray]) -> np.ndarray:
        """[n] the posterior probability of a hit for each exposure's cells."""
        return self.rate[cell_index(cells, self.sizes)]
