"""Suite-wide collection order.

``make test`` runs the suite on two pytest-xdist workers with ``--dist loadfile``: each test
file goes whole to one worker, in collection order. The learning guard alone takes about as
long as a third of the rest of the suite, so it is collected first: one worker starts it at
once while the other works through the remaining files, and both end at about the same time.
"""

from __future__ import annotations

from typing import List

import pytest

# Files that start first, longest first (measured with ``PYTEST_ARGS=--durations=25``).
LONGEST_FIRST = ("tests/training/test_learning.py",)


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order inside each group is pytest's
