"""The JSON request form (mtfm_rec.serve.json_request): round trips, folding as training folds,
and every rule's error naming its field and rule."""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict

import numpy as np
import pytest
from serve_helpers import MULTI_HOT

from mtfm_rec.data.schema import DatasetSchema, fold_ids
from mtfm_rec.model.examples import demo_schema
from mtfm_rec.serve import json_request as jr
from mtfm_rec.serve.json_request import (
    RequestError,
    RequestLimits,
    RequestTooLarge,
    request_from_json,
    request_to_json,
)
from mtfm_rec.serve.request import Request, collate_requests

SCHEMA = demo_schema(num_scenarios=3)


def random_json(
    schema: DatasetSchema, scenario: str, seed: int, m: int = 3, length: int = 4
) -> Dict[str, Any]:
    """A valid JSON request with every key explicit, ids in range or null, float32 dense values,
    every sequence non-empty: the exact form request_to_json writes."""
    rng = np.random.default_rng(seed)
    spec = schema.scenario(scenario)
    ts = 1000

    def one_id(size: int) -> Any:
        return None if rng.random() < 0.2 else int(rng.integers(0, size))

    user: Dict[str, Any] = {c: one_id(n) for g, c, n in spec.categorical() if g == "user"}
    user.update({c: [one_id(n) for _ in range(2)] for g, c, n, _ in spec.multi_hot() if g == "user"})
    context = {}
    for q in schema.sequences:
        hi = 900 if q.is_history else ts
        times = sorted(int(t) for t in rng.integers(0, hi, length))
        context[q.name] = {"ts": times, **{f: [one_id(n) for _ in times] for f, n in q.features.items()}}
    cands = []
    for j in range(m):
        c: Dict[str, Any] = {col: one_id(n) for g, col, n in spec.categorical() if g != "user"}
        c.update({col: [one_id(n) for _ in range(j)] for g, col, n, _ in spec.multi_hot() if g != "user"})
        c.update({col: float(np.float32(rng.normal() * 10)) for col in spec.dense_features})
        cands.append(c)
    return {
        "scenario": scenario,
        "user_id": 7,
        "ts": ts,
        "user": user,
        "context": context,
        "candidates": cands,
    }


def assert_requests_equal(a: Request, b: Request) -> None:
    assert (a.scenario, a.ts, a.user_id) == (b.scenario, b.ts, b.user_id)
    assert a.context.keys() == b.context.keys()
    for name in a.context:
        np.testing.assert_array_equal(a.context[name].ts, b.context[name].ts)
        assert a.context[name].ids.keys() == b.context[name].ids.keys()
        for f in a.context[name].ids:
            np.testing.assert_array_equal(a.context[name].ids[f], b.context[name].ids[f])
    assert a.features.keys() == b.features.keys()
    for k in a.features:
        np.testing.assert_array_equal(a.features[k], b.features[k])
    assert a.bags.keys() == b.bags.keys()
    for k in a.bags:
        np.testing.assert_array_equal(a.bags[k][0], b.bags[k][0])
        np.testing.assert_array_equal(a.bags[k][1], b.bags[k][1])
    assert a.dense.dtype == b.dense.dtype == np.float32
    np.testing.assert_array_equal(a.dense, b.dense)
    np.testing.assert_array_equal(a.candidate_ts, b.candidate_ts)


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize(
    "schema,scenario", [(SCHEMA, "sc0"), (SCHEMA, "sc1"), (SCHEMA, "sc2"), (MULTI_HOT, "a"), (MULTI_HOT, "b")]
)
def test_round_trip(schema: DatasetSchema, scenario: str) -> None:
    obj = random_json(schema, scenario, seed=3)
    request = request_from_json(obj, schema)
    assert request_to_json(request, schema) == obj
    assert_requests_equal(request_from_json(request_to_json(request, schema), schema), request)


