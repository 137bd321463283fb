"""Exactness of AUC / GAUC / logloss, across ranks and through predictions.parquet."""

from __future__ import annotations

import math
import os
import re
import sys
from typing import Dict, List

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from mtfm_rec.training.metrics import (
    MetricAccumulator,
    NonFiniteError,
    compute_key_metrics,
    metrics_from_predictions,
    read_metrics_json,
    write_metrics_json,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from processes import file_store, init_rank, spawn_ranks  # noqa: E402

KEYS = ["feed/click", "feed/like", "search/click"]


# ---------------------------------------------------------------- brute-force references
def brute_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score_pos > score_neg) + 0.5 P(equal), over all positive x negative pairs."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    wins = 0.0
    for p in pos:
        for n in neg:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (len(pos) * len(neg))


def brute_gauc(scores: np.ndarray, labels: np.ndarray, users: np.ndarray) -> float:
    num, den = 0.0, 0
    for u in set(users.tolist()):
        sel = users == u
        a = brute_auc(scores[sel], labels[sel])
        if not math.isnan(a):
            num += a * sel.sum()
            den += sel.sum()
    return num / den if den else float("nan")


def brute_logloss(scores: np.ndarray, labels: np.ndarray) -> float:
    total = 0.0
    for s, y in zip(scores.astype(np.float64), labels):
        p = min(max(s, 1e-7), 1 - 1e-7)
        total -= math.log(p) if y == 1 else math.log(1 - p)
    return total / len(scores)


def same(a: float, b: float, rel: float = 1e-12) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rel, abs=1e-12)


# ---------------------------------------------------------------- single-key exactness
rows = st.lists(
    st.tuples(
        st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]),  # few values: many ties
        st.integers(0, 1),
        st.integers(0, 4),
    ),
    min_size=0,
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(rows)
def test_matches_brute_force_with_ties(data: List) -> None:
    scores = np.array([r[0] for r in data], np.float32)
    labels = np.array([r[1] for r in data], np.int8)
    users = np.array([r[2] for r in data], np.int64)
    m = compute_key_metrics(scores, labels, users)
    assert m["count"] == len(data)
    if not data:
        assert math.isnan(m["auc"]) and math.isnan(m["gauc"]) and math.isnan(m["logloss"])
        return
    assert same(m["auc"], brute_auc(scores, labels))
    assert same(m["gauc"], brute_gauc(scores, labels, users))
    assert same(m["logloss"], brute_logloss(scores, labels), rel=1e-9)
    both = [u for u in set(users.tolist()) if len(set(labels[users == u].tolist())) == 2]
    assert m["gauc_users"] == len(both)


def test_known_values() -> None:
    # Positives {0.8, 0.4}, negatives {0.4, 0.1}: pairs 1 + 1 + 0.5 + 1 = 3.5 of 4.
    m = compute_key_metrics(np.array([0.8, 0.4, 0.4, 0.1]), np.array([1, 1, 0, 0]), np.array([7, 7, 8, 8]))
    assert m["auc"] == 0.875
    assert math.isnan(m["gauc"]) and m["gauc_users"] == 0  # each user has one class only


def test_row_order_does_not_change_any_bit() -> None:
    rng = np.random.default_rng(0)
    s = rng.random(500).astype(np.float32).round(2)
    y = (rng.random(500) < 0.3).astype(np.int8)
    u = rng.integers(0, 30, 500)
    perm = rng.permutation(500)
    assert compute_key_metrics(s, y, u) == compute_key_metrics(s[perm], y[perm], u[perm])


