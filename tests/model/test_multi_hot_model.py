"""Multi-hot features in the models: the EmbeddingBagCollection's pooling on a hand-sized batch,
the pooled field in the scenario tokenizer (eq. 4), the fx-traced top level, the baselines'
wrapper, and a few training steps of MTFM through the Trainer on a raw dataset."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from model_helpers import small_config
from torch import nn

from mtfm_rec.data import sample_format as fmt
from mtfm_rec.data.batch import Batch, collate
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.model import MTFM
from mtfm_rec.model.config import MODEL_NAMES
from mtfm_rec.model.examples import demo_schema
from mtfm_rec.model.sparse_dense import SparseDenseModel
from mtfm_rec.model.tokenizer import compress_dense
from mtfm_rec.model.zoo import build_model

RAW_SCHEMA: Dict[str, Any] = {
    "name": "mhm",
    "time_unit": "s",
    "sequences": [{"name": "orders", "kind": "history", "max_len": 8, "features": {"item": 6}}],
    "scenarios": [
        {
            "name": "a",
            "item_features": {"item": 6, "genres": {"size": 5, "pooling": "mean"}},
            "dense_features": ["price"],
            "tasks": ["click"],
        },
        {"name": "b", "user_features": {"tags": {"size": 4, "pooling": "sum"}}, "tasks": ["click", "buy"]},
    ],
}
SCHEMA = DatasetSchema.from_dict(RAW_SCHEMA)
# Two samples. Bags in KJT order: a's exposures (s0: [1, 2, 4], [0]; s1: []), then b's (s0:
# [3, 3, 1]; s1: [], [0]); a key's bags for the other scenario's exposures are empty.
GENRES = [[[1, 2, 4], [0]], [[]]]
TAGS = [[[3, 3, 1]], [[], [0]]]


def _table() -> pa.Table:
    ints = pa.list_(pa.int64())
    cols: Dict[str, Any] = {
        fmt.USER_ID: [7, 8],
        fmt.WINDOW_START: [0, 0],
        fmt.WINDOW_END: [100, 100],
        fmt.seq_ts("orders"): [[1, 2], [3]],
        fmt.seq_feature("orders", "item"): [[1, 2], [5]],
        fmt.exp_ts("a"): [[10, 11], [15]],
        fmt.exp_request_id("a"): [[-1, -1], [-1]],
        fmt.exp_split("a"): pa.array([[-1, -1], [-1]], pa.list_(pa.int8())),
        fmt.exp_feature("a", "item", "item"): [[0, 3], [2]],
        fmt.exp_feature("a", "item", "genres"): pa.array(GENRES, pa.list_(ints)),
        fmt.exp_dense("a", "price"): pa.array([[1.0, 2.0], [0.5]], pa.list_(pa.float32())),
        fmt.exp_label("a", "click"): pa.array([[1, 0], [0]], pa.list_(pa.int8())),
        fmt.exp_ts("b"): [[12], [13, 16]],
        fmt.exp_request_id("b"): [[-1], [-1, -1]],
        fmt.exp_split("b"): pa.array([[-1], [-1, -1]], pa.list_(pa.int8())),
        fmt.exp_feature("b", "user", "tags"): pa.array(TAGS, pa.list_(ints)),
        fmt.exp_label("b", "click"): pa.array([[1], [0, 1]], pa.list_(pa.int8())),
        fmt.exp_label("b", "buy"): pa.array([[0], [0, 1]], pa.list_(pa.int8())),
    }
    return pa.table(cols).cast(fmt.arrow_schema(SCHEMA))


def _batch(genres: Optional[List[Any]] = None) -> Batch:
    table = _table()
    if genres is not None:
        column = pa.array(genres, pa.list_(pa.list_(pa.int64())))
        table = table.set_column(
            table.schema.get_field_index("exp/a/item/genres"), "exp/a/item/genres", column
        )
    return collate(table, SCHEMA)


def _model(seed: int = 0) -> MTFM:
    torch.manual_seed(seed)
    return MTFM(SCHEMA, small_config(time_frequencies=0)).eval()


def _table_weight(model: nn.Module, key: str) -> torch.Tensor:
    name = "t__" + key.replace("/", "__")
    return model.embedding_bag_collection.embedding_bags[name].weight.detach()


def test_pooled_bags_are_the_mean_or_sum_of_their_ids_rows() -> None:
    model = _model()
    batch = _batch()
    assert batch.bag_features.keys() == ["bag/a/item/genres", "bag/b/user/tags"]
    pooled = model.embedding_bag_collection(batch.bag_features).to_dict()
    w_genres = _table_weight(model, "bag/a/item/genres")
    w_tags = _table_weight(model, "bag/b/user/tags")
    assert w_genres.shape[0] == 6 and w_tags.shape[0] == 5  # declared size + 1 (the missing row)
    zero = torch.zeros(w_genres.shape[1])
    want_genres = [(w_genres[1] + w_genres[2] + w_genres[4]) / 3, w_genres[0], zero, zero, zero, zero]
    want_tags = [zero, zero, zero, 2 * w_tags[3] + w_tags[1], zero, w_tags[0]]
    torch.testing.assert_close(pooled["bag/a/item/genres"], torch.stack(want_genres))
    torch.testing.assert_close(pooled["bag/b/user/tags"], torch.stack(want_tags))


def test_scenario_tokens_read_the_pooled_field_beside_the_single_ids_and_dense() -> None:
    """X(0) of every T token is MLP_s(Emb(single ids) || pooled bags || compress(dense)) (eq. 4)."""
    model = _model()
    batch = _batch()
    tok = model.dense.tokenizer
    emb = model.embedding_collection(batch.sparse_features)
    pooled = model.embedding_bag_collection(batch.bag_features)
    with torch.no_grad():
        x = tok(emb, batch, batch.num_tokens, batch.target_positions, pooled)
    w_item = model.embedding_collection.embeddings["t__exp__a__item__item"].weight.detach()
    w_genres = _table_weight(model, "bag/a/item/genres")
    w_tags = _table_weight(model, "bag/b/user/tags")
    mean = torch.stack([(w_genres[1] + w_genres[2] + w_genres[4]) / 3, w_genres[0], torch.zeros(8)])
    inputs_a = torch.cat([w_item[[0, 3, 2]], mean, compress_dense(torch.tensor([[1.0], [2.0], [0.5]]))], 1)
    sums_b = torch.stack([2 * w_tags[3] + w_tags[1], torch.zeros(8), w_tags[0]])
    with torch.no_grad():
        torch.testing.assert_close(x[batch.target_positions["a"]], tok.scenario_mlps[0](inputs_a))
        torch.testing.assert_close(x[batch.target_positions["b"]], tok.scenario_mlps[1](sums_b))
    assert tok.scenario_mlps[0][0].in_features == 2 * 8 + 1


def test_the_flop_count_includes_the_pooled_fields_of_the_scenario_tokenizers() -> None:
    """``model_flops``' tokenizer count equals what FlopCounterMode sees in the tokenizer, whose
    scenario MLPs take one more e-wide input per multi-hot feature."""
    from torch.utils.flop_counter import FlopCounterMode

    from mtfm_rec.model.flops import model_flops

    model, batch = _model(), _batch()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(batch)
    measured = sum(counter.get_flop_counts()["MTFM.dense.tokenizer"].values())
    assert measured == model_flops(model.config, SCHEMA, batch).tokenizer > 0


def test_a_changed_bag_changes_its_exposure_alone() -> None:
    """A T token sees H, the earlier R and itself only: new genres of one exposure move its
    scores and no other exposure's."""
    model = _model()
    with torch.no_grad():
        _, ref = model(_batch())
        _, out = model(_batch([[[1, 2, 4], [3, 3]], [[]]]))
    assert not torch.allclose(out["a"][1], ref["a"][1])
    torch.testing.assert_close(out["a"][[0, 2]], ref["a"][[0, 2]])
    torch.testing.assert_close(out["b"], ref["b"])