def test_request_layout() -> None:
    """Columns, shapes and dtypes the collate step expects; user features on every candidate."""
    spec = SCHEMA.scenario("sc2")
    obj = random_json(SCHEMA, "sc2", seed=1, m=5)
    request = request_from_json(obj, SCHEMA)
    assert list(request.features) == [c for _, c, _ in spec.categorical()]
    assert request.dense.shape == (5, 2) and request.dense.dtype == np.float32
    np.testing.assert_array_equal(request.dense[:, 1], [c["price1"] for c in obj["candidates"]])
    np.testing.assert_array_equal(request.candidate_ts, [obj["ts"]] * 5)
    assert len(set(request.features["city"].tolist())) == 1  # the user's one city, repeated
    inputs = collate_requests([request], SCHEMA)
    assert tuple(inputs.cand_ids.shape) == (1, 5, len(spec.categorical()))


def test_absent_sequences_are_empty_and_absent_user_features_missing() -> None:
    obj = {"scenario": "sc0", "user_id": 1, "ts": 5, "candidates": [{"item": 3}]}
    request = request_from_json(obj, SCHEMA)
    assert set(request.context) == {q.name for q in SCHEMA.sequences}
    assert all(
        len(c) == 0 and set(c.ids) == set(q.features)
        for q, c in zip(SCHEMA.sequences, request.context.values())
    )
    spec = SCHEMA.scenario("sc0")
    for _, column, size in spec.categorical():  # all but item: the missing row
        expected = 3 if column == "item" else size
        np.testing.assert_array_equal(request.features[column], [expected])
    assert request.dense.shape == (1, 0)


def test_multi_hot_absent_null_and_empty() -> None:
    """A left-out or null list is one missing id ([size]), [] stays empty, as the reader reads them."""
    obj = {
        "scenario": "a",
        "user_id": 1,
        "ts": 5,
        "candidates": [{"price": 1}, {"price": 1, "genres": None}, {"price": 1, "genres": []}],
    }
    offsets, ids = request_from_json(obj, MULTI_HOT).bags["genres"]
    np.testing.assert_array_equal(offsets, [0, 1, 2, 2])
    np.testing.assert_array_equal(ids, [5, 5])
    user = {"scenario": "b", "user_id": 1, "ts": 5, "user": {"tags": [1, 9]}, "candidates": [{}, {}]}
    offsets, ids = request_from_json(user, MULTI_HOT).bags["tags"]
    np.testing.assert_array_equal(offsets, [0, 2, 4])
    np.testing.assert_array_equal(ids, [1, 1, 1, 1])  # 9 mod 4, repeated onto both candidates


# ---------------------------------------------------------------------------- folding
def test_out_of_range_and_null_ids_fold_as_training() -> None:
    raw = [3, -1, 50, 123456789, -(2**63), 2**63 - 1, None]
    nulls = np.array([v is None for v in raw])
    values = np.array([0 if v is None else v for v in raw], np.int64)
    obj = {
        "scenario": "a",
        "user_id": 1,
        "ts": 10**6,
        "context": {"orders": {"ts": list(range(len(raw))), "item": raw}},
        "candidates": [{"item": v, "genres": raw, "price": 0.5} for v in raw],
    }
    request = request_from_json(obj, MULTI_HOT)
    np.testing.assert_array_equal(request.features["item"], fold_ids(values, 6, nulls))
    np.testing.assert_array_equal(request.context["orders"].ids["item"], fold_ids(values, 6, nulls))
    _, bag_ids = request.bags["genres"]
    np.testing.assert_array_equal(bag_ids, np.tile(fold_ids(values, 5, nulls), len(raw)))
    user = request_from_json(
        {"scenario": "sc0", "user_id": 1, "ts": 1, "user": {"city": -3, "age": None}, "candidates": [{}] * 2},
        SCHEMA,
    )
    np.testing.assert_array_equal(user.features["city"], [4, 4])  # -3 mod 7
    np.testing.assert_array_equal(user.features["age"], [5, 5])  # null: the missing row


# ---------------------------------------------------------------------------- rules
def _base() -> Dict[str, Any]:
    return random_json(SCHEMA, "sc1", seed=0, m=3, length=3)


def _set(path: Callable[[Dict[str, Any]], None]) -> Dict[str, Any]:
    obj = _base()
    path(obj)
    return obj


