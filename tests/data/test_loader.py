"""The sharded, shuffling, resumable loader: no overlap, no loss, equal steps, exact resume."""

from __future__ import annotations

import collections
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mtfm_rec.data import sample_format as fmt
from mtfm_rec.data.batch import Batch, collate
from mtfm_rec.data.config import DataConfig, LoaderConfig
from mtfm_rec.data.errors import LoaderError
from mtfm_rec.data.loader import ResumableLoader, build_dataloader
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.data.sharded_dataset import ShardedBatchDataset, consumed_per_stream, shuffle_buffer_order
from mtfm_rec.data.splits import exposure_split

SCHEMA = DatasetSchema.from_dict(
    {
        "name": "loader_test",
        "time_unit": "s",
        "sequences": [
            {"name": "hist", "kind": "history", "max_len": 8, "features": {"item": 50, "cat": 5}},
            {"name": "rt", "kind": "realtime", "max_len": 4, "features": {"item": 50}},
        ],
        "scenarios": [
            {
                "name": "a",
                "user_features": {"city": 4},
                "item_features": {"shop": 20},
                "dense_features": ["d0"],
                "tasks": ["click", "order"],
            },
            {
                "name": "b",
                "item_features": {"poi": 30},
                "cross_features": {"dist": 3},
                "tasks": ["click"],
            },
        ],
    }
)


def make_table(user_ids: Sequence[int], seed: int = 0, explicit_split: bool = False) -> pa.Table:
    """Aggregated rows with random shapes; user_id is unique and identifies the sample.

    Windows are ``[1000 + 100 k, 1100 + 100 k)`` for ``k = user_id % 7``; every row has at least
    one exposure. With ``explicit_split`` about a third of the exposures carry a split value.
    """
    rng = np.random.default_rng(seed)
    cols: Dict[str, list] = collections.defaultdict(list)
    for uid in user_ids:
        start = 1000 + 100 * (uid % 7)
        cols[fmt.USER_ID].append(uid)
        cols[fmt.WINDOW_START].append(start)
        cols[fmt.WINDOW_END].append(start + 100)
        for q in SCHEMA.sequences:
            n = int(rng.integers(0, 4))
            cols[fmt.seq_ts(q.name)].append(sorted(rng.integers(0, start + 100, n).tolist()))
            for f, size in q.features.items():
                cols[fmt.seq_feature(q.name, f)].append(rng.integers(0, size, n).tolist())
        counts = {"a": int(rng.integers(0, 4)), "b": int(rng.integers(0, 3))}
        if counts["a"] + counts["b"] == 0:
            counts["a"] = 1
        for s in SCHEMA.scenarios:
            n = counts[s.name]
            cols[fmt.exp_ts(s.name)].append(sorted(rng.integers(start, start + 100, n).tolist()))
            cols[fmt.exp_request_id(s.name)].append([-1] * n)
            split = rng.integers(-1, 3, n) if explicit_split else np.full(n, -1)
            cols[fmt.exp_split(s.name)].append(np.where(rng.random(n) < 0.5, -1, split).tolist())
            for g, c, size in s.categorical():
                cols[fmt.exp_feature(s.name, g, c)].append(rng.integers(0, size, n).tolist())
            for c in s.dense_features:
                cols[fmt.exp_dense(s.name, c)].append(rng.random(n).astype(np.float32).tolist())
            for t in s.tasks:
                cols[fmt.exp_label(s.name, t)].append(rng.integers(0, 2, n).tolist())
    schema = fmt.arrow_schema(SCHEMA)
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in schema}, schema=schema)


