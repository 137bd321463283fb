"""dataset.yaml is read strictly: unknown keys, wrong types, bad names, duplicate keys, alias
bombs and non-UTF-8 bytes are SchemaErrors naming the file, the place and the rule (issue 9)."""

from __future__ import annotations

import copy
from typing import Any, Dict

import pytest
import yaml

from mtfm_rec.data import schema as sch
from mtfm_rec.data import schema_parsing as parsing
from mtfm_rec.data.schema import DatasetSchema, SchemaError

RAW: Dict[str, Any] = {
    "name": "demo",
    "time_unit": "s",
    "sequences": [{"name": "orders", "kind": "history", "max_len": 8, "features": {"item_id": 100}}],
    "scenarios": [
        {
            "name": "feed",
            "user_features": {"city": 4},
            "item_features": {"item_id": 100},
            "dense_features": ["price"],
            "tasks": ["click", "order"],
        }
    ],
    "recommended_eval_after": 1000,
}


def load_text(tmp_path: Any, text: str | bytes) -> DatasetSchema:
    path = tmp_path / "dataset.yaml"
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return DatasetSchema.load(str(tmp_path))


def refused(tmp_path: Any, raw: Dict[str, Any], message: str) -> str:
    """Loads ``raw`` written as dataset.yaml; asserts a SchemaError naming the file and ``message``."""
    with pytest.raises(SchemaError) as err:
        load_text(tmp_path, yaml.safe_dump(raw, sort_keys=False))
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path}/dataset.yaml: "), msg
    assert message in msg, msg
    return msg


def patched(path: str, value: Any, delete: str = "") -> Dict[str, Any]:
    """RAW with ``value`` at the dotted ``path`` (list items by index) and key ``delete`` removed."""
    raw = copy.deepcopy(RAW)
    *parents, last = path.split(".")
    node: Any = raw
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[last] = value
    if delete:
        del node[delete]
    return raw


def test_the_valid_schema_loads(tmp_path: Any) -> None:
    schema = load_text(tmp_path, yaml.safe_dump(RAW, sort_keys=False))
    assert schema.scenario("feed").user_features == {"city": 4}
    assert schema.extra == {"recommended_eval_after": 1000}


@pytest.mark.parametrize(
    "path, delete, message",
    [
        ("time_units", "time_unit", "time_units: unknown key (did you mean 'time_unit'?"),
        (
            "scenarios.0.user_feature",
            "user_features",
            "scenarios.feed.user_feature: unknown key (did you mean 'user_features'?",
        ),
        ("scenarios.0.task", "", "scenarios.feed.task: unknown key (did you mean 'tasks'?"),
        (
            "sequences.0.max_length",
            "max_len",
            "sequences.orders.max_length: unknown key (did you mean 'max_len'?",
        ),
        (
            "recomended_eval_after",
            "",
            "recomended_eval_after: unknown key (did you mean 'recommended_eval_after'?",
        ),
    ],
)
def test_unknown_keys_name_the_place_and_the_nearest_valid_key(
    tmp_path: Any, path: str, delete: str, message: str
) -> None:
    msg = refused(tmp_path, patched(path, 1, delete), message)
    assert "valid keys: " in msg


def test_a_missing_required_key_is_named(tmp_path: Any) -> None:
    raw = patched("sequences.0.kind", "history", delete="max_len")
    refused(tmp_path, raw, "sequences.orders.max_len: required key is missing")


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("sequences.0.max_len", True, "sequences.orders.max_len: must be a positive int, got bool True"),
        ("sequences.0.max_len", "8", "sequences.orders.max_len: must be a positive int, got str '8'"),
        (
            "sequences.0.features.item_id",
            True,
            "sequences.orders.features.item_id: vocabulary size must be a positive int, got bool True",
        ),
        (
            "sequences.0.kind",
            ["history"],
            "sequences.orders.kind: must be one of ('history', 'realtime'), got list",
        ),
        (
            "scenarios.0.tasks",
            "click",
            "scenarios.feed.tasks: must be a list of task (0/1 label column) names, got str 'click'",
        ),
        (
            "scenarios.0.dense_features",
            "price",
            "scenarios.feed.dense_features: must be a list of float column names, got str 'price'",
        ),
        (
            "scenarios.0.user_features",
            ["city"],
            "scenarios.feed.user_features: must map column -> vocabulary size, got list",
        ),
        ("scenarios", {"feed": {}}, "scenarios: must be a list of scenario mappings, got dict"),
        ("sequences", "orders", "sequences: must be a list of sequence mappings, got str 'orders'"),
        ("time_unit", 1, "time_unit: must be a string, got int 1"),
        ("name", 7, "name: a name must be a string, got int 7"),
        (
            "recommended_eval_after",
            "2000-01-01",
            "recommended_eval_after: must be an int, got str '2000-01-01'",
        ),
        ("recommended_eval_after", True, "recommended_eval_after: must be an int, got bool True"),
        (
            "recommended_realtime_lookback_seconds",
            -1,
            "recommended_realtime_lookback_seconds: must be a non-negative int, got int -1",
        ),
        ("recipe", 3, "recipe: must be a string, got int 3"),
        (
            "shared_embeddings",
            ["item_id"],
            "shared_embeddings: must map table name -> list of feature keys, got list",
        ),
    ],
)
def test_values_are_type_checked(tmp_path: Any, path: str, value: Any, message: str) -> None:
    refused(tmp_path, patched(path, value), message)


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("scenarios.0.name", "feed.v2", "scenarios[0].name: 'feed.v2' is not a valid name"),
        ("scenarios.0.name", "2feed", "scenarios[0].name: '2feed' is not a valid name"),
        ("scenarios.0.name", "_feed", "scenarios[0].name: '_feed' is not a valid name"),
        ("sequences.0.name", "a__b", "sequences[0].name: 'a__b' is not a valid name"),
        ("sequences.0.name", "a/b", "sequences[0].name: 'a/b' is not a valid name"),
        (
            "scenarios.0.user_features",
            {"ci.ty": 4},
            "scenarios.feed.user_features: 'ci.ty' is not a valid name",
        ),
        ("scenarios.0.tasks", ["click", "or der"], "scenarios.feed.tasks[1]: 'or der' is not a valid name"),
        (
            "scenarios.0.dense_features",
            ["p__x"],
            "scenarios.feed.dense_features[0]: 'p__x' is not a valid name",
        ),
        (
            "shared_embeddings",
            {"t.x": ["seq/orders/item_id", "exp/feed/item/item_id"]},
            "shared_embeddings: 't.x' is not a valid name",
        ),
        ("name", "../elsewhere", "name: '../elsewhere' is not a valid name"),
    ],
)
def test_names_follow_the_documented_character_set(
    tmp_path: Any, path: str, value: Any, message: str
) -> None:
    msg = refused(tmp_path, patched(path, value), message)
    assert (parsing.DATASET_NAME_RULE if path == "name" else parsing.NAME_RULE) in msg


