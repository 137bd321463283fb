"""The intent posterior reference: its summary of the visible real-time actions against a per-row
loop (strict at ``ts``: a later action never changes a cell), and its per-cell rates."""

from __future__ import annotations

import bisect
from collections import Counter
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

from mtfm_rec.bench.intent_posterior import (
    CELL_SIZES,
    ORDERED_SIZES,
    PRIOR_WEIGHT,
    REACH_SECONDS,
    SINCE_FIRST_EDGES,
    IntentPosterior,
    day_count_cells,
    ordered_cells,
    visible_intent_cells,
)
from mtfm_rec.bench.references import WINDOW_SECONDS, HistoryFeatures
from mtfm_rec.data.reader import read_parquet_folder
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.data.synthetic import BURST_SECONDS, generate, read_truth

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/bench/conftest.py


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, DatasetSchema]:
    root = tmp_path_factory.mktemp("intent_posterior")
    return root, generate(str(root), num_users=60, num_days=3, num_items=400, seed=5)


def _loop_cells(actions: List[Tuple[int, int]], ts: int, window_start: int, category: int) -> Dict[str, int]:
    """The module docstring's table, one exposure at a time; ``actions``: (ts, category) in ts order."""
    reach = max(window_start, ts - REACH_SECONDS)
    recent = [t for t, c in actions if reach <= t < ts and c == category]
    others = Counter(c for t, c in actions if reach <= t < ts and c != category)
    since = 0 if not recent else 1 + bisect.bisect_left(SINCE_FIRST_EDGES, ts - recent[0])
    return {
        "recent": min(len(recent), 3),
        "since_first": since,
        "paired": int(len(recent) >= 2 and recent[1] - recent[0] < BURST_SECONDS),
        "rival": min(max(others.values(), default=0), 2),
        "earlier": min(sum(window_start <= t < reach and c == category for t, c in actions), 2),
    }


def _loop_ordered(
    actions: List[Tuple[int, int]], ts: int, window_start: int, category: int
) -> Dict[str, int]:
    """The time-free ``ordered`` summary, one exposure at a time."""
    day = [c for t, c in actions if window_start <= t < ts]
    others = Counter(c for c in day if c != category)
    return {
        "day": min(day.count(category), 3),
        "last_three": day[-3:].count(category),
        "last": int(bool(day) and day[-1] == category),
        "rival": min(max(others.values(), default=0), 2),
    }


def test_cells_match_a_per_row_loop_and_are_strict_at_ts(small: Tuple[Path, DatasetSchema]) -> None:
    root, schema = small
    realtime = HistoryFeatures(str(root), schema, 16).realtime
    by_user: Dict[int, List[Tuple[int, int]]] = {}
    for u, t, c in zip(realtime["user"], realtime["ts"], realtime["category"]):
        by_user.setdefault(int(u), []).append((int(t), int(c)))
    rng = np.random.default_rng(0)
    # every exposure of two scenarios, plus queries at an action's exact ts (that action must not
    # count) and one second after it (it must), in the action's category
    user, ts, cat = [], [], []
    for name in ("feed", "search"):
        exposures, truth = read_parquet_folder(str(root), f"exposures/{name}"), read_truth(str(root), name)
        user.append(exposures["user_id"].to_numpy()), ts.append(exposures["ts"].to_numpy())
        cat.append(truth["category"].to_numpy())
    pick = rng.choice(len(realtime["ts"]), 300, replace=False)
    for shift in (0, 1):
        user.append(realtime["user"][pick]), ts.append(realtime["ts"][pick] + shift)
        cat.append(realtime["category"][pick])
    user, ts, cat = (np.concatenate(x).astype(np.int64) for x in (user, ts, cat))
    window_start = ts - np.mod(ts, WINDOW_SECONDS)
    cells = visible_intent_cells(realtime, user, ts, window_start, cat)
    ordered = ordered_cells(realtime, user, ts, window_start, cat)
    day = day_count_cells(realtime, user, ts, window_start, cat)["day"]
    assert set(cells) == set(CELL_SIZES) and set(ordered) == set(ORDERED_SIZES)
    for i in range(len(user)):
        actions, at, start, c = by_user.get(int(user[i]), []), int(ts[i]), int(window_start[i]), int(cat[i])
        assert {name: int(v[i]) for name, v in cells.items()} == _loop_cells(actions, at, start, c), i
        want = _loop_ordered(actions, at, start, c)
        assert {name: int(v[i]) for name, v in ordered.items()} == want, i
        assert int(day[i]) == want["day"], i
    for got, sizes in ((cells, CELL_SIZES), (ordered, ORDERED_SIZES)):
        for name, size in sizes.items():
            assert 0 <= got[name].min() and got[name].max() < size, name
    assert cells["paired"].sum() > 0 and cells["rival"].sum() > 0 and cells["earlier"].sum() > 0


def test_cells_of_a_user_without_actions_are_all_zero() -> None:
    actions = {name: np.array([0, 0], np.int64) for name in ("user", "category")}
    actions["ts"] = np.array([100, 200], np.int64)
    cells = visible_intent_cells(
        actions, np.array([1, 0]), np.array([150, 100]), np.array([0, 0]), np.array([0, 0])
    )
    assert all(v.tolist() == [0, 0] for v in cells.values()), cells  # user 1 has none, ts=100 is not before


def test_posterior_is_each_cells_smoothed_hit_rate() -> None:
    zero = np.zeros(6, np.int64)
    cells = {name: zero.copy() for name in CELL_SIZES}
    cells["recent"] = np.array([0, 0, 0, 0, 2, 2])
    hits = np.array([0, 0, 0, 1, 1, 1])  # overall rate 1/2
    posterior = IntentPosterior(cells, hits)
    query = {name: np.zeros(3, np.int64) for name in CELL_SIZES}
    query["recent"] = np.array([0, 2, 1])  # recent=1 was never fitted: the overall rate
    expected = [(1 + PRIOR_WEIGHT / 2) / (4 + PRIOR_WEIGHT), (2 + PRIOR_WEIGHT / 2) / (2 + PRIOR_WEIGHT), 0.5]
    np.testing.assert_allclose(posterior(query), expected)


def test_paired_is_two_actions_less_than_a_bursts_span_apart() -> None:
    # user 0: category 3 at 1000 and 1000 + span (not one burst); user 1: 1000 and 999 + span
    actions = {
        "user": np.array([0, 0, 1, 1], np.int64),
        "ts": np.array([1000, 1000 + BURST_SECONDS, 1000, 999 + BURST_SECONDS], np.int64),
        "category": np.array([3, 3, 3, 3], np.int64),
    }
    at = np.array([1300, 1300])
    cells = visible_intent_cells(actions, np.array([0, 1]), at, np.array([0, 0]), np.array([3, 3]))
    assert cells["recent"].tolist() == [2, 2] and cells["paired"].tolist() == [0, 1]
    assert cells["since_first"].tolist() == [4, 4]  # 300 s: between the 240 and 600 s edges
