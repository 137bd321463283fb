"""The synthetic generator's ground truth on disk and its alignment-free (no shared tables) mode."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Dict, List

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.data.synthetic import (
    ITEM_ID_COLUMN,
    TRUTH_COLUMNS,
    TRUTH_DIR,
    SyntheticConfig,
    SyntheticData,
    build_schema,
    generate,
    generator_config,
    main,
    read_truth,
    simulate,
    world_of,
)
from mtfm_rec.data.writer import write_raw_dataset

# Small enough to write in well under a second, big enough for every scenario to have orders.
SMALL = dict(num_users=120, num_days=3, exposures_per_user_day=10.0, num_items=400, history_days=4)
FILES = 3
PROBABILITIES = ("p_click", "p_order")


def _files(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.glob("*.parquet"))


def _read_folder(folder: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(folder / name) for name in _files(folder)])


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """(root, the same data simulated in memory): generate() and simulate() share one config."""
    root = tmp_path_factory.mktemp("synthetic_truth")
    generate(str(root), files_per_folder=FILES, seed=5, **SMALL)
    data = simulate(SyntheticConfig(files_per_folder=FILES, seed=5, **SMALL))  # type: ignore[arg-type]
    return root, data


def _assert_aligned(root: Path, schema: DatasetSchema) -> None:
    """Every truth file repeats the key and label columns of the exposure file of its name."""
    for spec in schema.scenarios:
        exp_dir, truth_dir = root / "exposures" / spec.name, root / TRUTH_DIR / spec.name
        assert _files(truth_dir) == _files(exp_dir), spec.name
        for name in _files(exp_dir):
            exposures, truth = pq.read_table(exp_dir / name), pq.read_table(truth_dir / name)
            assert truth.num_rows == exposures.num_rows, (spec.name, name)
            for column in ("user_id", "ts", "request_id", *spec.tasks):
                assert truth[column].equals(exposures[column]), (spec.name, name, column)
        assert read_truth(str(root), spec.name).equals(_read_folder(truth_dir))


def test_truth_files_exist_and_align_row_by_row(written: tuple) -> None:
    root, data = written
    schema = DatasetSchema.load(str(root))
    assert sorted(p.name for p in (root / TRUTH_DIR).iterdir()) == sorted(s.name for s in schema.scenarios)
    _assert_aligned(root, schema)
    for spec in schema.scenarios:
        truth = read_truth(str(root), spec.name)
        expected = [c for c in TRUTH_COLUMNS if c != "p_order" or "order" in spec.tasks]
        assert truth.column_names == ["user_id", "ts", "request_id", *spec.tasks, *expected]
        assert truth.num_rows == data.exposures[spec.name].num_rows > 0


def test_written_truth_round_trips_the_in_memory_truth(written: tuple) -> None:
    """The files hold simulate()'s truth, reordered only by the writer's per-user file split."""
    root, data = written
    for name, table in data.exposures.items():
        part = table["user_id"].to_numpy() % FILES
        order = np.concatenate([np.flatnonzero(part == i) for i in range(FILES)])
        truth = read_truth(str(root), name)
        assert truth["request_id"].to_numpy().tolist() == table["request_id"].to_numpy()[order].tolist()
        for column in TRUTH_COLUMNS:
            if column in data.truth[name]:
                np.testing.assert_array_equal(truth[column].to_numpy(), data.truth[name][column][order])
        # p_click is the sigmoid of the stored click logit, not some other transform.
        logit = data.truth[name]["click_logit"][order]
        np.testing.assert_allclose(truth["p_click"].to_numpy(), 1.0 / (1.0 + np.exp(-logit)), rtol=1e-12)


def test_probabilities_and_categories(written: tuple) -> None:
    root, _ = written
    schema = DatasetSchema.load(str(root))
    num_categories = schema.extra["generator"]["num_categories"]
    for spec in schema.scenarios:
        truth = read_truth(str(root), spec.name)
        for column in PROBABILITIES:
            if column in truth.column_names:
                p = truth[column].to_numpy()
                assert np.isfinite(p).all() and (p > 0).all() and (p < 1).all(), (spec.name, column)
        if "order" in spec.tasks:
            assert (truth["p_order"].to_numpy() <= truth["p_click"].to_numpy()).all(), spec.name
            assert (truth["p_order"].to_numpy() < truth["p_click"].to_numpy()).any(), spec.name
        category = truth["category"].to_numpy()
        assert category.min() >= 0 and category.max() < num_categories
        exposures = _read_folder(root / "exposures" / spec.name)
        if spec.name in ("feed", "coupon"):
            np.testing.assert_array_equal(category, exposures["category"].to_numpy())
        else:
            _assert_one_permutation(category, exposures["poi_cat"].to_numpy(), num_categories)


def _assert_one_permutation(category: np.ndarray, poi_cat: np.ndarray, num_categories: int) -> None:
    """poi_cat == perm[category] for one bijection perm of all categories, and not the identity."""
    perm = np.full(num_categories, -1)
    perm[category] = poi_cat  # the last write wins: the check below catches any disagreement
    np.testing.assert_array_equal(perm[category], poi_cat)
    assert sorted(perm.tolist()) == list(range(num_categories))  # every category seen, bijective
    assert (perm != np.arange(num_categories)).any()


@pytest.fixture(scope="module")
def calibration_data() -> SyntheticData:
    return simulate(SyntheticConfig(num_users=1000, num_days=3, seed=3))


def _assert_calibrated(label: np.ndarray, p: np.ndarray, what: str, z: float = 4.0) -> None:
    """Mean label within z standard errors of mean p, overall and in each p quartile."""
    bins = np.searchsorted(np.quantile(p, [0.25, 0.5, 0.75]), p)
    for b in [None, 0, 1, 2, 3]:
        keep = np.ones(len(p), bool) if b is None else bins == b
        se = np.sqrt((p[keep] * (1 - p[keep])).sum()) / keep.sum()
        gap = abs(label[keep].mean() - p[keep].mean())
        assert gap < z * se, (what, b, label[keep].mean(), p[keep].mean(), se)


def test_labels_are_drawn_from_the_truth_probabilities(calibration_data: SyntheticData) -> None:
    data = calibration_data
    for spec in data.schema.scenarios:
        table, truth = data.exposures[spec.name], data.truth[spec.name]
        click = table["click"].to_numpy().astype(np.float64)
        _assert_calibrated(click, truth["p_click"], f"{spec.name}/click")
        if "order" in spec.tasks:
            order = table["order"].to_numpy().astype(np.float64)
            _assert_calibrated(order, truth["p_order"], f"{spec.name}/order")
            # The funnel: among clicks, orders follow p(order | click) = p_order / p_click.
            clicked = click == 1
            conditional = truth["p_order"][clicked] / truth["p_click"][clicked]
            _assert_calibrated(order[clicked], conditional, f"{spec.name}/order|click")


def _tables(schema: DatasetSchema) -> Dict[str, List[str]]:
    return {name: keys for name, (_, keys) in schema.embedding_tables().items()}


def test_alignment_free_schema_has_no_shared_tables() -> None:
    free = build_schema(SyntheticConfig(shared_embeddings=False))
    shared = build_schema(SyntheticConfig())
    assert free.shared_embeddings == {} and "shared_embeddings" not in free.to_dict()
    assert all(keys == [name] for name, keys in _tables(free).items())
    # Only the table layout differs: the same keys with the same sizes.
    assert free.sparse_feature_keys() == shared.sparse_feature_keys()
    assert free.sparse_feature_sizes() == shared.sparse_feature_sizes()
    tables = _tables(shared)
    assert sorted(tables["category"]) == sorted(
        ["seq/orders/category", "seq/clicks_rt/category"]
        + [f"exp/{s}/item/category" for s in ("feed", "coupon")]
    )
    assert sorted(tables["item_id"]) == ["seq/clicks_rt/item_id", "seq/orders/item_id"]
    assert "exp/search/item/poi_cat" not in tables["category"]  # a permutation: never shared
    assert free.extra["generator"]["shared_embeddings"] is False
    assert shared.extra["generator"]["shared_embeddings"] is True


def test_cli_alignment_free_writes_truth_and_no_shared_embeddings(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    free, shared = tmp_path / "free", tmp_path / "shared"
    assert main(["--out", str(free), "--users", "50", "--days", "3", "--alignment-free"]) == 0
    assert main(["--out", str(shared), "--users", "50", "--days", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    raw = yaml.safe_load((free / "dataset.yaml").read_text())
    assert "shared_embeddings" not in raw and raw["generator"]["shared_embeddings"] is False
    assert yaml.safe_load((shared / "dataset.yaml").read_text())["shared_embeddings"]
    schema = DatasetSchema.load(str(free))
    assert all(keys == [name] for name, keys in _tables(schema).items())
    _assert_aligned(free, schema)
    # The flag changes the declaration only, never the data.
    for spec in schema.scenarios:
        assert read_truth(str(free), spec.name).equals(read_truth(str(shared), spec.name))


def test_regenerating_replaces_old_truth_files(tmp_path: Path) -> None:
    generate(str(tmp_path), files_per_folder=4, seed=1, **SMALL)
    assert len(_files(tmp_path / TRUTH_DIR / "feed")) == 4
    schema = generate(str(tmp_path), files_per_folder=1, seed=2, **SMALL)
    for spec in schema.scenarios:
        assert _files(tmp_path / TRUTH_DIR / spec.name) == ["part-00000.parquet"]
    _assert_aligned(tmp_path, schema)


def test_truth_through_an_fsspec_url() -> None:
    url = f"memory://synthetic-truth-{uuid.uuid4().hex}"
    try:
        generate(url, files_per_folder=2, **SMALL)
        truth = read_truth(url, "search")
        fs, base = fsspec.core.url_to_fs(url)
        files = sorted(fs.ls(f"{base}/exposures/search", detail=False))
        exposures = [pq.read_table(fs.open(p, "rb")) for p in files]
        assert truth["request_id"].equals(pa.concat_tables(exposures)["request_id"])
    finally:
        fs, base = fsspec.core.url_to_fs(url)
        fs.rm(base, recursive=True)


def test_read_truth_without_truth_names_the_folder(tmp_path: Path) -> None:
    data = simulate(SyntheticConfig(**SMALL))  # type: ignore[arg-type]
    write_raw_dataset(str(tmp_path), data.schema, data.exposures, data.behaviors, 1)
    with pytest.raises(FileNotFoundError, match=f"{TRUTH_DIR}/feed: no Parquet files") as missing:
        read_truth(str(tmp_path), "feed")
    assert str(tmp_path) in str(missing.value)
    generate(str(tmp_path), **SMALL)
    with pytest.raises(FileNotFoundError, match=f"{TRUTH_DIR}/nope: no Parquet files"):
        read_truth(str(tmp_path), "nope")


# ---------------------------------------------------------------- replaying the world
def test_generator_config_round_trips_every_field(written: tuple) -> None:
    """dataset.yaml records the whole config, the planted effects' weights included."""
    root, _ = written
    schema = DatasetSchema.load(str(root / "dataset.yaml"))
    cfg = SyntheticConfig(files_per_folder=FILES, seed=5, **SMALL)  # type: ignore[arg-type]
    assert generator_config(schema) == cfg
    foreign = DatasetSchema.from_dict({**schema.to_dict(), "generator": {"module": "elsewhere"}})
    with pytest.raises(ValueError, match="was not written by mtfm_rec.data.synthetic"):
        generator_config(foreign)
    record = {k: v for k, v in schema.extra["generator"].items() if k != "taste_weight"}
    old = DatasetSchema.from_dict({**schema.to_dict(), "generator": record})
    with pytest.raises(ValueError, match=r"lacks \['taste_weight'\]; regenerate it"):
        generator_config(old)


