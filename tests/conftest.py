"""Suite-wide collection order.

``make test`` runs the suite on two pytest-xdist workers with ``--dist loadfile
--no-loadscope-reorder``: each test file goes whole to one worker, in collection order (xdist
would otherwise order files by their number of tests). The longest files are collected first,
so the learning guard (alone about a third of the suite's CPU time) starts at once on one
worker while the other works through the rest, and no long file is left for the end.
"""

from __future__ import annotations

from typing import List

import pytest

# Files that start first, longest first (measured with ``PYTEST_ARGS=--durations=25``).
LONGEST_FIRST = (
    "tests/training/test_learning.py",
    "tests/data/test_fuzz.py",
    "tests/data/test_aggregate_spark.py",
    "tests/serve/test_export.py",
    "tests/training/test_restart.py",
    "tests/experiments/test_compare.py",
    "tests/model/baselines/test_zoo.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order inside each group is pytest's
