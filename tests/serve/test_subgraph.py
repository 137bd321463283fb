"""Scenario subgraphs and M-Falcon against the training layout: every exposure served scores what
the trainer scores, whatever the micro-batch size, the candidate order, the number of
candidates or the requests batched together; no candidate or later action moves a score."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from serve_helpers import demo, small_model, training_scores

from mtfm_rec.model.examples import demo_schema, random_batch, trained_time_bias
from mtfm_rec.model.zoo import build_model
from mtfm_rec.serve.falcon import ContextStore, context_fingerprint
from mtfm_rec.serve.predictor import Predictor, eager_scorer
from mtfm_rec.serve.request import SequenceContext, collate_requests, requests_from_batch
from mtfm_rec.serve.subgraph import ServingError, extract_subgraph, parameter_counts

TOL = 1e-5


def _served(sub, requests, schema, micro_batch=0):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        probs = sub.score_inputs(collate_requests(requests, schema), micro_batch)
    return [probs[i, : r.num_candidates] for i, r in enumerate(requests)]


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"time_frequencies": 4},
        {"time_rotary_pairs": 2},
        {"time_rotary_pairs": 4, "time_rotary_head_share": 0.5},
        {"time_bias_pairs": 3},
        {"time_bias_pairs": 3, "time_bias_source": "group"},
        {"attention_normalisation": "segment"},
        {"attention_normalisation": "segment", "time_bias_pairs": 3},
        {"num_blocks": 2, "num_kv_heads": 1},
    ],
)
def test_every_exposure_scores_as_in_the_training_layout(overrides: dict) -> None:
    schema, batch = demo()
    model = small_model(schema, **overrides)
    trained_time_bias(model)
    reference = training_scores(model, batch)
    for scenario in reference:
        sub = extract_subgraph(model, scenario)
        requests, rows = requests_from_batch(batch, schema, scenario)
        assert sum(r.num_candidates for r in requests) == reference[scenario].shape[0]
        for probs, index in zip(_served(sub, requests, schema), rows):
            torch.testing.assert_close(probs, reference[scenario][index], atol=TOL, rtol=0)


def test_ties_between_real_time_actions_and_exposures_are_strict() -> None:
    """R and T timestamps drawn from a pool of 3: an action at the exposure's own ts is unseen."""
    schema = demo_schema(num_scenarios=3)
    batch = random_batch(schema, batch_size=6, seed=5, ts_pool=3)
    model = small_model(schema)
    reference = training_scores(model, batch)
    for scenario in reference:
        requests, rows = requests_from_batch(batch, schema, scenario)
        for probs, index in zip(_served(extract_subgraph(model, scenario), requests, schema), rows):
            torch.testing.assert_close(probs, reference[scenario][index], atol=TOL, rtol=0)


@pytest.mark.parametrize("micro_batch", [1, 2, 3])
def test_micro_batches_and_candidate_order_do_not_change_a_score(micro_batch: int) -> None:
    schema, batch = demo()
    model = small_model(schema)
    sub = extract_subgraph(model, "sc2")
    requests, _ = requests_from_batch(batch, schema, "sc2")
    whole = _served(sub, requests, schema)
    rng = np.random.default_rng(micro_batch)
    for request, expected in zip(requests, whole):
        perm = rng.permutation(request.num_candidates)
        (shuffled,) = _served(sub, [request.take(perm)], schema, micro_batch)
        torch.testing.assert_close(shuffled, expected[perm], atol=TOL, rtol=0)
        (first,) = _served(sub, [request.take(perm[:1])], schema)  # one candidate alone
        torch.testing.assert_close(first, expected[perm[:1]], atol=TOL, rtol=0)


def test_a_later_real_time_action_in_the_context_changes_nothing() -> None:
    """The subgraph applies the mask itself: an action at or after the request time is unseen."""
    schema, batch = demo()
    model = small_model(schema)
    sub = extract_subgraph(model, "sc0")
    request = requests_from_batch(batch, schema, "sc0")[0][0]
    (before,) = _served(sub, [request], schema)
    rt = request.context["clicks_rt"]
    later = SequenceContext(
        np.concatenate([rt.ts, [request.ts, request.ts + 5]]),
        {f: np.concatenate([v, [1, 2]]) for f, v in rt.ids.items()},
    )
    request.context = {**request.context, "clicks_rt": later}
    (after,) = _served(sub, [request], schema)
    torch.testing.assert_close(after, before, atol=TOL, rtol=0)


def test_the_reference_attention_backend_gives_the_kernels_scores() -> None:
    schema, batch = demo()
    model = small_model(schema)
    requests, _ = requests_from_batch(batch, schema, "sc1")
    fast = _served(extract_subgraph(model, "sc1"), requests, schema)
    slow = _served(extract_subgraph(model, "sc1", attention_backend="reference"), requests, schema)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)