def test_names_of_the_shipped_generators_are_valid() -> None:
    from mtfm_rec.data.synthetic import SyntheticConfig, build_schema

    schema = build_schema(SyntheticConfig())
    again = parsing.load_yaml(schema.to_yaml(), "synthetic/dataset.yaml")
    assert DatasetSchema.from_dict(again).to_dict() == schema.to_dict()


def test_reserved_columns_are_refused_as_sequence_features(tmp_path: Any) -> None:
    # a sequence feature named ts would overwrite the action timestamps with folded ids
    raw = patched("sequences.0.features", {"ts": 5})
    refused(tmp_path, raw, "sequences.orders: reserved column names used as features: ['ts']")


def test_non_string_keys_are_refused(tmp_path: Any) -> None:
    text = yaml.safe_dump(RAW, sort_keys=False).replace("city: 4", "on: 4")  # YAML 1.1: on = True
    message = r"scenarios\.feed\.user_features: a name must be a string, got bool True .*quote it"
    with pytest.raises(SchemaError, match=message):
        load_text(tmp_path, text)
    with pytest.raises(SchemaError, match=r"dataset\.yaml: 1: keys must be strings, got int 1 .*quote it"):
        load_text(tmp_path, "1: x\n" + yaml.safe_dump(RAW, sort_keys=False))


def test_table_name_mangling_collisions_are_found() -> None:
    names = ["exp/a/item/b", "exp__a__item__b", "seq/q/f"]
    assert sch.mangling_collisions(names) == [["exp/a/item/b", "exp__a__item__b"]]
    assert sch.mangling_collisions(list(DatasetSchema.from_dict(RAW).embedding_tables())) == []


def test_mangling_matches_the_model() -> None:
    from mtfm_rec.model import ModelConfig
    from mtfm_rec.model.tokenizer import make_embedding_collection

    raw = patched("scenarios.0.item_features", {"a_": 3, "item_id": 100})
    raw["shared_embeddings"] = {"item_": ["seq/orders/item_id", "exp/feed/item/item_id"]}
    schema = DatasetSchema.from_dict(raw)
    built = {t.name for t in make_embedding_collection(schema, ModelConfig()).embedding_configs()}
    assert built == {sch.mangled_table_name(name) for name in schema.embedding_tables()}


# ---------------------------------------------------------------- the YAML text itself
def test_duplicate_keys_are_refused_with_lines(tmp_path: Any) -> None:
    text = yaml.safe_dump(RAW, sort_keys=False)
    message = r"dataset\.yaml: line 2: key 'name' appears twice in one mapping \(first at line 1\)"
    with pytest.raises(SchemaError, match=message):
        load_text(tmp_path, "name: first\n" + text)
    nested = text.replace("city: 4", "city: 4\n    city: 5")
    with pytest.raises(SchemaError, match=r"line \d+: key 'city' appears twice"):
        load_text(tmp_path, nested)