CASES = [
    ("unknown top key", lambda o: o.update(extra=1), "extra", jr.RULE_UNKNOWN),
    ("no scenario", lambda o: o.pop("scenario"), "scenario", jr.RULE_REQUIRED),
    ("no ts", lambda o: o.pop("ts"), "ts", jr.RULE_REQUIRED),
    ("no user_id", lambda o: o.pop("user_id"), "user_id", jr.RULE_REQUIRED),
    ("no candidates", lambda o: o.pop("candidates"), "candidates", jr.RULE_REQUIRED),
    ("unknown scenario", lambda o: o.update(scenario="nope"), "scenario", "unknown scenario"),
    ("ts float", lambda o: o.update(ts=1.5), "ts", jr.RULE_INT),
    ("ts bool", lambda o: o.update(ts=True), "ts", jr.RULE_INT),
    ("ts range", lambda o: o.update(ts=2**62), "ts", jr.RULE_TS_RANGE),
    ("user_id str", lambda o: o.update(user_id="7"), "user_id", jr.RULE_INT),
    ("user_id int64", lambda o: o.update(user_id=2**63), "user_id", jr.RULE_INT64),
    ("user not object", lambda o: o.update(user=[1]), "user", jr.RULE_OBJECT),
    ("user unknown", lambda o: o["user"].update(age=1), "user.age", jr.RULE_UNKNOWN),
    ("item in user", lambda o: o["user"].update(item=1), "user.item", jr.RULE_UNKNOWN),
    ("user id bool", lambda o: o["user"].update(city=False), "user.city", jr.RULE_ID),
    ("context list", lambda o: o.update(context=[]), "context", jr.RULE_OBJECT),
    ("unknown sequence", lambda o: o["context"].update(clicks={}), "context.clicks", jr.RULE_UNKNOWN),
    (
        "unknown seq feature",
        lambda o: o["context"]["views"].update(cat=[1, 2, 3]),
        "context.views.cat",
        jr.RULE_UNKNOWN,
    ),
    ("seq without ts", lambda o: o["context"]["views"].pop("ts"), "context.views.ts", jr.RULE_REQUIRED),
    (
        "seq without feature",
        lambda o: o["context"]["orders"].pop("cat"),
        "context.orders.cat",
        jr.RULE_REQUIRED,
    ),
    ("seq ts not list", lambda o: o["context"]["orders"].update(ts=5), "context.orders.ts", jr.RULE_LIST),
    (
        "seq ts null",
        lambda o: o["context"]["orders"]["ts"].__setitem__(1, None),
        "context.orders.ts[1]",
        jr.RULE_INT,
    ),
    (
        "descending",
        lambda o: o["context"]["orders"].update(ts=[5, 4, 6]),
        "context.orders.ts[1]",
        jr.RULE_ASCENDING,
    ),
    (
        "leakage",
        lambda o: o["context"]["clicks_rt"].update(ts=[1, 2, 1000]),
        "context.clicks_rt.ts[2]",
        jr.RULE_LEAKAGE,
    ),
    ("lengths", lambda o: o["context"]["orders"].update(cat=[1, 2]), "context.orders.cat", jr.RULE_LENGTH),
    (
        "seq id float",
        lambda o: o["context"]["orders"]["item"].__setitem__(2, 1.0),
        "context.orders.item[2]",
        jr.RULE_ID,
    ),
    (
        "seq id int64",
        lambda o: o["context"]["orders"]["item"].__setitem__(0, -(2**63) - 1),
        "context.orders.item[0]",
        jr.RULE_INT64,
    ),
    ("candidates object", lambda o: o.update(candidates={}), "candidates", jr.RULE_LIST),
    ("no candidate", lambda o: o.update(candidates=[]), "candidates", jr.RULE_NO_CANDIDATE),
    ("candidate not object", lambda o: o["candidates"].__setitem__(1, 3), "candidates[1]", jr.RULE_OBJECT),
    ("unknown column", lambda o: o["candidates"][2].update(cat=1), "candidates[2].cat", jr.RULE_UNKNOWN),
    (
        "user column on candidate",
        lambda o: o["candidates"][0].update(city=1),
        "candidates[0].city",
        jr.RULE_UNKNOWN,
    ),
    ("id string", lambda o: o["candidates"][1].update(item="4"), "candidates[1].item", jr.RULE_ID),
    ("id bool", lambda o: o["candidates"][1].update(dist=True), "candidates[1].dist", jr.RULE_ID),
    ("id too big", lambda o: o["candidates"][0].update(item=2**64), "candidates[0].item", jr.RULE_INT64),
    ("dense missing", lambda o: o["candidates"][2].pop("price0"), "candidates[2].price0", jr.RULE_REQUIRED),
    ("dense null", lambda o: o["candidates"][0].update(price0=None), "candidates[0].price0", jr.RULE_DENSE),
    (
        "dense nan",
        lambda o: o["candidates"][0].update(price0=float("nan")),
        "candidates[0].price0",
        jr.RULE_DENSE,
    ),
    (
        "dense inf",
        lambda o: o["candidates"][0].update(price0=float("-inf")),
        "candidates[0].price0",
        jr.RULE_DENSE,
    ),
    (
        "dense float32",
        lambda o: o["candidates"][0].update(price0=1e39),
        "candidates[0].price0",
        jr.RULE_DENSE,
    ),
    (
        "dense huge int",
        lambda o: o["candidates"][0].update(price0=10**400),
        "candidates[0].price0",
        jr.RULE_DENSE,
    ),
    ("dense bool", lambda o: o["candidates"][0].update(price0=True), "candidates[0].price0", jr.RULE_DENSE),
    ("dense str", lambda o: o["candidates"][0].update(price0="1"), "candidates[0].price0", jr.RULE_DENSE),
]