def test_the_tokenizer_refuses_to_run_without_the_pooled_bags() -> None:
    model = _model()
    batch = _batch()
    emb = model.embedding_collection(batch.sparse_features)
    with pytest.raises(ValueError, match=r"multi-hot features \['bag/a/item/genres', 'bag/b/user/tags'\]"):
        model.dense(emb, batch)


def test_pipeline_tracing_sees_both_sharded_modules_on_batch_attributes() -> None:
    """TrainPipelineSparseDist's tracer: EC on batch.sparse_features, EBC on batch.bag_features."""
    from torchrec.distributed.train_pipeline.tracing import Tracer

    model = _model()
    batch = _batch()
    leaves = ["embedding_collection", "embedding_bag_collection", "dense"]
    graph = Tracer(leaf_modules=leaves).trace(model)
    calls = [n for n in graph.nodes if n.op == "call_module"]
    assert [n.target for n in calls] == leaves
    for call, attr in zip(calls[:2], ("sparse_features", "bag_features")):
        (arg,) = call.args
        assert arg.op == "call_function" and arg.args[0].op == "placeholder" and arg.args[1] == attr
    traced = torch.fx.GraphModule(model, graph)
    with torch.no_grad():
        ref_loss, ref = model(batch)
        loss, out = traced(batch)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(out["a"], ref["a"])


