"""The whole model: leakage, permutation equivariance, mixed schemas, stack shapes, gradients."""

from __future__ import annotations

import dataclasses
from typing import Dict, List

import pyarrow as pa
import pytest
import torch
from model_helpers import (
    dense_forward_on_meta,
    exposure_scores,
    hidden_from,
    make_model,
    perturb_tokens,
    sample_rows,
)

from mtfm_rec.data.batch import collate
from mtfm_rec.kernels.jagged import TokenKind
from mtfm_rec.model.examples import random_batch, random_table
from mtfm_rec.model.heads import funnel_log_probs


@pytest.mark.parametrize(
    "stack",
    [
        dict(num_blocks=2, target_layers_per_block=1, full_layers_per_block=1, attention_backend="reference"),
        dict(num_blocks=1, target_layers_per_block=1, full_layers_per_block=2, attention_backend="prefix"),
        dict(
            num_blocks=1,
            target_layers_per_block=1,
            full_layers_per_block=1,
            attention_backend="reference",
            attention_normalisation="segment",
        ),
    ],
)
def test_target_score_ignores_later_realtime_and_other_targets(schema, stack: Dict[str, object]) -> None:
    """Changing R tokens with ts >= a T token's, and the other T tokens, leaves its score unchanged."""
    model = make_model(schema, **stack)
    batch = random_batch(schema, 4, seq_len=(1, 8), exposures=(1, 3), seed=11, ts_pool=8)
    with torch.no_grad():
        base = exposure_scores(model(batch)[1], batch)
    kind = batch.token_kind.tolist()
    checked = changed = 0
    for b in range(batch.batch_size):
        rows = sample_rows(batch, b)
        for i in [r for r in rows if kind[r] == TokenKind.TARGET][:2]:
            hidden = hidden_from(batch, i)
            with torch.no_grad():
                after = exposure_scores(model(perturb_tokens(batch, schema, hidden, seed=i))[1], batch)
            torch.testing.assert_close(after[i], base[i], rtol=0, atol=1e-6)
            checked += 1
            changed += sum(
                not torch.allclose(after[r], base[r]) for r in hidden if kind[r] == TokenKind.TARGET
            )
    assert checked >= 4
    assert changed > 0  # the perturbation is real: the perturbed T tokens' own scores moved


def test_target_score_depends_on_earlier_realtime(schema) -> None:
    """The converse (so the test above can fail): an R token earlier than a T token is seen."""
    model = make_model(schema, num_blocks=1, target_layers_per_block=1, full_layers_per_block=0)
    batch = random_batch(schema, 3, seq_len=(2, 8), exposures=(1, 3), seed=2)
    kind, ts = batch.token_kind.tolist(), batch.token_ts.tolist()
    i = next(
        r
        for r in range(batch.num_tokens)
        if kind[r] == TokenKind.TARGET
        and any(
            kind[j] == TokenKind.REALTIME and ts[j] < ts[r]
            for j in sample_rows(
                batch, int(torch.searchsorted(batch.token_offsets, torch.tensor(r), right=True)) - 1
            )
        )
    )
    b = int(torch.searchsorted(batch.token_offsets, torch.tensor(i), right=True)) - 1
    earlier = [j for j in sample_rows(batch, b) if kind[j] == TokenKind.REALTIME and ts[j] < ts[i]]
    with torch.no_grad():
        base = exposure_scores(model(batch)[1], batch)
        after = exposure_scores(model(perturb_tokens(batch, schema, earlier))[1], batch)
    assert not torch.allclose(after[i], base[i], atol=1e-6)


def _permute_sample_exposures(table: pa.Table, scenario: str, sample: int, perm: List[int]) -> pa.Table:
    prefix = f"exp/{scenario}/"
    for name in table.column_names:
        if name.startswith(prefix):
            col = table.column(name).to_pylist()
            col[sample] = [col[sample][p] for p in perm]
            index = table.column_names.index(name)
            table = table.set_column(
                index, table.schema.field(index), pa.array(col, type=table.schema.field(index).type)
            )
    return table


@pytest.mark.parametrize("backend", ["reference", "prefix"])
def test_permuting_a_samples_targets_permutes_its_scores(schema, backend: str) -> None:
    model = make_model(schema, attention_backend=backend)
    table = random_table(schema, 3, seq_len=(2, 6), exposures=(4, 4), seed=4)
    perm = [2, 0, 3, 1]
    permuted = _permute_sample_exposures(table, "sc1", 1, perm)
    with torch.no_grad():
        out_a = model(collate(table, schema))[1]["sc1"]
        out_b = model(collate(permuted, schema))[1]["sc1"]
    a, b = out_a[4:8], out_b[4:8]  # sample 1's exposures of sc1 (4 per sample)
    torch.testing.assert_close(b, a[perm], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_b[:4], out_a[:4], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a, a[perm])  # the permutation is not trivially invisible