def test_the_predictor_batches_mixed_scenarios_and_keeps_request_order() -> None:
    schema, batch = demo()
    model = small_model(schema)
    reference = training_scores(model, batch)
    scorers = {s: eager_scorer(extract_subgraph(model, s), micro_batch=2) for s in reference}
    predictor = Predictor(schema, scorers, max_batch_requests=3)
    mixed, expected = [], []
    for scenario in reference:
        requests, rows = requests_from_batch(batch, schema, scenario)
        mixed += requests
        expected += [reference[scenario][index].numpy() for index in rows]
    order = np.random.default_rng(0).permutation(len(mixed))
    scores = predictor.score([mixed[i] for i in order])
    for got, i in zip(scores, order):
        np.testing.assert_allclose(got, expected[i], atol=TOL, rtol=0)


def test_the_subgraph_holds_only_its_scenario_and_the_sequences() -> None:
    schema, _ = demo()
    model = small_model(schema)
    sub = extract_subgraph(model, "sc1")
    whole, part = parameter_counts(model, sub)
    assert part < whole
    other_rows = sum(
        model.embedding_collection.embeddings[name].weight.numel()
        for name in model.embedding_collection.embeddings
        if "exp__sc0" in name or "exp__sc2" in name
    )
    assert whole - part >= other_rows  # none of the other scenarios' tables was copied
    assert sorted(sub.tables.index) == sorted(
        [f"seq/{q.name}/{f}" for q in schema.ordered_sequences for f in q.features]
        + [f"exp/sc1/{g}/{c}" for g, c, _ in schema.scenario("sc1").categorical()]
    )


def test_a_model_without_a_candidate_free_context_is_refused() -> None:
    schema, _ = demo()
    torch.manual_seed(0)
    star = build_model(schema, small_model(schema).config.__class__(name="star", embedding_dim=8, d_model=16))
    with pytest.raises(ServingError, match="model.name='star'"):
        extract_subgraph(star, "sc0")
    with pytest.raises(ServingError, match="sequences on"):
        extract_subgraph(small_model(schema, use_sequences=False), "sc0")


def test_a_context_store_reuses_an_identical_context_only_and_stays_bounded() -> None:
    schema, batch = demo()
    model = small_model(schema)
    sub = extract_subgraph(model, "sc2")
    requests, _ = requests_from_batch(batch, schema, "sc2")
    expected = _served(sub, requests, schema)
    store = ContextStore(max_entries=2)
    with torch.no_grad():
        first = sub.score_inputs(collate_requests(requests, schema), store=store)
        again = sub.score_inputs(collate_requests(requests[:1] * 3, schema), micro_batch=1, store=store)
    for i, r in enumerate(requests):
        torch.testing.assert_close(first[i, : r.num_candidates], expected[i], atol=TOL, rtol=0)
    for row in again:
        torch.testing.assert_close(row[: requests[0].num_candidates], expected[0], atol=TOL, rtol=0)
    distinct = len({context_fingerprint(*_context(r, schema)) for r in requests})
    assert distinct > 2 and store.misses == distinct + 1  # requests[0] was evicted, then encoded again
    assert store.hits == len(requests) - distinct + 2 and len(store) == 2


def _context(request, schema):  # type: ignore[no-untyped-def]
    one = collate_requests([request], schema).request(0)
    return one.seq_ids, one.seq_ts


def test_exposures_of_one_logged_request_are_one_request_and_score_as_in_training() -> None:
    """With request ids in the log, replay groups by them, even across exposure times; each
    candidate keeps its own ts (so it still sees only its earlier real-time actions)."""
    import pyarrow as pa

    from mtfm_rec.data import sample_format as fmt
    from mtfm_rec.data.batch import collate
    from mtfm_rec.model.examples import random_table

    schema = demo_schema(num_scenarios=3)
    table = random_table(schema, 6, exposures=(2, 6), seed=11)
    column = fmt.exp_request_id("sc2")
    ids = [
        [100 * b + i // 2 for i in range(len(row))] for b, row in enumerate(table.column(column).to_pylist())
    ]
    table = table.set_column(
        table.schema.get_field_index(column), column, pa.array(ids, pa.list_(pa.int64()))
    )
    batch = collate(table, schema)
    model = small_model(schema)
    reference = training_scores(model, batch)["sc2"]
    requests, rows = requests_from_batch(batch, schema, "sc2")
    assert sorted(len(r) for r in rows) == sorted(n for row in ids for n in np.bincount(np.array(row) % 100))
    assert any(len(set(r.candidate_ts.tolist())) > 1 for r in requests)  # a request spanning two times
    for probs, index in zip(_served(extract_subgraph(model, "sc2"), requests, schema), rows):
        torch.testing.assert_close(probs, reference[index], atol=TOL, rtol=0)