def test_a_schema_without_multi_hot_features_builds_no_bag_collection() -> None:
    model = MTFM(demo_schema(2), small_config())
    assert model.embedding_bag_collection is None
    assert not [k for k in model.state_dict() if "embedding_bag" in k]


class _BagDense(nn.Module):
    """A dense part that takes the pooled bags; returns their sum as the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Optional[Any] = None

    def forward(self, embeddings: Any, batch: Batch, bag_embeddings: Any = None) -> Tuple[torch.Tensor, Dict]:
        self.seen = bag_embeddings
        return bag_embeddings.values().sum(), {}


def test_the_top_level_hands_the_pooled_bags_to_its_dense_part() -> None:
    torch.manual_seed(0)
    model = SparseDenseModel(SCHEMA, small_config(), _BagDense)
    batch = _batch()
    model(batch)
    want = model.embedding_bag_collection(batch.bag_features)
    assert model.dense.seen.keys() == want.keys()
    torch.testing.assert_close(model.dense.seen.values(), want.values())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_of_the_zoo_reads_the_multi_hot_features(name: str) -> None:
    """The bag table gets a gradient through the loss: the pooled genres reach every model."""
    torch.manual_seed(0)
    model = build_model(SCHEMA, dataclasses.replace(small_config(), name=name))
    loss, _ = model(_batch())
    loss.backward()
    grads = [p.grad for p in model.embedding_bag_collection.parameters()]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), name


# ------------------------------------------------------------------------------ training
TAG_SIZE = 10  # tags 0..5 occur, 6..9 and the missing row 10 never do


def _write_raw(root: str, users: int = 48, seed: int = 0) -> None:
    """Scenario ``a``: click = 1 exactly when the exposure's tags hold 0 (a planted signal)."""
    rng = np.random.default_rng(seed)
    schema = {
        "name": "mh_train",
        "time_unit": "s",
        "sequences": [{"name": "orders", "kind": "history", "max_len": 4, "features": {"item": 6}}],
        "scenarios": [
            {
                "name": "a",
                "user_features": {"tags": {"size": TAG_SIZE, "pooling": "mean"}},
                "item_features": {"item": 6},
                "tasks": ["click"],
            }
        ],
    }
    n = users * 8
    tags = [[int(t) for t in rng.choice(6, size=rng.integers(1, 4), replace=False)] for _ in range(n)]
    exposures = pa.table(
        {
            "user_id": pa.array(np.arange(n) % users, pa.int64()),
            "ts": pa.array(1000 + rng.integers(0, 4 * 3600, n), pa.int64()),
            "item": pa.array(rng.integers(0, 6, n), pa.int64()),
            "tags": pa.array(tags, pa.list_(pa.int64())),
            "click": pa.array([int(0 in t) for t in tags], pa.int64()),
        }
    )
    orders = pa.table(
        {
            "user_id": pa.array(np.arange(users), pa.int64()),
            "ts": pa.array(np.zeros(users, np.int64) + 10),
            "item": pa.array(np.arange(users) % 6, pa.int64()),
        }
    )
    for folder, table in (("exposures/a", exposures), ("behaviors/orders", orders)):
        os.makedirs(f"{root}/{folder}")
        pq.write_table(table, f"{root}/{folder}/part-0.parquet")
    with open(f"{root}/dataset.yaml", "w") as fh:
        yaml.safe_dump(schema, fh, sort_keys=False)