def write_dataset(
    root: str, shard_rows: Sequence[int], row_group_size: int = 5, explicit_split: bool = False
) -> List[int]:
    """Writes shards of the given sizes (+ dataset.yaml, a _SUCCESS listing the shards as the
    aggregation writes it); returns all user ids."""
    os.makedirs(root, exist_ok=True)
    uid = 0
    shards = []
    for part, n in enumerate(shard_rows):
        table = make_table(range(uid, uid + n), seed=part, explicit_split=explicit_split)
        path = os.path.join(root, fmt.shard_name(part))
        pq.write_table(table, path, row_group_size=row_group_size)
        shards.append(fmt.shard_entry(fmt.shard_name(part), n, os.path.getsize(path)))
        uid += n
    with open(os.path.join(root, fmt.SCHEMA_FILE), "w") as fh:
        fh.write(SCHEMA.to_yaml())
    with open(os.path.join(root, fmt.SUCCESS_FILE), "w") as fh:
        json.dump(fmt.success_record(shards, fingerprint="test"), fh)
    return list(range(uid))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("agg"))
    write_dataset(root, [23, 17, 11, 9], row_group_size=6)  # 60 samples, 11 row groups
    return root


def loader(path: str, workers: int = 0, **kwargs: Any) -> ResumableLoader:
    kwargs.setdefault("batch_size", 4)
    return ResumableLoader(ShardedBatchDataset(path, **kwargs), num_workers=workers)


def real_ids(batch: Batch) -> List[int]:
    """User ids of the samples that count (at least one present label)."""
    counts = torch.zeros(batch.batch_size, dtype=torch.bool)
    for s, mask in batch.label_mask.items():
        counts[batch.exposure_sample[s][mask.any(dim=1)]] = True
    return batch.user_id[counts].tolist()


def pad_count(batch: Batch) -> int:
    return batch.batch_size - len(real_ids(batch))


def epoch_ids(ld: ResumableLoader) -> List[List[int]]:
    return [b.user_id.tolist() for b in ld]


# -------------------------------------------------------------------- pure helpers
def test_shuffle_buffer_order_is_a_bounded_permutation() -> None:
    for n, k in ((1, 8), (10, 1), (50, 7), (100, 200)):
        order = shuffle_buffer_order(n, k, np.random.default_rng(3))
        assert sorted(order.tolist()) == list(range(n))
        # output j never comes from an input the buffer has not reached yet
        assert (order <= np.arange(n) + max(k, 1)).all()
    a = shuffle_buffer_order(100, 16, np.random.default_rng(1))
    assert (a == shuffle_buffer_order(100, 16, np.random.default_rng(1))).all()
    assert (a != np.arange(100)).any()


def test_consumed_per_stream_matches_round_robin() -> None:
    for w in (1, 2, 3):
        for c in range(10):
            expected = [sum(1 for i in range(c) if i % w == s) for s in range(w)]
            assert consumed_per_stream(c, w) == expected


def test_exposure_split_rules() -> None:
    ts = np.array([5, 10, 15, 20, 25])
    raw = np.array([-1, -1, -1, 0, -1], np.int8)
    assert exposure_split(ts, raw, 20, 10).tolist() == [0, 1, 1, 0, 2]
    assert exposure_split(ts, raw, None, None).tolist() == [0, 0, 0, 0, 0]
    explicit = np.array([2, 1, -1, -1, 0], np.int8)
    assert exposure_split(ts, explicit, 20, None).tolist() == [2, 1, 0, 2, 0]


