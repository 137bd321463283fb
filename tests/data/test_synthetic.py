"""The synthetic generator: layout, determinism, funnel labels, sizes and the planted signals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.data.synthetic import DAY, SyntheticConfig, SyntheticData, generate, simulate

SMALL = dict(num_users=120, num_days=3, exposures_per_user_day=10.0, num_items=400, history_days=4)


def _read_folder(folder: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in sorted(folder.glob("*.parquet"))])


BIG = SyntheticConfig(num_users=1000, num_days=3, history_days=14, seed=3)


@pytest.fixture(scope="module")
def big() -> SyntheticData:
    """Enough users for the planted effects to show clearly (~0.5 s)."""
    return simulate(BIG)


def test_layout_and_columns_match_dataset_yaml(tmp_path: Path) -> None:
    returned = generate(str(tmp_path), files_per_folder=3, **SMALL)
    schema = DatasetSchema.load(str(tmp_path))
    assert schema.to_dict() == returned.to_dict()
    folders = {k: sorted(p.name for p in (tmp_path / k).iterdir()) for k in ("exposures", "behaviors")}
    assert folders["exposures"] == sorted(s.name for s in schema.scenarios)
    assert folders["behaviors"] == sorted(q.name for q in schema.sequences)
    assert schema.history_sequences and schema.realtime_sequences
    assert len(schema.scenarios) == 3 and any(s.dense_features for s in schema.scenarios)
    assert len({tuple(s.categorical()) for s in schema.scenarios}) == 3  # each its own schema
    assert schema.extra["recommended_valid_after"] < schema.extra["recommended_eval_after"]
    for spec in schema.scenarios:
        files = sorted((tmp_path / "exposures" / spec.name).glob("*.parquet"))
        assert len(files) == 3
        table = _read_folder(tmp_path / "exposures" / spec.name)
        expected = ["user_id", "ts", "request_id"] + [c for _, c, _ in spec.categorical()]
        expected += spec.dense_features + spec.tasks
        assert table.column_names == expected
        for _, column, size in spec.categorical():
            values = table[column].drop_null().to_numpy()
            assert table[column].type == pa.int64() and values.min() >= 0 and values.max() < size
        assert all(table[c].type == pa.float32() for c in spec.dense_features)
        assert all(set(np.unique(table[t].to_numpy())) <= {0, 1} for t in spec.tasks)
        assert "user_id" not in [c for _, c, _ in spec.categorical()]  # no id to memorise taste
    for seq in schema.sequences:
        table = _read_folder(tmp_path / "behaviors" / seq.name)
        assert table.column_names == ["user_id", "ts"] + list(seq.features)
        for column, size in seq.features.items():
            assert 0 <= table[column].to_numpy().min() and table[column].to_numpy().max() < size


def test_fsspec_url_and_rewrite_drops_stale_files(tmp_path: Path) -> None:
    generate("memory://synthetic-test", **SMALL)
    assert DatasetSchema.load("memory://synthetic-test").name == "synthetic"
    generate(str(tmp_path), files_per_folder=4, **SMALL)
    generate(str(tmp_path), files_per_folder=1, **SMALL)
    assert len(list((tmp_path / "exposures" / "feed").glob("*.parquet"))) == 1


def test_same_seed_same_data_other_seed_other_data() -> None:
    a, b = simulate(SyntheticConfig(**SMALL, seed=7)), simulate(SyntheticConfig(**SMALL, seed=7))
    c = simulate(SyntheticConfig(**SMALL, seed=8))
    for name in a.exposures:
        assert a.exposures[name].equals(b.exposures[name])
        assert not a.exposures[name].equals(c.exposures[name])
    for name in a.behaviors:
        assert a.behaviors[name].equals(b.behaviors[name])


def test_funnel_order_implies_click(big: SyntheticData) -> None:
    funnels = [s for s in big.schema.scenarios if len(s.tasks) == 2]
    assert [s.name for s in funnels] == ["feed", "coupon"]
    for spec in funnels:
        click, order = (big.exposures[spec.name][t].to_numpy() for t in spec.tasks)
        assert order.sum() > 0 and (order <= click).all()


def test_sizes_follow_arguments() -> None:
    cfg = SyntheticConfig(
        num_users=300, num_days=4, exposures_per_user_day=20.0, num_items=700, history_days=5
    )
    data = simulate(cfg)
    exposures = pa.concat_tables([t.select(["user_id", "ts"]) for t in data.exposures.values()])
    users, ts = exposures["user_id"].to_numpy(), exposures["ts"].to_numpy()
    assert set(np.unique(users)) == set(range(300))
    assert ts.min() >= cfg.start_ts and ts.max() < cfg.start_ts + 4 * DAY
    assert len(ts) / (300 * 4) == pytest.approx(20.0, rel=0.1)
    assert data.exposures["coupon"].num_rows < 0.05 * len(ts)  # the sparse scenario
    orders_ts = data.behaviors["orders"]["ts"].to_numpy()
    assert orders_ts.min() >= cfg.start_ts - 5 * DAY and (orders_ts < cfg.start_ts).any()
    assert data.schema.sequence("orders").features["item_id"] == 700
    with pytest.raises(ValueError, match="num_items"):
        SyntheticConfig(num_items=20).validate()
    with pytest.raises(ValueError, match="num_days >= 3"):
        SyntheticConfig(num_days=2).validate()


def test_taste_is_visible_through_history_and_drives_clicks(big: SyntheticData) -> None:
    cfg = BIG
    feed = big.exposures["feed"]
    users, cat = feed["user_id"].to_numpy(), feed["category"].to_numpy()
    click = feed["click"].to_numpy().astype(bool)
    # Ground truth: clicks rise with taste . item.
    aff = big.truth["feed"]["affinity"]
    lo, hi = np.quantile(aff, [0.25, 0.75])
    assert click[aff >= hi].mean() > 2.0 * click[aff <= lo].mean()
    # The same signal recovered from written data alone: favourite categories of past orders.
    orders = big.behaviors["orders"]
    before = orders["ts"].to_numpy() < cfg.start_ts
    counts = np.zeros((cfg.num_users, cfg.num_categories))
    np.add.at(counts, (orders["user_id"].to_numpy()[before], orders["category"].to_numpy()[before]), 1)
    rank = np.argsort(np.argsort(-counts, axis=1, kind="stable"), axis=1)[users, cat]
    top, bottom = click[rank < 3].mean(), click[rank >= cfg.num_categories // 2].mean()
    assert top > bottom + 0.12, (top, bottom)


def test_user_features_barely_reveal_taste(big: SyntheticData) -> None:
    feed = big.exposures["feed"]
    aff, age = big.truth["feed"]["affinity"], feed["age_bucket"].to_numpy()
    group_mean = np.bincount(age, aff) / np.bincount(age)
    explained = 1.0 - np.var(aff - group_mean[age]) / np.var(aff)
    assert explained < 0.1


def test_intent_needs_strictly_earlier_realtime_actions(big: SyntheticData) -> None:
    rt = big.behaviors["clicks_rt"]
    rt_key = rt["user_id"].to_numpy() * 1000 + rt["category"].to_numpy()
    order = np.lexsort((rt["ts"].to_numpy(), rt_key))
    key_sorted, ts_sorted = rt_key[order], rt["ts"].to_numpy()[order]

    def recent_same_category(users: np.ndarray, cats: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """An R action of the user on this category within [ts - 30 min, ts) (strictly earlier)."""
        key = users * 1000 + cats
        # Sorted by (key, ts): searchsorted on key * 1e10 + ts finds the last action before ts.
        combined = key_sorted * 10**10 + ts_sorted
        last = np.searchsorted(combined, key * 10**10 + ts, side="left") - 1
        ok = last >= 0
        ok[ok] &= (key_sorted[last[ok]] == key[ok]) & (ts_sorted[last[ok]] >= ts[ok] - 1800)
        return ok

    for name, cat_col in (("feed", "category"), ("coupon", "category")):
        table, hit = big.exposures[name], big.truth[name]["intent_hit"]
        users, ts = table["user_id"].to_numpy(), table["ts"].to_numpy()
        seen = recent_same_category(users, table[cat_col].to_numpy(), ts)
        assert seen[hit].all()  # every planted intent is visible before its exposure
        if name == "feed":
            click = table["click"].to_numpy().astype(bool)
            assert click[seen].mean() > click[~seen].mean() + 0.15
