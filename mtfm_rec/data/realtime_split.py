"""Where a user-window's samples start, so that no exposure's real-time context depends on the future.

One home for the rule both aggregation engines apply (the local one over a partition's rows,
the Spark one per user inside a grouped Arrow function): :func:`open_samples` and
:func:`sample_slices`.

A sample keeps at most ``max_len`` actions of each real-time sequence, and the model lets a T
token see those with a strictly smaller ts than its own. If a sample kept "the last ``max_len``
actions of the window", a busy window's later actions would push its earlier exposures' context
out of the sample: a future action would change an earlier score, and the context a T token
saw in training would differ from what serving gives it (the last ``max_len`` before the
request). So the R slice of a sample is fixed when the sample opens and only grows:

* the sample that opens a user-window starts its R slice at the last ``max_len`` actions
  before its first exposure (from ``window_start - lookback`` on), so that exposure sees
  exactly what serving would;
* each later exposure of the window joins the open sample while every real-time sequence's
  slice, grown to the actions before that exposure, still holds at most ``max_len``;
* otherwise that exposure opens a new sample (with the window's same H). Each sequence that
  overflowed restarts at its last ``keep`` actions before the exposure
  (``keep = max(1, floor(fraction * max_len))``); the others keep their slice;
* a sample's slice ends at the actions before its last exposure: later ones are seen by none.

So every exposure sees between ``keep`` and ``max_len`` of its most recent actions (all of them
where it has fewer), decided only by what came before it. ``fraction = 1`` gives every exposure
exactly its last ``max_len`` (one sample per new action in a busy window); ``0.5`` (the default
of ``aggregation.realtime_split_keep``) opens a sample per ``max_len / 2`` new actions.

Rows here are the exposures of many user-windows, sorted by (user, window, ts, scenario, file,
row). ``counts[q][i]`` is the number of the user's actions of real-time sequence ``q`` with
``ts < ts_i`` in that sequence's (user, ts, file, row) order, and ``lows[q][i]`` those with
``ts < window_start - lookback``: indices into the user's sorted actions, so a sample's slice is
``[start, count at its last row)``. Both may carry the same per-user offset (the local engine
counts into all of a partition's actions sorted by (user, ts)): the rule compares only their
differences.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np


def keep_counts(max_lens: Sequence[int], fraction: float) -> List[int]:
    """Actions each real-time sequence keeps when a sample restarts it."""
    return [max(1, min(int(length), int(fraction * length))) for length in max_lens]


def open_samples(
    opens: np.ndarray,
    counts: Sequence[np.ndarray],
    lows: Sequence[np.ndarray],
    max_lens: Sequence[int],
    fraction: float,
    max_exposures: Optional[int],
) -> Tuple[np.ndarray, List[np.ndarray]]:
    """:func:`split_for_realtime`, then every ``max_exposures`` rows of a sample open the next
    (``max_exposures_per_sample``; such a split keeps the slice start). Same returns."""
    opens, starts = split_for_realtime(opens, counts, lows, max_lens, fraction)
    if max_exposures:
        rows = np.arange(len(opens))
        rank = rows - np.maximum.accumulate(np.where(opens, rows, 0))
        opens = opens | (rank % max_exposures == 0)
    return opens, starts


def sample_slices(
    opens: np.ndarray, starts: Sequence[np.ndarray], counts: Sequence[np.ndarray]
) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Per real-time sequence, ([samples] first, [samples] end) of each sample's slice: from
    its start to the actions before its last row."""
    firsts = np.flatnonzero(opens)
    lasts = np.append(firsts[1:], len(opens))[: len(firsts)] - 1
    return [(start[firsts], count[lasts]) for start, count in zip(starts, counts)]


def split_for_realtime(
    opens: np.ndarray,
    counts: Sequence[np.ndarray],
    lows: Sequence[np.ndarray],
    max_lens: Sequence[int],
    fraction: float,
) -> Tuple[np.ndarray, List[np.ndarray]]:
    """Sample openings and each row's R slice start, per the rule of the module docstring.

    Args:
        opens: [rows] bool, True at the first row of each user-window.
        counts: per real-time sequence, [rows] int64, nondecreasing inside a user-window.
        lows: per real-time sequence, [rows] int64, constant inside a user-window.
        max_lens: per real-time sequence, its ``max_len``.
        fraction: ``aggregation.realtime_split_keep``, in (0, 1].

    Returns:
        (``opens`` with the samples the rule opens added, per sequence [rows] the first action
        of the slice of the sample each row is in). Other openings of the same rows (such as
        ``max_exposures_per_sample``'s) may be added by the caller: they keep the slice start.
    """
    rows = len(opens)
    out_opens = opens.copy()
    if rows == 0:
        return out_opens, [np.zeros(0, np.int64) for _ in counts]
    firsts = np.flatnonzero(opens)
    ends = np.append(firsts[1:], rows).astype(np.int64)
    lengths = ends - firsts
    initial = [np.maximum(lo[firsts], c[firsts] - length) for c, lo, length in zip(counts, lows, max_lens)]
    starts = [np.repeat(first, lengths) for first in initial]
    overflow = np.zeros(len(firsts), dtype=bool)
    for c, first, length in zip(counts, initial, max_lens):
        overflow |= c[ends - 1] - first > length
    keeps = keep_counts(max_lens, fraction)
    for g in np.flatnonzero(overflow):
        window = (int(firsts[g]), int(ends[g]))
        _split_window(window, [int(f[g]) for f in initial], counts, lows, max_lens, keeps, out_opens, starts)
    return out_opens, starts


def _split_window(
    window: Tuple[int, int],
    slice_start: List[int],
    counts: Sequence[np.ndarray],
    lows: Sequence[np.ndarray],
    max_lens: Sequence[int],
    keeps: Sequence[int],
    opens: np.ndarray,
    starts: List[np.ndarray],
) -> None:
    """Splits one overflowing user-window, rows ``[first, end)``, in place: one step per new
    sample, each jumping (by binary search on the nondecreasing counts) to the first row where a
    sequence's slice would exceed its ``max_len``."""
    row, end = window
    while True:
        nxt = end
        for q, c in enumerate(counts):
            over = row + int(np.searchsorted(c[row:end], slice_start[q] + max_lens[q], side="right"))
            nxt = min(nxt, over)
        for q, s in enumerate(starts):
            s[row:nxt] = slice_start[q]
        if nxt >= end:
            return
        opens[nxt] = True
        for q, c in enumerate(counts):
            if int(c[nxt]) - slice_start[q] > max_lens[q]:
                slice_start[q] = max(int(lows[q][nxt]), int(c[nxt]) - keeps[q])
        row = nxt
