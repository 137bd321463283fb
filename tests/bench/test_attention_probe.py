"""The attention probe: its weights are the layer's own pointwise attention, its groups the batch's ids."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtfm_rec.bench.attention_probe import _weights, candidate_categories, probe, token_categories
from mtfm_rec.kernels.jagged import TokenKind
from mtfm_rec.model import MTFM, ModelConfig
from mtfm_rec.model.attention import TargetAttentionLayer
from mtfm_rec.model.examples import demo_schema, random_batch

FEATURE = "cat"  # demo_schema's category: in orders, clicks_rt and the items of scenarios 0 and 2


def _model(schema, attention_normalisation: str = "visible"):
    torch.manual_seed(0)
    cfg = ModelConfig(
        embedding_dim=8,
        d_model=32,
        tokenizer_hidden=[32],
        num_blocks=1,
        target_layers_per_block=2,
        full_layers_per_block=1,
        num_heads=4,
        num_kv_heads=2,
        num_experts=2,
        expert_dim=16,
        tower_dim=8,
        attention_normalisation=attention_normalisation,
    )
    return MTFM(schema, cfg).eval()


def test_ids_land_on_their_token_rows() -> None:
    schema = demo_schema()
    batch = random_batch(schema, 3, seed=2)
    keys, cands = token_categories(batch, FEATURE), candidate_categories(batch, FEATURE)
    jt = batch.sparse_features.to_dict()
    assert torch.equal(keys[batch.sequence_positions["orders"]], jt[f"seq/orders/{FEATURE}"].values())
    assert (keys[batch.sequence_positions["views"]] == -1).all()  # views has no category
    assert (keys[batch.token_kind.to(torch.int64) == TokenKind.TARGET] == -1).all()
    assert torch.equal(cands[batch.target_positions["sc0"]], jt[f"exp/sc0/item/{FEATURE}"].values())
    assert (cands[batch.target_positions["sc1"]] == -1).all()  # sc1's items have no category
    assert (cands[batch.token_kind.to(torch.int64) != TokenKind.TARGET] == -1).all()


@pytest.mark.parametrize("normalisation", ["visible", "segment"])
def test_weights_match_a_per_query_loop(normalisation: str) -> None:
    schema = demo_schema()
    model = _model(schema, normalisation)
    batch = random_batch(schema, 3, seed=4)
    layer = next(m for m in model.dense.hta.layers if isinstance(m, TargetAttentionLayer))
    captured = {}
    layer.register_forward_pre_hook(lambda m, a: captured.setdefault("args", a))
    with torch.no_grad():
        model(batch)
        x, layout = captured["args"]
        w, key_rows = _weights(layer, x, layout)
        x_norm = layer._norm_in(x, layout.token_group, "reference")
        k, _ = layer._kv(x_norm, layout.keys.ts)
        rows = layout.target_rows
        _, q = layer._uq(x_norm[rows], layout.target.ts, layout.token_group[rows])
    r = layer.num_heads // layer.num_kv_heads
    for t in range(len(layout.target_rows)):
        b = int(torch.searchsorted(layout.target.offsets, torch.tensor(t), right=True)) - 1
        start, prefix, own = (
            int(layout.keys.offsets[b]),
            int(layout.target.prefix[t]),
            int(layout.target.self_local[t]),
        )
        visible = list(range(prefix)) + ([own] if own >= prefix else [])
        kinds = [int(layout.keys.kind[start + j]) for j in visible]
        expected = torch.zeros(layout.keys.max_len)
        for j, kind in zip(visible, kinds):
            # segment: a key over the visible keys of its own segment (history, or the rest)
            same = [c for c in kinds if (c == TokenKind.HISTORY) == (kind == TokenKind.HISTORY)]
            count = len(same) if normalisation == "segment" else len(visible)
            per_head = [F.silu(layer.alpha * q[t, h] @ k[start + j, h // r]) for h in range(layer.num_heads)]
            expected[j] = torch.stack(per_head).mean() / count
        torch.testing.assert_close(w[t], expected, rtol=1e-4, atol=1e-6)
        assert sorted(int(v) - start for v in key_rows[t] if v >= 0) == sorted(visible)


def test_probe_reports_every_layer_scenario_and_kind() -> None:
    schema = demo_schema()
    model = _model(schema)
    result = probe(model, [random_batch(schema, 4, seed=s) for s in (5, 6)], feature=FEATURE)
    layers = {k.split("/")[0] for k in result}
    assert layers == {"layer0", "layer1"}  # two target layers
    for layer in layers:
        for scenario in ("sc0", "sc2"):  # the scenarios whose items have the feature
            for kind in ("H", "R"):
                for tag in ("same", "other"):
                    value = result[f"{layer}/{scenario}/{kind}/{tag}"]
                    assert math.isfinite(value), (layer, scenario, kind, tag, result)
    assert not any(k.split("/")[1] == "sc1" and math.isfinite(v) for k, v in result.items())
