"""Hand-written raw-contract datasets for data tests (reusable by any test under tests/data).

``write_raw_dataset(root, schema, exposures, behaviors)`` writes ``dataset.yaml`` and one Parquet
file per given table under ``root`` (a local path or any fsspec URL, e.g. ``memory://``). Tables
may be ``pa.Table`` or ``{column: list}`` dicts (``None`` = null). The fixtures wrap it:

* ``raw_writer``: the function itself;
* ``demo_tables``: ``random_demo_tables``, random tables of ``DEMO_SCHEMA`` to pass to it;
* ``demo_schema``: a two-scenario, two-sequence schema dict (one history, one real-time);
* ``demo_raw``: a small random dataset of ``demo_schema`` in ``tmp_path`` with two files per
  folder, nulls in optional places, out-of-range ids and equal timestamps.
"""

from __future__ import annotations

import copy
import uuid
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

Table = Union[pa.Table, Mapping[str, List[Any]]]

DEMO_SCHEMA: Dict[str, Any] = {
    "name": "demo",
    "time_unit": "s",
    "sequences": [
        {"name": "orders", "kind": "history", "max_len": 6, "features": {"item_id": 50, "cat": 5}},
        {"name": "clicks_rt", "kind": "realtime", "max_len": 4, "features": {"item_id": 50}},
    ],
    "scenarios": [
        {
            "name": "hp",
            "user_features": {"city": 4},
            "item_features": {"shop": 9},
            "cross_features": {"dist": 3},
            "dense_features": ["price"],
            "tasks": ["click", "order"],
        },
        {"name": "food", "item_features": {"shop": 3}, "tasks": ["click"]},
    ],
}


def _as_table(table: Table) -> pa.Table:
    if isinstance(table, pa.Table):
        return table
    cols = {}
    for name, values in table.items():
        if isinstance(values, np.ndarray):
            cols[name] = pa.array(values)
        elif all(v is None or isinstance(v, (int, np.integer)) for v in values):
            cols[name] = pa.array(values, type=pa.int64())
        else:
            cols[name] = pa.array(values)
    return pa.table(cols)


def write_raw_dataset(
    root: str,
    schema: Mapping[str, Any],
    exposures: Mapping[str, List[Table]],
    behaviors: Optional[Mapping[str, List[Table]]] = None,
    row_group_size: Optional[int] = None,
) -> str:
    """Writes a raw-contract dataset; files are named ``part-<i>.parquet`` in list order.

    Returns:
        ``root`` without a trailing slash.
    """
    root = root.rstrip("/")
    fs, base = fsspec.core.url_to_fs(root)
    base = base.rstrip("/")
    fs.makedirs(base, exist_ok=True)
    with fs.open(f"{base}/dataset.yaml", "w") as fh:
        fh.write(yaml.safe_dump(dict(schema), sort_keys=False))
    for kind, folders in (("exposures", exposures), ("behaviors", behaviors or {})):
        for name, tables in folders.items():
            fs.makedirs(f"{base}/{kind}/{name}", exist_ok=True)
            for i, table in enumerate(tables):
                with fs.open(f"{base}/{kind}/{name}/part-{i}.parquet", "wb") as fh:
                    pq.write_table(_as_table(table), fh, row_group_size=row_group_size)
    return root


def random_demo_tables(
    seed: int = 0, n_users: int = 12, n_exposures: int = 400, n_actions: int = 500, days: int = 5
) -> Dict[str, Dict[str, List[pa.Table]]]:
    """Random exposures/behaviours of ``DEMO_SCHEMA``, two files per folder.

    Timestamps are coarse (multiples of 600 s) so equal ts across and within files occur;
    ids overflow their vocabularies and some are null; some labels are null.
    """
    rng = np.random.default_rng(seed)
    span = days * 86400

    def base(n: int) -> Dict[str, Any]:
        return {
            "user_id": rng.integers(0, n_users, n).astype(np.int64) * 7919 - 3,
            "ts": rng.integers(0, span // 600, n).astype(np.int64) * 600 + 1_700_000_000 // 86400 * 86400,
        }

    def ids(n: int, hi: int, null_p: float = 0.05) -> pa.Array:
        v = rng.integers(-2, hi, n).astype(np.int64)
        return pa.array(v, mask=rng.random(n) < null_p)

    def labels(n: int, null_p: float = 0.05) -> pa.Array:
        return pa.array(rng.integers(0, 2, n).astype(np.int64), mask=rng.random(n) < null_p)

    def split_files(cols: Dict[str, Any]) -> List[pa.Table]:
        table = pa.table(cols)
        cut = table.num_rows // 3
        return [table.slice(0, cut), table.slice(cut)]

    out: Dict[str, Dict[str, List[pa.Table]]] = {"exposures": {}, "behaviors": {}}
    n = n_exposures
    hp = base(n)
    hp.update(
        request_id=pa.array(rng.integers(0, 50, n).astype(np.int64), mask=rng.random(n) < 0.1),
        city=ids(n, 6),
        shop=ids(n, 12),
        dist=ids(n, 3),
        price=pa.array(rng.random(n), mask=rng.random(n) < 0.05),
        click=labels(n),
        order=labels(n),
    )
    # Funnel (contract): order = 1 needs click != 0, so a known click = 0 clears the order.
    click0 = pc.fill_null(hp["click"], 1).to_numpy() == 0
    order = pc.fill_null(hp["order"], 0).to_numpy()
    hp["order"] = pa.array(
        np.where(click0, 0, order), mask=hp["order"].is_null().to_numpy(zero_copy_only=False)
    )
    out["exposures"]["hp"] = split_files(hp)
    m = n // 2
    food = base(m)
    food.update(shop=ids(m, 5), click=labels(m), split=rng.integers(0, 3, m).astype(np.int64))
    out["exposures"]["food"] = split_files(food)
    orders = base(n_actions)
    orders.update(item_id=ids(n_actions, 60), cat=ids(n_actions, 5))
    out["behaviors"]["orders"] = split_files(orders)
    clicks = base(n_actions)
    clicks.update(item_id=ids(n_actions, 60, 0.0))
    out["behaviors"]["clicks_rt"] = split_files(clicks)
    return out


@pytest.fixture(scope="session")
def raw_writer() -> Callable[..., str]:
    return write_raw_dataset


@pytest.fixture(scope="session")
def demo_tables() -> Callable[..., Dict[str, Dict[str, List[pa.Table]]]]:
    """``random_demo_tables(seed, n_users, n_exposures, n_actions, days)``."""
    return random_demo_tables


@pytest.fixture(scope="session")
def demo_schema() -> Dict[str, Any]:
    """``DEMO_SCHEMA`` (shared by the session: copy before mutating)."""
    return copy.deepcopy(DEMO_SCHEMA)


@pytest.fixture
def demo_raw(tmp_path: Any) -> str:
    tables = random_demo_tables()
    return write_raw_dataset(str(tmp_path / "raw"), DEMO_SCHEMA, tables["exposures"], tables["behaviors"])


@pytest.fixture
def memory_root() -> Any:
    """A fresh ``memory://`` root, removed afterwards."""
    root = f"memory://mtfm-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    path = root[len("memory://") :]
    if fs.exists(path):
        fs.rm(path, recursive=True)