def _tags_table(model: nn.Module) -> torch.Tensor:
    """The tags table of a one-rank DMP, assembled from its shards."""
    for key, value in model.state_dict().items():
        if key.endswith("embedding_bags.t__bag__a__user__tags.weight"):
            if hasattr(value, "local_shards"):
                full = torch.zeros(value.size())
                for shard in value.local_shards():
                    md = shard.metadata
                    index = tuple(slice(o, o + s) for o, s in zip(md.shard_offsets, md.shard_sizes))
                    full[index] = shard.tensor.detach().cpu()
                return full
            return value.detach().cpu().clone()
    raise KeyError("no tags table in the model's state")


def test_mtfm_with_a_multi_hot_feature_trains_through_the_trainer(tmp_path: Any) -> None:
    from mtfm_rec.config import load_config
    from mtfm_rec.training.trainer import Trainer

    raw = str(tmp_path / "raw")
    _write_raw(raw)
    quiet = ["train.progress_bar=false", "train.tensorboard=false", "train.plots=false"]
    model = [
        "model.embedding_dim=8",
        "model.d_model=16",
        "model.tokenizer_hidden=[16]",
        "model.num_blocks=1",
        "model.target_layers_per_block=1",
        "model.full_layers_per_block=1",
        "model.num_heads=2",
        "model.num_kv_heads=1",
        "model.num_experts=2",
        "model.expert_dim=8",
        "model.tower_dim=8",
    ]
    cfg = load_config(
        None,
        quiet
        + model
        + [
            f"data.raw={raw}",
            f"data.cache_dir={tmp_path}/cache",
            "data.aggregation.window_seconds=3600",
            "data.aggregation.num_workers=1",
            "data.loader.batch_size=8",
            "data.eval_after=999999999",
            f"train.run_dir={tmp_path}/run",
            "train.resume=never",
            "train.max_steps=12",
            "train.log_every=4",
            "train.eval_splits=[]",
            "train.sharding.print_plan=false",
        ],
    )
    trainer = Trainer(cfg)
    try:
        planned = {t for params in trainer.plan.plan.values() for t in params}
        assert "t__bag__a__user__tags" in planned  # DMP sharded the EBC beside the EC
        before = _tags_table(trainer.model)
        summary = trainer.fit()
        after = _tags_table(trainer.model)
    finally:
        trainer.close()
    assert summary["step"] == 12 and summary["samples_seen"] == 12 * 8  # fit refuses a non-finite loss
    changed = (after - before).abs().sum(dim=1) > 0
    assert changed[:6].all(), changed  # every tag that occurs was trained
    assert not changed[6:].any(), changed  # tags that never occur (and the missing row) were not
    assert math.isfinite(float(after.sum()))


def test_sharding_constraints_refuse_a_type_the_bag_collection_lacks_on_the_cpu() -> None:
    """TorchRec shards an EmbeddingBagCollection on the CPU without row_wise (an
    EmbeddingCollection has it): a global row_wise names the bag table and the way out."""
    from mtfm_rec.training.config import ShardingConfig
    from mtfm_rec.training.sharding import make_constraints

    model = _model()
    row_wise = ShardingConfig(sharding_types=["row_wise"])
    with pytest.raises(
        ValueError, match=r"table 't__bag__a__item__genres' \(EmbeddingBagCollection\) may only be"
    ):
        make_constraints(model, row_wise, "cpu")
    assert make_constraints(model, row_wise, "cuda")["t__bag__a__item__genres"].sharding_types == ["row_wise"]
    mixed = ShardingConfig(sharding_types=["row_wise"], table_sharding_types={"t__bag__*": ["table_wise"]})
    constraints = make_constraints(model, mixed, "cpu")
    assert constraints["t__bag__b__user__tags"].sharding_types == ["table_wise"]
    assert constraints["t__exp__a__item__item"].sharding_types == ["row_wise"]