def test_anchors_aliases_and_merge_keys_still_load(tmp_path: Any) -> None:
    raw = copy.deepcopy(RAW)
    raw["scenarios"].append(dict(raw["scenarios"][0], name="coupon"))
    raw["scenarios"][1]["user_features"] = raw["scenarios"][0]["user_features"]  # one object twice
    text = yaml.safe_dump(raw, sort_keys=False)
    assert "&id001" in text and "*id001" in text  # safe_dump writes an anchor and an alias
    schema = load_text(tmp_path, text)
    assert schema.scenario("coupon").user_features == {"city": 4}
    merged = text.replace("  user_features: *id001", "  user_features:\n      <<: *id001\n      city: 9")
    assert load_text(tmp_path, merged).scenario("coupon").user_features == {"city": 9}


def test_a_billion_laughs_file_is_refused_before_expansion(tmp_path: Any) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    text = "\n".join(lines) + "\n" + yaml.safe_dump(RAW, sort_keys=False)
    assert len(text) < 2000  # ~10**10 nodes once expanded
    with pytest.raises(SchemaError, match=f"YAML expands to more than {parsing.MAX_YAML_NODES} nodes"):
        load_text(tmp_path, text)


def test_a_recursive_alias_is_refused(tmp_path: Any) -> None:
    with pytest.raises(SchemaError, match="recursive YAML alias"):
        load_text(tmp_path, "x_loop: &a [*a]\n" + yaml.safe_dump(RAW, sort_keys=False))


def test_non_utf8_bytes_are_a_schema_error(tmp_path: Any) -> None:
    text = yaml.safe_dump(RAW, sort_keys=False).encode().replace(b"name: demo", b"name: d\xe9mo")
    with pytest.raises(
        SchemaError, match=r"dataset\.yaml: not UTF-8 text \(byte 7: invalid continuation byte\)"
    ):
        load_text(tmp_path, text)


def test_extension_keys_are_kept_and_round_trip(tmp_path: Any) -> None:
    raw = dict(RAW, x_owner="team-a", x_notes={"source": "logs"}, generator={"seed": 1})
    schema = load_text(tmp_path, yaml.safe_dump(raw, sort_keys=False))
    assert schema.extra["x_owner"] == "team-a" and schema.extra["x_notes"] == {"source": "logs"}
    assert DatasetSchema.from_dict(yaml.safe_load(schema.to_yaml())).to_dict() == schema.to_dict()


@pytest.mark.parametrize("char", ["\x00", "\x07", "\ufffe"])
def test_non_printable_characters_are_a_schema_error(tmp_path: Any, char: str) -> None:
    # YAML refuses them while reading the text, before parsing: that error is a SchemaError too
    text = yaml.safe_dump(RAW, sort_keys=False).replace("name: demo", f"name: de{char}mo")
    with pytest.raises(SchemaError, match=r"dataset\.yaml: not valid YAML: unacceptable character"):
        load_text(tmp_path, text.encode())


@pytest.mark.parametrize(
    "path, value, message",
    [
        # fold_ids takes ids mod the size in int64 and the table has size + 1 rows
        (
            "sequences.0.features.item_id",
            2**63 - 1,
            "sequences.orders.features.item_id: vocabulary size 9223372036854775807 is above 2**63 - 2",
        ),
        (
            "scenarios.0.user_features.city",
            10**30,
            "scenarios.feed.user_features.city: vocabulary size "
            "1000000000000000000000000000000 is above 2**63 - 2",
        ),
        # aggregation keeps the last max_len actions with int64 arithmetic
        ("sequences.0.max_len", 2**63, "sequences.orders.max_len: 9223372036854775808 is above 2**63 - 1"),
        # the R window reaches lookback before the window start; ts lives in [-2**62, 2**62)
        (
            "recommended_realtime_lookback_seconds",
            2**62 + 1,
            "recommended_realtime_lookback_seconds: 4611686018427387905 s is more than 2**62 ticks",
        ),
        (
            "recommended_realtime_lookback_seconds",
            10**30,
            "recommended_realtime_lookback_seconds: 1000000000000000000000000000000 s "
            "is more than 2**62 ticks",
        ),
    ],
)
def test_sizes_and_durations_must_fit_the_int64_arithmetic(
    tmp_path: Any, path: str, value: Any, message: str
) -> None:
    refused(tmp_path, patched(path, value), message)


def test_the_largest_sizes_and_durations_load(tmp_path: Any) -> None:
    raw = patched("sequences.0.features.item_id", 2**63 - 2)
    raw["sequences"][0]["max_len"] = 2**63 - 1
    raw["recommended_realtime_lookback_seconds"] = 2**62 // 1000
    raw["time_unit"] = "ms"
    schema = load_text(tmp_path, yaml.safe_dump(raw, sort_keys=False))
    assert schema.sparse_feature_sizes()["seq/orders/item_id"] == 2**63 - 1
    assert schema.sequences[0].max_len == 2**63 - 1
    raw["recommended_realtime_lookback_seconds"] += 1
    refused(tmp_path, raw, "s is more than 2**62 ticks")


def test_a_dataset_yaml_that_is_a_folder_is_a_schema_error(tmp_path: Any) -> None:
    (tmp_path / "dataset.yaml").mkdir()
    with pytest.raises(SchemaError, match=r"dataset\.yaml: cannot be read \(IsADirectoryError"):
        DatasetSchema.load(str(tmp_path))