def test_world_of_replays_the_affinity_of_every_exposure(written: tuple) -> None:
    """world_of() draws the same users and items as the generator: the truth's affinity is
    taste . item of the exposure's user and item (the plug-in reference relies on it)."""
    root, _ = written
    cfg = generator_config(DatasetSchema.load(str(root / "dataset.yaml")))
    world = world_of(cfg)
    for name, column in ITEM_ID_COLUMN.items():
        exposures, truth = _read_folder(root / "exposures" / name), read_truth(str(root), name)
        items = world.ranges[name][0] + exposures[column].to_numpy()
        affinity = world.affinity(exposures["user_id"].to_numpy(), items)
        np.testing.assert_allclose(affinity, truth["affinity"].to_numpy(), rtol=0, atol=1e-12)


def test_map_taste_keeps_the_prior_without_actions_and_finds_taste_with_many() -> None:
    cfg = SyntheticConfig(num_users=300, num_items=400, seed=2)
    world = world_of(cfg)
    users = np.arange(cfg.num_users)
    none = world.map_taste(np.zeros((len(users), cfg.num_categories)), users)
    np.testing.assert_allclose(none, world.taste_prior_mean, rtol=0, atol=1e-12)
    # 100 actions per user drawn exactly as the generator's background actions are
    draws = world.taste_categories(np.repeat(users, 100)).reshape(len(users), 100)
    counts = np.stack([np.bincount(row, minlength=cfg.num_categories) for row in draws]).astype(float)
    found = world.map_taste(counts, users)
    # the posterior mode is where the gradient vanishes, and it ranks categories like the taste
    logits = cfg.taste_temperature * found @ world.cat_vec.T
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    grad = cfg.taste_temperature * (counts - 100 * p) @ world.cat_vec
    grad -= world.taste_prior_precision * (found - world.taste_prior_mean)
    assert np.abs(grad).max() < 1e-6
    true_affinity = world.taste @ world.cat_vec.T
    corr = np.corrcoef((found @ world.cat_vec.T).ravel(), true_affinity.ravel())[0, 1]
    assert corr > 0.9, corr  # measured 0.95