@pytest.mark.parametrize("mutate,field,rule", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rule_errors_name_field_and_rule(
    mutate: Callable[[Dict[str, Any]], Any], field: str, rule: str
) -> None:
    obj = _base()
    mutate(obj)
    with pytest.raises(RequestError) as info:
        request_from_json(obj, SCHEMA)
    assert not isinstance(info.value, RequestTooLarge)
    assert (info.value.field, info.value.rule) == (field, rule)
    assert str(info.value).startswith(f"{field}: {rule}")


@pytest.mark.parametrize("obj", [None, [], "sc0", 3])
def test_request_must_be_an_object(obj: Any) -> None:
    with pytest.raises(RequestError) as info:
        request_from_json(obj, SCHEMA)
    assert (info.value.field, info.value.rule) == ("$", jr.RULE_OBJECT)


def test_unknown_names_list_the_declared_ones() -> None:
    obj = _set(lambda o: o["candidates"][2].update(cat=1))
    with pytest.raises(
        RequestError, match=r"declared candidate features of scenario 'sc1': \['dist', 'item', 'price0'\]"
    ):
        request_from_json(obj, SCHEMA)
    obj = _set(lambda o: o["context"].update(clicks={}))
    with pytest.raises(RequestError, match=r"declared sequences: \['clicks_rt', 'orders', 'views'\]"):
        request_from_json(obj, SCHEMA)
    with pytest.raises(RequestError, match=r"declared: \['sc0', 'sc1', 'sc2'\]"):
        request_from_json(_set(lambda o: o.update(scenario="x")), SCHEMA)


def test_error_messages_never_repr_containers() -> None:
    """A deep or huge container in an id slot is described by its size (its repr could be
    megabytes, or beyond repr's recursion limit)."""
    deep: Any = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(
        RequestError, match=r"candidates\[1\].item: must be an int or null .*got list of 1\)"
    ) as info:
        request_from_json(_set(lambda o: o["candidates"][1].update(item=deep)), SCHEMA)
    assert info.value.rule == jr.RULE_ID
    with pytest.raises(RequestError, match=r"got object of 2; declared"):
        request_from_json(_set(lambda o: o.update(scenario={"a": 1, "b": 2})), SCHEMA)


def test_history_actions_at_or_after_ts_are_accepted() -> None:
    obj = _set(lambda o: o["context"]["orders"].update(ts=[999, 1000, 5000]))
    np.testing.assert_array_equal(request_from_json(obj, SCHEMA).context["orders"].ts, [999, 1000, 5000])
    tied = _set(lambda o: o["context"]["clicks_rt"].update(ts=[3, 3, 999]))  # ties are ascending
    np.testing.assert_array_equal(request_from_json(tied, SCHEMA).context["clicks_rt"].ts, [3, 3, 999])


def test_multi_hot_rules() -> None:
    def mh(**cand: Any) -> Dict[str, Any]:
        return {"scenario": "a", "user_id": 1, "ts": 5, "candidates": [{"price": 1.0, **cand}]}

    for value, field, rule in [
        (3, "candidates[0].genres", jr.RULE_LIST),
        ([1, "2"], "candidates[0].genres[1]", jr.RULE_ID),
        ([[1]], "candidates[0].genres[0]", jr.RULE_ID),
    ]:
        with pytest.raises(RequestError) as info:
            request_from_json(mh(genres=value), MULTI_HOT)
        assert (info.value.field, info.value.rule) == (field, rule)


@pytest.mark.parametrize(
    "schema,obj,field,rule",
    [
        (
            SCHEMA,
            lambda: _set(lambda o: o.update(candidates=[{"price0": 1.0}] * 4)),
            "candidates",
            jr.RULE_TOO_MANY_CANDIDATES,
        ),
        (
            SCHEMA,
            lambda: _set(lambda o: o["context"]["views"].update(ts=[1] * 6, item=[1] * 6)),
            "context.views.ts",
            jr.RULE_CONTEXT_TOO_LONG,
        ),
        (
            MULTI_HOT,
            lambda: {"scenario": "a", "user_id": 1, "ts": 5, "candidates": [{"price": 1, "genres": [1] * 3}]},
            "candidates[0].genres",
            jr.RULE_BAG_TOO_LONG,
        ),
        (
            MULTI_HOT,
            lambda: {"scenario": "b", "user_id": 1, "ts": 5, "user": {"tags": [1] * 3}, "candidates": [{}]},
            "user.tags",
            jr.RULE_BAG_TOO_LONG,
        ),
    ],
    ids=["candidates", "context", "bag", "user bag"],
)
def test_limits_raise_request_too_large(
    schema: DatasetSchema, obj: Callable[[], Any], field: str, rule: str
) -> None:
    limits = RequestLimits(max_candidates=3, max_context=5, max_bag_ids=2)
    with pytest.raises(RequestTooLarge) as info:
        request_from_json(obj(), schema, limits)
    assert isinstance(info.value, RequestError)
    assert (info.value.field, info.value.rule) == (field, rule)
    at_limit = RequestLimits(max_candidates=4, max_context=6, max_bag_ids=3)
    request_from_json(obj(), schema, at_limit)  # exactly at the limit: accepted


def test_request_is_not_modified() -> None:
    obj = _base()
    before = copy.deepcopy(obj)
    request_from_json(obj, SCHEMA)
    assert obj == before


def test_to_json_refuses_what_json_cannot_say() -> None:
    request = request_from_json(_base(), SCHEMA)
    request.features["city"] = np.array([1, 2, 1])
    with pytest.raises(ValueError, match="user feature 'city' differs across candidates"):
        request_to_json(request, SCHEMA)
    request = request_from_json(_base(), SCHEMA)
    request.candidate_ts = request.candidate_ts - np.array([0, 1, 0])
    with pytest.raises(ValueError, match="candidate_ts"):
        request_to_json(request, SCHEMA)


def test_a_sequence_longer_than_max_len_keeps_its_most_recent_actions() -> None:
    """As the aggregation keeps them for a training sample (dataset.yaml max_len = 64)."""
    n = SCHEMA.sequence("orders").max_len + 3
    obj = _set(
        lambda o: o["context"].update(orders={"ts": list(range(n)), "item": list(range(n)), "cat": [1] * n})
    )
    kept = request_from_json(obj, SCHEMA).context["orders"]
    np.testing.assert_array_equal(kept.ts, np.arange(3, n))
    np.testing.assert_array_equal(
        kept.ids["item"], np.arange(3, n) % SCHEMA.sequence("orders").features["item"]
    )