# ---------------------------------------------------------------- accumulator
def make_batches(seed: int, n_batches: int = 6) -> List[Dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        for scenario, tasks in (("feed", 2), ("search", 1)):
            n = int(torch.randint(0, 12, (1,), generator=g))
            out.append(
                {
                    "scenario": scenario,
                    "scores": (torch.randint(0, 20, (n, tasks), generator=g) / 19.0),
                    "labels": torch.randint(0, 2, (n, tasks), generator=g).float(),
                    "mask": torch.rand(n, tasks, generator=g) < 0.8,
                    "user_id": torch.randint(0, 6, (n,), generator=g),
                    "ts": torch.randint(0, 10**6, (n,), generator=g),
                }
            )
    return out


def feed(acc: MetricAccumulator, batches: List[Dict[str, torch.Tensor]]) -> None:
    for b in batches:
        acc.update(b["scenario"], b["scores"], b["labels"], b["mask"], b["user_id"], b["ts"])


def equal_metrics(a: Dict, b: Dict) -> bool:
    """Bit-exact equality, NaN equal to NaN."""
    if a.keys() != b.keys():
        return False
    return all(
        a[k].keys() == b[k].keys()
        and all(
            (isinstance(a[k][m], float) and math.isnan(a[k][m]) and math.isnan(b[k][m])) or a[k][m] == b[k][m]
            for m in a[k]
        )
        for k in a
    )


def test_masked_labels_ignored() -> None:
    acc = MetricAccumulator(["s/a", "s/b"], flush_every=2)
    scores = torch.tensor([[0.9, 0.9], [0.1, 0.1], [0.8, 0.2], [0.3, 0.7]])
    labels = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    mask = torch.tensor([[True, True], [True, True], [False, True], [False, True]])
    acc.update("s", scores, labels, mask, torch.tensor([1, 1, 2, 2]))
    m = acc.compute()
    assert m["s/a"]["count"] == 2 and m["s/a"]["auc"] == 1.0  # rows 2, 3 would make it < 1
    assert m["s/b"]["count"] == 4 and m["s/b"]["auc"] == 0.75
    ref = compute_key_metrics(np.array([0.9, 0.1]), np.array([1, 0]), np.array([1, 1]))
    assert equal_metrics({"s/a": m["s/a"]}, {"s/a": ref})


def test_accumulator_equals_direct_and_predictions_round_trip(tmp_path) -> None:
    batches = make_batches(1)
    acc = MetricAccumulator(KEYS + ["other/never"], save_predictions=True, flush_every=4)
    feed(acc, batches)
    path = str(tmp_path / "predictions.parquet")
    m = acc.compute(predictions_path=path)
    # Direct reference per key from the raw batches.
    for key in KEYS:
        scen, task = key.split("/")
        t = ["click", "like"].index(task)
        bs = [b for b in batches if b["scenario"] == scen]
        keep = torch.cat([b["mask"][:, t] for b in bs])
        s = torch.cat([b["scores"][:, t] for b in bs])[keep].numpy()
        y = torch.cat([b["labels"][:, t] for b in bs])[keep].numpy()
        u = torch.cat([b["user_id"] for b in bs])[keep].numpy()
        assert equal_metrics({key: m[key]}, {key: compute_key_metrics(s, y, u)})
    assert m["other/never"]["count"] == 0
    table = pq.read_table(path)
    assert table.column_names == ["scenario", "task", "user_id", "ts", "label", "score"]
    assert table.num_rows == sum(m[k]["count"] for k in m)
    assert set(table.column("ts").to_pylist()) <= set(torch.cat([b["ts"] for b in batches]).tolist())
    assert equal_metrics(metrics_from_predictions(path), m)
    assert equal_metrics(metrics_from_predictions(table.to_pandas(), keys=list(m)), m)
    write_metrics_json(str(tmp_path / "metrics.json"), m)
    assert equal_metrics(read_metrics_json(str(tmp_path / "metrics.json")), m)


# ---------------------------------------------------------------- 2 ranks
def _rank_main(rank: int, store: str, out_dir: str) -> None:
    init_rank(rank, 2, store)
    try:
        batches = make_batches(2)
        acc = MetricAccumulator(KEYS, save_predictions=True, flush_every=3)
        feed(acc, batches[rank::2])  # each rank holds half of the batches
        m = acc.compute(predictions_path=os.path.join(out_dir, "predictions.parquet"))
        torch.save(m, os.path.join(out_dir, f"metrics_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_single_process(tmp_path) -> None:
    spawn_ranks(_rank_main, (file_store(tmp_path), str(tmp_path)))
    single = MetricAccumulator(KEYS)
    feed(single, make_batches(2))
    expected = single.compute()
    for rank in range(2):  # every rank gets the same, exact, all-data metrics
        assert equal_metrics(torch.load(tmp_path / f"metrics_{rank}.pt"), expected)
    assert equal_metrics(metrics_from_predictions(str(tmp_path / "predictions.parquet")), expected)
    # The exact value is not what averaging per-rank AUCs would give on this data.
    halves = []
    for r in range(2):
        acc = MetricAccumulator(KEYS)
        feed(acc, make_batches(2)[r::2])
        halves.append(acc.compute())
    assert any((halves[0][k]["auc"] + halves[1][k]["auc"]) / 2 != expected[k]["auc"] for k in KEYS)


# ---------------------------------------------------------------- non-finite values
def test_non_finite_scores_or_labels_are_refused_not_ranked() -> None:
    # NaN scores used to rank as ties (a diverged model's AUC read 1.0 or 0.5)
    with pytest.raises(
        NonFiniteError, match=r"scenario/task \(unnamed\): 2 of 3 scores and 0 labels not finite"
    ):
        compute_key_metrics(np.array([np.nan, 0.5, np.inf]), np.array([1, 0, 1]), np.array([1, 1, 2]))
    with pytest.raises(
        NonFiniteError, match=r"scenario/task feed/click: 0 of 2 scores and 1 labels not finite"
    ):
        compute_key_metrics(np.array([0.1, 0.5]), np.array([np.nan, 1.0]), np.array([1, 1]), key="feed/click")


def test_accumulator_refuses_non_finite_values_and_writes_no_predictions(tmp_path) -> None:
    scores = torch.tensor([[0.9, float("nan")], [0.1, 0.2], [0.8, float("inf")]])
    labels = torch.tensor([[1.0, 1.0], [0.0, float("nan")], [float("nan"), 0.0]])
    mask = torch.tensor([[True, True], [True, True], [False, True]])  # row 2's NaN label is masked out
    acc = MetricAccumulator(["s/a", "s/b", "t/c"], save_predictions=True)
    acc.update("s", scores, labels, mask, torch.tensor([1, 1, 2]))
    acc.update("t", torch.tensor([[0.3]]), torch.tensor([[1.0]]), torch.tensor([[True]]), torch.tensor([3]))
    path = tmp_path / "predictions.parquet"
    with pytest.raises(NonFiniteError) as info:
        acc.compute(predictions_path=str(path))
    assert str(info.value) == (
        "AUC/GAUC/logloss are not computed over NaN or infinite values: "
        "scenario/task s/b: 2 of 3 scores and 1 labels not finite"
    )
    assert not path.exists()


def test_predictions_with_a_null_or_nan_score_are_refused(tmp_path) -> None:
    import pyarrow as pa

    table = pa.table(
        {
            "scenario": ["s", "s", "s"],
            "task": ["a", "a", "a"],
            "user_id": [1, 1, 2],
            "ts": [0, 0, 0],
            "label": pa.array([1, 0, 1], pa.int8()),
            "score": pa.array([0.5, None, float("nan")], pa.float32()),
        }
    )
    with pytest.raises(NonFiniteError, match=r"scenario/task s/a: 2 of 3 scores"):
        metrics_from_predictions(table)


def _nan_rank_main(rank: int, store: str, out_dir: str, mode: str = "nan") -> None:
    init_rank(rank, 2, store)
    try:
        acc = MetricAccumulator(KEYS)
        batches = make_batches(3)[rank::2]  # rank 0: the feed batches, rank 1: the search ones
        if rank == 1 and mode == "nan":  # only rank 1 diverged
            for batch in batches:
                batch["scores"][:] = float("nan")
        feed(acc, batches)
        # mode "unwritable": rank 0 cannot write the predictions (a folder stands at that path)
        target = os.path.join(out_dir, "taken") if mode == "unwritable" else None
        if target is not None:
            os.makedirs(target, exist_ok=True)
        try:
            acc.compute(predictions_path=target)
            result = "computed"
        except Exception as exc:  # noqa: BLE001 - the class is what the test checks
            result = f"{type(exc).__name__}: {exc}"
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as fh:
            fh.write(result)
    finally:
        dist.destroy_process_group()


def test_non_finite_scores_on_one_rank_raise_on_every_rank(tmp_path) -> None:
    args = (file_store(tmp_path), str(tmp_path))
    spawn_ranks(_nan_rank_main, args)
    texts = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert texts[0] == texts[1]
    bad = re.fullmatch(
        r"NonFiniteError: AUC/GAUC/logloss are not computed over NaN or infinite values: "
        r"scenario/task search/click: (\d+) of (\d+) scores and 0 labels not finite",
        texts[0],
    )
    assert bad is not None and bad.group(1) == bad.group(2) != "0", texts[0]


def test_a_rank_0_failure_keeps_its_type_there_and_reaches_the_other_ranks(tmp_path) -> None:
    args = (file_store(tmp_path), str(tmp_path), "unwritable")
    spawn_ranks(_nan_rank_main, args)
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text() for r in range(2))
    name = rank0.split(":", 1)[0]
    assert name not in ("computed", "RuntimeError"), rank0  # rank 0: the original exception
    assert rank1.startswith(f"RuntimeError: computing metrics failed on rank 0: {name}: "), rank1
