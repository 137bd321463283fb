"""(group, ts) pairs as one sortable int64: how the references find a user's actions in a window.

The references keep actions sorted by (user, ts) or (user * categories + category, ts); a query
"the first action of group g at or after t" is then one ``np.searchsorted`` over these keys.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np


def sort_keys(
    group: np.ndarray, ts: np.ndarray, q_group: np.ndarray, q_ts: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    """(group, ts) pairs of actions sorted by them and of queries as one comparable int64 each.

    Raises:
        OverflowError: the groups times the time span do not fit in int64.
    """
    present = [a for a in (ts, q_ts) if a.size]
    t0 = min((int(a.min()) for a in present), default=0)
    span = max((int(a.max()) for a in present), default=0) - t0 + 1
    top = max((int(a.max()) + 1 for a in (group, q_group) if a.size), default=1)
    if top * span >= 2**62:
        raise OverflowError(f"(group, ts) keys do not fit in int64: {top} groups x {span} ticks")
    return group * span + (ts - t0), q_group * span + (q_ts - t0)
