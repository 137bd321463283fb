"""dataset.yaml parsing, token groups, KJT keys and the folding rule."""

from __future__ import annotations

import numpy as np
import pytest

from mtfm_rec.data.schema import DatasetSchema, SchemaError, fold_ids

RAW = {
    "name": "demo",
    "time_unit": "s",
    "sequences": [
        {"name": "rt", "kind": "realtime", "max_len": 8, "features": {"item_id": 100}},
        {"name": "orders", "kind": "history", "max_len": 16, "features": {"item_id": 100, "cat": 5}},
    ],
    "scenarios": [
        {
            "name": "hp",
            "user_features": {"city": 4},
            "item_features": {"shop": 9},
            "tasks": ["click", "order"],
        },
        {"name": "food", "item_features": {"shop": 3}, "dense_features": ["price"], "tasks": ["click"]},
    ],
}


def test_token_groups_put_history_before_realtime_then_scenarios() -> None:
    schema = DatasetSchema.from_dict(RAW)
    assert schema.token_groups == ["seq/orders", "seq/rt", "exp/hp", "exp/food"]
    assert schema.sequence_group("rt") == 1 and schema.scenario_group("food") == 3


def test_same_column_in_two_scenarios_gets_separate_tables() -> None:
    sizes = DatasetSchema.from_dict(RAW).sparse_feature_sizes()
    assert sizes["exp/hp/item/shop"] == 10 and sizes["exp/food/item/shop"] == 4  # + missing row
    assert DatasetSchema.from_dict(RAW).sparse_feature_keys()[:3] == [
        "seq/orders/item_id",
        "seq/orders/cat",
        "seq/rt/item_id",
    ]


def test_yaml_round_trip_keeps_extras() -> None:
    raw = dict(RAW, recommended_eval_after=123)
    schema = DatasetSchema.from_dict(raw)
    again = DatasetSchema.from_dict(__import__("yaml").safe_load(schema.to_yaml()))
    assert again.to_dict() == schema.to_dict() and again.extra["recommended_eval_after"] == 123


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"time_unit": "h"}, "time_unit: must be one of"),
        ({"scenarios": []}, "scenarios: at least one scenario"),
        (
            {"sequences": [{"name": "x", "kind": "past", "max_len": 3, "features": {"a": 2}}]},
            r"sequences\.x\.kind: must be one of",
        ),
        (
            {"sequences": [{"name": "x", "kind": "history", "max_len": 0, "features": {"a": 2}}]},
            r"max_len: must be a positive int",
        ),
        (
            {"scenarios": [{"name": "s", "item_features": {"a": -1}, "tasks": ["c"]}]},
            r"item_features\.a: vocabulary size",
        ),
        (
            {"scenarios": [{"name": "s", "item_features": {"a": 2}, "tasks": []}]},
            r"tasks: a scenario needs at least one task",
        ),
        ({"scenarios": [{"name": "s", "item_features": {"ts": 2}, "tasks": ["c"]}]}, "reserved column names"),
    ],
)
def test_bad_schema_errors_name_the_key(patch: dict, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        DatasetSchema.from_dict(dict(RAW, **patch), source="root/dataset.yaml")


def test_fold_ids_is_deterministic_modulo_with_missing_row() -> None:
    values = np.array([0, 4, 5, 12, -1, 7], dtype=np.int64)
    nulls = np.array([False, False, False, False, False, True])
    assert fold_ids(values, 5, nulls).tolist() == [0, 4, 0, 2, 4, 5]


def test_shared_embeddings_group_keys_into_one_table() -> None:
    raw = dict(RAW, shared_embeddings={"item": ["seq/orders/item_id", "seq/rt/item_id"]})
    schema = DatasetSchema.from_dict(raw)
    tables = schema.embedding_tables()
    assert tables["item"] == (101, ["seq/orders/item_id", "seq/rt/item_id"])
    assert tables["exp/hp/item/shop"] == (10, ["exp/hp/item/shop"])
    assert sum(len(keys) for _, keys in tables.values()) == len(schema.sparse_feature_keys())
    assert DatasetSchema.from_dict(schema.to_dict()).shared_embeddings == schema.shared_embeddings


@pytest.mark.parametrize(
    "shared, message",
    [
        ({"x": ["seq/orders/item_id"]}, "at least two feature keys"),
        ({"x": ["seq/orders/item_id", "seq/orders/nope"]}, "'seq/orders/nope' is not a declared feature key"),
        ({"x": ["seq/orders/item_id", "exp/hp/item/shop"]}, r"one vocabulary size, got \[100, 9\]"),
        (
            {"x": ["seq/orders/item_id", "seq/rt/item_id"], "y": ["seq/rt/item_id", "seq/orders/item_id"]},
            "already shared",
        ),
    ],
)
def test_bad_shared_embeddings_name_the_table(shared: dict, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        DatasetSchema.from_dict(dict(RAW, shared_embeddings=shared), source="root/dataset.yaml")