# -------------------------------------------------------------------- ranks and workers
@pytest.mark.parametrize("pad", [False, True])
def test_stream_plans_partition_the_epoch(data_dir: str, pad: bool) -> None:
    """Index level, many shapes: streams of all ranks never overlap and (padded) cover all."""
    ds = ShardedBatchDataset(data_dir, 1, split="all", pad_to_equal_batches=pad)
    for world in (1, 2, 3, 4, 7, 61):
        for batch_size in (1, 4, 7, 64):
            for streams in (1, 2, 3):
                seen: List[int] = []
                for rank in range(world):
                    ds.rank, ds.world_size, ds.batch_size = rank, world, batch_size
                    rank_total = 0
                    for w in range(streams):
                        plan, is_pad = ds.stream_plan(0, w, streams)
                        assert len(plan) % batch_size == 0
                        rank_total += len(plan)
                        seen += plan[~is_pad].tolist()
                    assert rank_total == ds.num_batches() * batch_size
                assert len(seen) == len(set(seen))
                if pad:
                    assert sorted(seen) == list(range(60))
                else:
                    assert len(seen) == world * ((60 // world) // batch_size) * batch_size


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_ranks_disjoint_union_equal_batches(data_dir: str, workers: int) -> None:
    per_rank = []
    for rank in range(3):
        ld = loader(
            data_dir, workers, split="all", rank=rank, world_size=3, batch_size=6, pad_to_equal_batches=True
        )
        batches = list(ld)
        assert len(batches) == ld.num_batches() == 4  # ceil(ceil(60 / 3) / 6)
        assert all(b.batch_size == 6 for b in batches)
        per_rank.append([u for b in batches for u in real_ids(b)])
    flat = [u for ids in per_rank for u in ids]
    assert len(flat) == len(set(flat)) == 60
    assert sorted(flat) == list(range(60))


def test_padding_samples_are_masked(data_dir: str) -> None:
    ld = loader(data_dir, split="all", rank=1, world_size=2, batch_size=8, pad_to_equal_batches=True)
    batches = list(ld)
    assert len(batches) == 4  # 30 real samples per rank -> 32 slots
    assert sum(pad_count(b) for b in batches) == 2
    last = batches[-1]
    pad_rows = [i for i, u in enumerate(last.user_id.tolist()) if u not in real_ids(last)]
    assert len(pad_rows) == 2
    for s in SCHEMA.scenarios:  # padding still carries exposures, only their labels are masked
        on_pad = torch.isin(last.exposure_sample[s.name], torch.tensor(pad_rows))
        assert not last.label_mask[s.name][on_pad].any()
    assert sum(int(last.num_targets[r]) for r in pad_rows) > 0


def test_padding_wraps_when_fewer_samples_than_slots(tmp_path: Any) -> None:
    root = str(tmp_path / "tiny")
    write_dataset(root, [2, 1], row_group_size=1)
    per_rank = []
    for rank in range(2):
        (batch,) = list(
            loader(root, split="all", rank=rank, world_size=2, batch_size=4, pad_to_equal_batches=True)
        )
        assert batch.batch_size == 4
        per_rank.append(real_ids(batch))
    assert sorted(per_rank[0] + per_rank[1]) == [0, 1, 2]
    assert len(loader(root, split="all", world_size=4, rank=3, batch_size=4)) == 0  # training


@pytest.mark.parametrize("world", [1, 3])
def test_train_mode_full_equal_batches_no_overlap(data_dir: str, world: int) -> None:
    seen: List[int] = []
    for rank in range(world):
        ld = loader(
            data_dir,
            2 if world == 1 else 0,
            split="all",
            rank=rank,
            world_size=world,
            batch_size=4,
            shuffle=True,
            shuffle_buffer=8,
        )
        batches = list(ld)
        assert len(batches) == ld.num_batches() == (60 // world) // 4
        assert all(b.batch_size == 4 and pad_count(b) == 0 for b in batches)
        seen += [u for b in batches for u in b.user_id.tolist()]
    assert len(seen) == len(set(seen)) == ((60 // world) // 4) * 4 * world


def test_two_workers_no_overlap_no_loss(data_dir: str) -> None:
    ld = loader(
        data_dir, 2, split="all", batch_size=7, pad_to_equal_batches=True, shuffle=True, shuffle_buffer=5
    )
    ids = [u for b in ld for u in real_ids(b)]
    assert sorted(ids) == list(range(60))


# -------------------------------------------------------------------- shuffling and epochs
def test_epochs_reshuffle_deterministically(data_dir: str) -> None:
    kwargs = dict(split="all", batch_size=4, shuffle=True, shuffle_buffer=16, seed=7)
    a, b = loader(data_dir, **kwargs), loader(data_dir, **kwargs)
    e0 = epoch_ids(a)
    assert a.epoch == 1 and a.batches_in_epoch == 0
    e1 = epoch_ids(a)
    assert e0 == epoch_ids(b)  # same seed and epoch: same order
    assert e0 != e1
    b.set_epoch(1)
    assert epoch_ids(b) == e1
    assert sorted(sum(e0, [])) == sorted(sum(e1, [])) == list(range(60))


def test_shuffle_off_reads_in_storage_order(data_dir: str) -> None:
    ids = sum(epoch_ids(loader(data_dir, split="all", batch_size=5, shuffle=False)), [])
    assert ids == list(range(60))


# -------------------------------------------------------------------- resume
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_exactly_the_rest(data_dir: str, workers: int) -> None:
    kwargs = dict(split="all", batch_size=3, shuffle=True, shuffle_buffer=10, seed=3)
    full = loader(data_dir, workers, **kwargs)
    reference = epoch_ids(full) + epoch_ids(full)  # two epochs, 20 batches each
    assert len(reference) == 40
    # stop points inside and at the end of epochs
    got = ids_with_restarts(lambda: loader(data_dir, workers, **kwargs), (5, 6, 19, 20, 33, 40), 20)
    assert got == reference


def ids_with_restarts(make: Callable[[], Any], stops: Sequence[int], per_epoch: int) -> List[List[int]]:
    """User ids of the batches up to ``stops[-1]``, from a fresh loader restored from the last
    one's state at every stop point; checks each saved position against the batches taken."""
    got: List[List[int]] = []
    state = make().state_dict()
    for stop in stops:
        ld = make()
        ld.load_state_dict(state)
        for batch in ld.iter_batches():
            got.append(batch.user_id.tolist())
            if len(got) == stop:
                break
        state = ld.state_dict()
        assert state["epoch"] * per_epoch + state["batches_in_epoch"] == stop
    return got


def test_resume_eval_mode_mid_epoch(data_dir: str) -> None:
    kwargs = dict(
        split="all",
        batch_size=4,
        rank=0,
        world_size=2,
        pad_to_equal_batches=True,
        shuffle=True,
        shuffle_buffer=6,
    )
    reference = epoch_ids(loader(data_dir, 2, **kwargs))
    first = loader(data_dir, 2, **kwargs)
    it = iter(first)
    head = [next(it).user_id.tolist() for _ in range(3)]
    rest = loader(data_dir, 2, **kwargs)
    rest.load_state_dict(first.state_dict())
    assert head + epoch_ids(rest) == reference


def test_state_mismatch_is_refused(data_dir: str) -> None:
    state = loader(data_dir, 0, split="all", batch_size=4).state_dict()
    assert state["stream_batches"] == [0]
    with pytest.raises(LoaderError, match="num_workers"):
        loader(data_dir, 2, split="all", batch_size=4).load_state_dict(state)
    with pytest.raises(LoaderError, match="batch_size"):
        loader(data_dir, 0, split="all", batch_size=5).load_state_dict(state)


# -------------------------------------------------------------------- splits
def expected_exposures(
    tables: List[pa.Table],
    keep_split: Optional[int],
    eval_after: int,
    valid_after: int,
    scenarios: Sequence[str] = (),
) -> Dict[int, int]:
    """user_id -> number of exposures of the split (None: all) of ``scenarios`` (empty: all),
    for samples that have any."""
    out: Dict[int, int] = {}
    for t in tables:
        for row in t.to_pylist():
            n = 0
            for s in SCHEMA.scenarios:
                if scenarios and s.name not in scenarios:
                    continue
                ts = np.array(row[fmt.exp_ts(s.name)], np.int64)
                raw = np.array(row[fmt.exp_split(s.name)], np.int8)
                split = exposure_split(ts, raw, eval_after, valid_after)
                n += len(ts) if keep_split is None else int((split == keep_split).sum())
            if n:
                out[row[fmt.USER_ID]] = n
    return out


@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_split_filtering(tmp_path: Any, split: str, explicit: bool) -> None:
    root = str(tmp_path / "agg")
    write_dataset(root, [20, 13], row_group_size=4, explicit_split=explicit)
    tables = [pq.read_table(os.path.join(root, fmt.shard_name(i))) for i in range(2)]
    eval_after, valid_after = 1500, 1300
    code = {"train": 0, "valid": 1, "test": 2}[split]
    expected = expected_exposures(tables, code, eval_after, valid_after)
    assert 0 < len(expected) < 33  # the split drops some samples entirely
    kwargs: Dict[str, Any] = dict(
        split=split,
        batch_size=2,
        eval_after=eval_after,
        valid_after=valid_after,
        pad_to_equal_batches=True,
        index_cache_dir=str(tmp_path / "cache"),
    )
    ld = loader(root, **kwargs)
    got: Dict[int, int] = {}
    for b in ld:
        for i, u in enumerate(b.user_id.tolist()):
            if u in real_ids(b):
                got[u] = int(b.num_targets[i])
        if not explicit:  # by time: every kept exposure is inside the split's time range
            t_ts = b.token_ts[b.target_rows]
            bounds = {0: (0, valid_after), 1: (valid_after, eval_after), 2: (eval_after, 10**9)}
            lo, hi = bounds[code]
            assert ((t_ts >= lo) & (t_ts < hi)).all()
    assert got == expected
    assert os.listdir(tmp_path / "cache")  # the pre-scan was cached
    again = loader(root, **kwargs)  # a second loader: served from the cache
    assert again.dataset.num_samples == len(expected)


@pytest.mark.parametrize("split", ["train", "all"])
def test_scenario_filter_serves_only_those_exposures(tmp_path: Any, split: str) -> None:
    root = str(tmp_path / "agg")
    write_dataset(root, [20, 13], row_group_size=4)
    tables = [pq.read_table(os.path.join(root, fmt.shard_name(i))) for i in range(2)]
    code = None if split == "all" else 0
    expected = expected_exposures(tables, code, 1500, 1300, scenarios=["b"])
    assert 0 < len(expected) < 33  # samples with no "b" exposure are dropped
    kwargs: Dict[str, Any] = dict(
        split=split, batch_size=2, eval_after=1500, valid_after=1300, pad_to_equal_batches=True
    )
    ld = loader(root, scenarios=["b"], index_cache_dir=str(tmp_path / "cache"), **kwargs)
    got: Dict[int, int] = {}
    for b in ld:
        assert b.labels["a"].shape[0] == 0  # the other scenario's exposures are gone
        for i, u in enumerate(b.user_id.tolist()):
            if u in real_ids(b):
                got[u] = int(b.num_targets[i])
    assert got == expected and ld.dataset.num_samples == len(expected)
    with pytest.raises(LoaderError, match="scenarios"):  # one scenario's position is not another's
        loader(root, **kwargs).load_state_dict(ld.state_dict())
    with pytest.raises(LoaderError, match=r"unknown scenario\(s\) \['c'\]; the dataset has \['a', 'b'\]"):
        loader(root, scenarios=["c"], **kwargs)


def test_missing_success_marker_is_refused(tmp_path: Any) -> None:
    root = str(tmp_path / "agg")
    write_dataset(root, [5])
    os.remove(os.path.join(root, fmt.SUCCESS_FILE))
    with pytest.raises(LoaderError, match="_SUCCESS"):
        ShardedBatchDataset(root, batch_size=2)


# -------------------------------------------------------------------- config + Pipelineable
def test_from_config_and_pipelineable(data_dir: str) -> None:
    cfg = LoaderConfig(batch_size=4, shuffle_buffer=8, num_workers=0)
    data = DataConfig(eval_after=1400, loader=cfg)
    train = ResumableLoader.from_config(data_dir, data, split="train")
    test = ResumableLoader.from_config(data_dir, data, split="test")
    assert train.dataset.shuffle and not train.dataset.pad_to_equal_batches
    assert test.dataset.pad_to_equal_batches and not test.dataset.shuffle
    batch = next(iter(train))
    moved = batch.to(torch.device("cpu"))
    assert torch.equal(moved.user_id, batch.user_id)
    assert moved.sparse_features.keys() == SCHEMA.sparse_feature_keys()
    assert torch.equal(moved.sparse_features.values(), batch.sparse_features.values())
    if torch.cuda.is_available():
        pinned = batch.pin_memory()
        assert pinned.token_ts.is_pinned() and pinned.labels["a"].is_pinned()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pin_memory needs CUDA")
def test_dataloader_pins_with_cuda(data_dir: str) -> None:
    ds = ShardedBatchDataset(data_dir, batch_size=4, split="all")
    batch = next(iter(build_dataloader(ds, num_workers=0)))
    assert batch.token_offsets.is_pinned()


def test_fsspec_url(data_dir: str) -> None:
    fs = fsspec.filesystem("memory")
    for name in os.listdir(data_dir):
        fs.put(os.path.join(data_dir, name), f"/loader_test/{name}")
    kwargs = dict(split="all", batch_size=4, shuffle=True, shuffle_buffer=8)
    remote = epoch_ids(loader("memory://loader_test", **kwargs))
    assert remote == epoch_ids(loader(data_dir, **kwargs))


def test_many_row_groups_compact_held_rows(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import mtfm_rec.data.sharded_dataset as dataset_mod

    calls = []
    real_compact = dataset_mod._compact
    monkeypatch.setattr(dataset_mod, "_compact", lambda *a: calls.append(1) or real_compact(*a))
    root = str(tmp_path / "many")
    write_dataset(root, [30, 10], row_group_size=1)  # 40 one-row units
    kwargs = dict(split="all", batch_size=4, shuffle=True, shuffle_buffer=40)
    batches = list(loader(root, **kwargs))
    assert calls  # more than _MAX_LIVE_CHUNKS row groups were held at once
    ids = [u for b in batches for u in b.user_id.tolist()]
    assert sorted(ids) == list(range(40))
    # contents: each batch equals collate() of the same rows read straight from the shards
    table = pa.concat_tables([pq.read_table(f"{root}/{fmt.shard_name(i)}") for i in (0, 1)])
    for b in batches:
        expected = collate(table.take(pa.array(b.user_id.numpy())), SCHEMA)
        assert torch.equal(b.sparse_features.values(), expected.sparse_features.values())
        assert torch.equal(b.sparse_features.lengths(), expected.sparse_features.lengths())
        assert torch.equal(b.token_ts, expected.token_ts)
        for k in expected.labels:
            assert torch.equal(b.labels[k], expected.labels[k])
            assert torch.equal(b.dense_features[k], expected.dense_features[k])
    half = loader(root, **kwargs)
    half.load_state_dict({**half.state_dict(), "batches_in_epoch": 5})
    assert epoch_ids(half) == [b.user_id.tolist() for b in batches[5:]]


def test_resharded_state_resumes_same_fraction(data_dir: str) -> None:
    saved = loader(data_dir, split="all", rank=0, world_size=2, batch_size=3).state_dict()
    saved.update(epoch=2, batches_in_epoch=6)  # 2 ranks x 6 x 3 = 36 samples consumed
    common = {k: v for k, v in saved.items() if k not in ("rank", "stream_batches")}
    with pytest.raises(LoaderError, match="world_size"):
        loader(data_dir, split="all", rank=1, world_size=3, batch_size=4).load_state_dict(common)
    ld = loader(data_dir, split="all", rank=1, world_size=3, batch_size=4)
    ld.load_state_dict({**common, "resharded_from": 2})
    assert (ld.epoch, ld.batches_in_epoch) == (2, 3)  # 36 // (3 x 4)
    assert len(epoch_ids(ld)) == ld.num_batches() - 3