@pytest.mark.parametrize("average", ["exposure", "task"])
def test_mixed_schemas_outputs_and_loss(schema, average: str) -> None:
    model = make_model(schema, loss_average=average)
    batch = random_batch(schema, 5, seed=9)
    loss, out = model(batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    expected_loss, weight = torch.zeros(()), 0.0
    for s in schema.scenarios:
        p = out[s.name]
        assert p.shape == (batch.labels[s.name].shape[0], len(s.tasks))
        assert ((p > 0) & (p < 1)).all()
        assert (p[:, 1:] <= p[:, :-1] + 1e-7).all()  # funnel: p(order) <= p(click)
        torch.testing.assert_close(torch.sigmoid(out[f"{s.name}/logits"]), p)
        y, m = batch.labels[s.name], batch.label_mask[s.name].float()
        bce = -(y * p.log() + (1 - y) * (1 - p).log()) * m
        for t in range(len(s.tasks)):
            if average == "exposure":  # every labelled (exposure, task) weighs the same
                expected_loss = expected_loss + bce[:, t].sum()
                weight += float(m[:, t].sum())
            elif m[:, t].sum() > 0:  # every present scenario x task weighs the same
                expected_loss = expected_loss + bce[:, t].sum() / m[:, t].sum()
                weight += 1.0
    torch.testing.assert_close(loss, expected_loss / weight, rtol=1e-4, atol=1e-6)


def test_task_weights_are_applied_and_checked(schema) -> None:
    batch = random_batch(schema, 4, seed=9)
    loss_1, out = make_model(schema, loss_average="task")(batch)
    loss_w, _ = make_model(schema, task_weights={"sc0/click": 3.0}, loss_average="task")(batch)
    parts = {k[5:]: v for k, v in out.items() if k.startswith("loss/")}
    expected = (sum(parts.values()) + 2.0 * parts["sc0/click"]) / (len(parts) + 2.0)
    torch.testing.assert_close(loss_w, expected, rtol=1e-5, atol=1e-6)
    # per exposure: a weight w on a task counts each of its labels w times
    counts = {
        f"{s.name}/{t}": float(batch.label_mask[s.name][:, i].sum())
        for s in schema.scenarios
        for i, t in enumerate(s.tasks)
    }
    loss_e, _ = make_model(schema, task_weights={"sc0/click": 3.0})(batch)
    num = sum(parts[k] * counts[k] * (3.0 if k == "sc0/click" else 1.0) for k in parts)
    den = sum(counts[k] * (3.0 if k == "sc0/click" else 1.0) for k in parts)
    torch.testing.assert_close(loss_e, num / den, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loss_1, loss_w)
    with pytest.raises(ValueError, match="sc0/clicks"):
        make_model(schema, task_weights={"sc0/clicks": 2.0})


def test_conditional_towers_are_a_funnel_product() -> None:
    raw = torch.tensor([[0.3, -1.2, 2.0], [-4.0, 5.0, 0.0]])
    log_p, log_q = funnel_log_probs(raw, conditional=True)
    expected = torch.cumprod(torch.sigmoid(raw), dim=-1)
    torch.testing.assert_close(log_p.exp(), expected)
    torch.testing.assert_close(log_q.exp(), 1 - expected)


def test_sample_with_one_scenario_and_batch_independence(schema) -> None:
    """A sample with exposures in one scenario only; its scores do not depend on the batch."""
    model = make_model(schema)
    table = random_table(schema, 4, seq_len=(1, 6), exposures=(1, 3), seed=6, only_scenario={0: "sc2"})
    batch = collate(table, schema)
    assert batch.target_positions["sc0"].numel() > 0
    assert (batch.exposure_sample["sc0"] != 0).all() and (batch.exposure_sample["sc1"] != 0).all()
    alone = collate(table.slice(0, 1), schema)
    assert alone.target_positions["sc0"].numel() == 0
    with torch.no_grad():
        full = model(batch)[1]["sc2"][batch.exposure_sample["sc2"] == 0]
        loss, out = model(alone)
    torch.testing.assert_close(out["sc2"], full, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(loss) and out["sc0"].shape == (0, 1)


@pytest.mark.parametrize("k,p", [(0, 16), (16, 0)])
def test_extreme_stacks_build_and_run(schema, k: int, p: int) -> None:
    model = make_model(
        schema,
        d_model=16,
        num_heads=2,
        num_kv_heads=1,
        num_blocks=1,
        target_layers_per_block=k,
        full_layers_per_block=p,
    )
    kinds = model.dense.hta.kinds
    assert len(kinds) == 16 and kinds.count("target") == k
    loss, _ = model(random_batch(schema, 3, seed=1))
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_gqa_models_run(schema, num_kv_heads: int) -> None:
    loss, _ = make_model(schema, num_heads=4, num_kv_heads=num_kv_heads)(random_batch(schema, 3, seed=2))
    assert torch.isfinite(loss)


def test_gradients_reach_embeddings_and_every_dense_parameter(schema) -> None:
    model = make_model(schema).train()
    loss, _ = model(random_batch(schema, 6, seq_len=(2, 8), exposures=(2, 4), seed=3))
    loss.backward()
    for name, param in model.embedding_collection.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for name, param in model.dense.named_parameters():
        assert param.grad is not None, name


def test_feature_only_baseline_ignores_sequences(schema) -> None:
    model = make_model(schema, use_sequences=False)
    assert len(model.dense.tokenizer.sequence_mlps) == 0
    batch = random_batch(schema, 4, seq_len=(1, 6), seed=8)
    rows = [r for r, k in enumerate(batch.token_kind.tolist()) if k != TokenKind.TARGET]
    with torch.no_grad():
        a = model(batch)[1]
        b = model(perturb_tokens(batch, schema, rows))[1]
    for s in schema.scenarios:
        torch.testing.assert_close(a[s.name], b[s.name], rtol=0, atol=1e-7)
    with_seq = make_model(schema)
    with torch.no_grad():
        c = with_seq(batch)[1]
        d = with_seq(perturb_tokens(batch, schema, rows))[1]
    assert not torch.allclose(c["sc0"], d["sc0"])


def test_torchrec_pipeline_tracing_sees_embedding_collection_and_one_dense_leaf(schema) -> None:
    """TrainPipelineSparseDist's tracer: EC called on batch.sparse_features, the rest one leaf."""
    from torchrec.distributed.train_pipeline.tracing import Tracer

    model = make_model(schema)
    batch = random_batch(schema, 3, seed=5)
    graph = Tracer(leaf_modules=["embedding_collection", "dense"]).trace(model)
    calls = [n for n in graph.nodes if n.op == "call_module"]
    assert [n.target for n in calls] == ["embedding_collection", "dense"]
    (arg,) = calls[0].args  # getattr(batch, "sparse_features") on the placeholder
    assert arg.op == "call_function" and arg.args[0].op == "placeholder" and arg.args[1] == "sparse_features"
    traced = torch.fx.GraphModule(model, graph)
    with torch.no_grad():
        ref_loss, ref = model(batch)
        loss, out = traced(batch)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(out["sc1"], ref["sc1"])


@pytest.mark.parametrize("normalisation", ["visible", "segment"])
@pytest.mark.parametrize("use_sequences", [True, False])
@pytest.mark.parametrize("backend", ["reference", "prefix"])
def test_dense_forward_reads_no_tensor_value_on_the_host(
    schema, backend: str, use_sequences: bool, normalisation: str
) -> None:
    """The dense part runs on the meta device, where any .item()/.tolist()/data-dependent shape
    would raise: so it never synchronises with the device to learn a value."""

    model = make_model(
        schema, attention_backend=backend, use_sequences=use_sequences, attention_normalisation=normalisation
    )
    batch = random_batch(schema, 3, seed=4)
    loss, out = dense_forward_on_meta(model, batch)
    assert loss.device == torch.device("meta") and loss.shape == ()
    assert out["sc2"].shape == batch.labels["sc2"].shape


@pytest.mark.parametrize("backend", ["reference", "prefix"])
def test_bf16_autocast_runs_and_stays_close_to_fp32(schema, backend: str) -> None:
    model = make_model(schema, attention_backend=backend)
    batch = random_batch(schema, 3, seed=12)
    with torch.no_grad():
        ref_loss, ref = model(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, out = model(batch)
    loss.backward()
    assert loss.dtype == torch.float32 and out["sc1"].dtype == torch.float32
    torch.testing.assert_close(out["sc1"], ref["sc1"], rtol=0, atol=2e-2)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=2e-2)


def test_shared_embeddings_serve_every_listed_key_from_one_table(schema) -> None:
    keys = ["seq/orders/item", "seq/clicks_rt/item", "exp/sc0/item/item"]
    shared = dataclasses.replace(schema, shared_embeddings={"item": keys})
    model = make_model(shared)
    tables = {c.name: c for c in model.embedding_collection.embedding_configs()}
    assert tables["t__item"].feature_names == keys
    assert len(tables) == len(schema.sparse_feature_keys()) - len(keys) + 1
    batch = random_batch(shared, batch_size=3, seed=5)
    looked_up = model.embedding_collection(batch.sparse_features)
    weight = model.embedding_collection.embeddings["t__item"].weight
    for key in keys:  # each key reads the shared table's rows for its ids
        jt = looked_up[key]
        torch.testing.assert_close(jt.values(), weight[batch.sparse_features[key].values()])
