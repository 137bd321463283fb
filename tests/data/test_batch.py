"""collate(): token layout, positions, KJT contents, labels, exposure_keep, Pipelineable."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow as pa
import pytest
import torch

from mtfm_rec.data import sample_format as fmt
from mtfm_rec.data.batch import Batch, collate
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.kernels.jagged import TokenKind

SCHEMA = DatasetSchema.from_dict(
    {
        "name": "batch_test",
        "sequences": [
            {"name": "rt", "kind": "realtime", "max_len": 4, "features": {"item": 9}},
            {"name": "h1", "kind": "history", "max_len": 4, "features": {"item": 9, "cat": 3}},
            {"name": "h2", "kind": "history", "max_len": 4, "features": {"item": 9}},
        ],
        "scenarios": [
            {
                "name": "a",
                "user_features": {"city": 5},
                "item_features": {"shop": 7},
                "dense_features": ["d0", "d1"],
                "tasks": ["click", "order"],
            },
            {"name": "b", "item_features": {"poi": 6}, "tasks": ["click"]},
        ],
    }
)

# Three samples; sample 2 is empty (null lists for scenario b).
SEQ_TS = {"h1": [[1, 5], [2], []], "h2": [[3], [2, 4], []], "rt": [[10, 20], [], []]}
EXP_TS = {"a": [[100, 110], [], []], "b": [[105], [200, 201, 202], None]}


def rows_of(n: Optional[list], fill: Any) -> Optional[list]:
    return None if n is None else [fill(i) for i in range(len(n))]


def make_table() -> pa.Table:
    cols: Dict[str, List[Any]] = {
        fmt.USER_ID: [7, 8, 9],
        fmt.WINDOW_START: [90, 190, 290],
        fmt.WINDOW_END: [190, 290, 390],
    }
    for q in SCHEMA.sequences:
        cols[fmt.seq_ts(q.name)] = SEQ_TS[q.name]
        for k, f in enumerate(q.features):
            # value encodes (sequence feature k, ts) so tests can check where it went
            cols[fmt.seq_feature(q.name, f)] = [[t + 1000 * k for t in ts] for ts in SEQ_TS[q.name]]
    for s in SCHEMA.scenarios:
        ts_rows = EXP_TS[s.name]
        cols[fmt.exp_ts(s.name)] = ts_rows
        # scenario b's rows carry request ids (ts + 5000), a's none (-1)
        ids = [None if r is None else [t + 5000 if s.name == "b" else -1 for t in r] for r in ts_rows]
        cols[fmt.exp_request_id(s.name)] = ids
        cols[fmt.exp_split(s.name)] = [rows_of(r, lambda i: -1) for r in ts_rows]
        for k, (g, c, _) in enumerate(s.categorical()):
            cols[fmt.exp_feature(s.name, g, c)] = [
                None if r is None else [t + 1000 * k for t in r] for r in ts_rows
            ]
        for k, c in enumerate(s.dense_features):
            cols[fmt.exp_dense(s.name, c)] = [None if r is None else [t / 10 + k for t in r] for r in ts_rows]
    cols[fmt.exp_label("a", "click")] = [[1, 0], [], []]
    cols[fmt.exp_label("a", "order")] = [[1, -1], [], []]
    cols[fmt.exp_label("b", "click")] = [[-1], [0, 1, 1], None]
    schema = fmt.arrow_schema(SCHEMA)
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in schema}, schema=schema)


@pytest.fixture(scope="module")
def batch() -> Batch:
    return collate(make_table(), SCHEMA)


def test_token_layout(batch: Batch) -> None:
    # sample 0: H = h1@1 h2@3 h1@5, R = 10 20, T = a@100 a@110 b@105
    # sample 1: H = h1@2 h2@2 h2@4 (tie: sequence order), T = b@200 b@201 b@202; sample 2 empty
    assert batch.batch_size == 3
    assert batch.token_offsets.tolist() == [0, 8, 14, 14]
    assert batch.num_history.tolist() == [3, 3, 0]
    assert batch.num_realtime.tolist() == [2, 0, 0]
    assert batch.num_targets.tolist() == [3, 3, 0]
    assert (batch.num_tokens, batch.max_tokens, batch.max_targets) == (14, 8, 3)
    assert batch.token_ts.tolist() == [1, 3, 5, 10, 20, 100, 110, 105, 2, 2, 4, 200, 201, 202]
    h, r, t = TokenKind.HISTORY, TokenKind.REALTIME, TokenKind.TARGET
    assert batch.token_kind.tolist() == [h, h, h, r, r, t, t, t, h, h, h, t, t, t]
    assert batch.token_kind.dtype == torch.int8
    g = {n: i for i, n in enumerate(SCHEMA.token_groups)}
    h1, h2, rt, a, b = g["seq/h1"], g["seq/h2"], g["seq/rt"], g["exp/a"], g["exp/b"]
    assert batch.token_group.tolist() == [h1, h2, h1, rt, rt, a, a, b, h1, h2, h2, b, b, b]


def test_positions(batch: Batch) -> None:
    assert batch.sequence_positions["h1"].tolist() == [0, 2, 8]
    assert batch.sequence_positions["h2"].tolist() == [1, 9, 10]
    assert batch.sequence_positions["rt"].tolist() == [3, 4]
    assert batch.target_positions["a"].tolist() == [5, 6]
    assert batch.target_positions["b"].tolist() == [7, 11, 12, 13]
    assert batch.exposure_sample["a"].tolist() == [0, 0]
    assert batch.exposure_sample["b"].tolist() == [0, 1, 1, 1]
    assert batch.target_offsets.tolist() == [0, 3, 6, 6]
    assert batch.target_rows.tolist() == [5, 6, 7, 11, 12, 13]
    # every position points at a token with its own timestamp
    for q, ts in SEQ_TS.items():
        flat = [t for row in ts for t in row]
        assert batch.token_ts[batch.sequence_positions[q]].tolist() == flat


def test_kjt_contents(batch: Batch) -> None:
    kjt = batch.sparse_features
    assert kjt.keys() == SCHEMA.sparse_feature_keys()
    jt = kjt.to_dict()
    assert jt["seq/h1/item"].lengths().tolist() == [2, 1, 0]
    assert jt["seq/h1/item"].values().tolist() == [1, 5, 2]
    assert jt["seq/h1/cat"].values().tolist() == [1001, 1005, 1002]
    assert jt["seq/rt/item"].lengths().tolist() == [2, 0, 0]
    assert jt["exp/a/user/city"].values().tolist() == [100, 110]
    assert jt["exp/a/item/shop"].values().tolist() == [1100, 1110]
    assert jt["exp/b/item/poi"].lengths().tolist() == [1, 3, 0]  # a null list is empty
    assert jt["exp/b/item/poi"].values().tolist() == [105, 200, 201, 202]
    assert kjt.values().dtype == torch.int64


def test_labels_dense_and_mask(batch: Batch) -> None:
    assert batch.labels["a"].tolist() == [[1.0, 1.0], [0.0, 0.0]]  # missing -> 0, masked
    assert batch.label_mask["a"].tolist() == [[True, True], [True, False]]
    assert batch.labels["b"].tolist() == [[0.0], [0.0], [1.0], [1.0]]
    assert batch.label_mask["b"].tolist() == [[False], [True], [True], [True]]
    expected = torch.tensor([[10.0, 11.0], [11.0, 12.0]])
    torch.testing.assert_close(batch.dense_features["a"], expected)
    assert batch.dense_features["b"].shape == (4, 0)
    assert batch.user_id.tolist() == [7, 8, 9] and batch.window_start.tolist() == [90, 190, 290]


def test_exposure_keep_drops_exposures() -> None:
    keep = {"a": np.array([False, True]), "b": np.array([True, True, False, True])}
    out = collate(make_table(), SCHEMA, exposure_keep=keep)
    assert out.num_targets.tolist() == [2, 2, 0]
    assert out.token_offsets.tolist() == [0, 7, 12, 12]
    assert out.target_positions["a"].tolist() == [5]
    assert out.target_positions["b"].tolist() == [6, 10, 11]
    assert out.token_ts[out.target_rows].tolist() == [110, 105, 200, 202]
    jt = out.sparse_features.to_dict()
    assert jt["exp/a/item/shop"].lengths().tolist() == [1, 0, 0]
    assert jt["exp/a/item/shop"].values().tolist() == [1110]
    assert jt["exp/b/item/poi"].values().tolist() == [105, 200, 202]
    assert out.labels["a"].tolist() == [[0.0, 0.0]]
    assert out.label_mask["a"].tolist() == [[True, False]]
    torch.testing.assert_close(out.dense_features["a"], torch.tensor([[11.0, 12.0]]))
    assert out.exposure_sample["b"].tolist() == [0, 1, 1]
    assert out.request_id["b"].tolist() == [5105, 5200, 5202] and out.request_id["a"].tolist() == [-1]
    # sequences are untouched
    assert out.sequence_positions["h2"].tolist() == [1, 8, 9]


def _assert_same(x: Batch, y: Batch) -> None:
    tensors = ("token_offsets", "token_ts", "token_kind", "token_group", "target_rows", "user_id")
    for name in tensors:
        assert torch.equal(getattr(x, name), getattr(y, name)), name
    dicts = ("sequence_positions", "target_positions", "labels", "label_mask", "dense_features", "request_id")
    for name in dicts:
        a, b = getattr(x, name), getattr(y, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert x.sparse_features.keys() == y.sparse_features.keys()
    assert torch.equal(x.sparse_features.values(), y.sparse_features.values())
    assert torch.equal(x.sparse_features.lengths(), y.sparse_features.lengths())
    assert (x.batch_size, x.num_tokens, x.max_tokens) == (y.batch_size, y.num_tokens, y.max_tokens)


def test_pipelineable_round_trip(batch: Batch) -> None:
    moved = batch.to(torch.device("cpu"), non_blocking=True)
    assert moved is not batch
    _assert_same(moved, batch)
    if torch.cuda.is_available():
        pinned = batch.pin_memory()
        assert pinned.token_ts.is_pinned() and pinned.sparse_features.values().is_pinned()
        _assert_same(pinned, batch)
        on_gpu = pinned.to(torch.device("cuda"), non_blocking=True)
        assert on_gpu.labels["a"].is_cuda
        _assert_same(on_gpu.to(torch.device("cpu")), batch)


def test_empty_table() -> None:
    out = collate(make_table().slice(2, 1), SCHEMA)
    assert out.batch_size == 1 and out.num_tokens == 0
    assert out.token_offsets.tolist() == [0, 0] and out.target_rows.numel() == 0
    assert out.labels["a"].shape == (0, 2)
