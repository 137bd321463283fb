"""Checkpoints: atomic layout, RNG restore, and resharding of a DMP model 1 -> 2 -> 1 ranks."""

from __future__ import annotations

import json
import os
import random
import sys
from typing import Any, Dict

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor

from mtfm_rec.training.checkpoint import (
    CheckpointManager,
    default_reshard_rank_states,
    load_checkpoint,
    save_checkpoint,
)
from mtfm_rec.training.checkpoint_files import (
    COMPLETE,
    latest_checkpoint,
    list_checkpoints,
    read_manifest,
    select_checkpoint,
    verify_checkpoint,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from processes import file_store, init_rank, spawn_ranks  # noqa: E402

# ---------------------------------------------------------------- plain model (no dist)


def _plain_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))


def _train_plain(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        loss = model(torch.randn(16, 4)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_plain_round_trip_restores_params_optimizer_rng(tmp_path) -> None:
    torch.manual_seed(0)
    model = _plain_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    _train_plain(model, opt, 3)
    path = save_checkpoint(
        str(tmp_path),
        3,
        model,
        opt,
        rank_state={"samples_seen": 48, "epoch": 0},
        metadata={"best_auc": 0.7, "config": {"lr": 0.01}},
    )
    expected_draws = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    ref_params = {k: v.clone() for k, v in model.state_dict().items()}
    ref_after = _plain_model()
    ref_after.load_state_dict(model.state_dict())
    _train_plain(model, opt, 2)  # moves params, optimizer and RNG away from the checkpoint

    fresh = _plain_model()
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.01)
    state = load_checkpoint(path, fresh, fresh_opt)
    assert state.step == 3 and state.saved_world_size == 1
    assert state.metadata == {"best_auc": 0.7, "config": {"lr": 0.01}}
    assert state.rank_state == {"samples_seen": 48, "epoch": 0}
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, ref_params[k]), k
    assert torch.equal(torch.rand(4), expected_draws[0])
    assert np.array_equal(np.random.rand(4), expected_draws[1])
    assert [random.random() for _ in range(4)] == expected_draws[2]
    # Optimizer state restored: one more identical step from both gives identical params.
    ref_opt = torch.optim.Adam(ref_after.parameters(), lr=0.01)
    load_checkpoint(path, ref_after, ref_opt, restore_rng=False)
    torch.manual_seed(5)
    _train_plain(fresh, fresh_opt, 1)
    torch.manual_seed(5)
    _train_plain(ref_after, ref_opt, 1)
    for (k, a), b in zip(fresh.state_dict().items(), ref_after.state_dict().values()):
        assert torch.equal(a, b), k
    assert fresh_opt.state_dict()["state"][0]["step"] == 4


def test_incomplete_and_tmp_ignored_then_pruned(tmp_path) -> None:
    model = _plain_model()
    root = str(tmp_path)
    p5 = save_checkpoint(root, 5, model)
    os.makedirs(os.path.join(root, "step_9.tmp"))  # crashed mid-write
    p7 = save_checkpoint(root, 7, model)
    os.remove(os.path.join(p7, COMPLETE))  # crashed between rename and marker
    assert latest_checkpoint(root) == p5
    assert [s for s, _ in list_checkpoints(root)] == [5]
    with pytest.raises(FileNotFoundError):
        load_checkpoint(p7, model)
    save_checkpoint(root, 8, model, keep_last=1)
    # step_7 (incomplete, older) and step_5 (beyond keep_last) are gone; step_9.tmp is newer.
    assert sorted(os.listdir(root)) == ["step_8", "step_9.tmp"]
    assert latest_checkpoint(root) == os.path.join(root, "step_8")


def test_manager_keeps_last_k_and_best(tmp_path) -> None:
    model = _plain_model()
    mgr = CheckpointManager(str(tmp_path), keep_last=2, best_metric="valid/auc", mode="max")
    for step, auc in [(1, 0.60), (2, 0.75), (3, 0.70), (4, 0.65), (5, 0.74)]:
        mgr.save(step, model, metric_value=auc)
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [2, 4, 5]
    best = mgr.best()
    assert best is not None and best["step"] == 2 and best["value"] == 0.75
    assert load_checkpoint(best["path"], restore_rng=False).metadata["metric"]["value"] == 0.75
    assert mgr.latest() == os.path.join(str(tmp_path), "step_5")


def test_manager_never_takes_a_nan_score_as_best(tmp_path) -> None:
    mgr = CheckpointManager(str(tmp_path), keep_last=1, best_metric="valid/auc", mode="max")
    mgr.save(1, _plain_model(), metric_value=float("nan"))  # nothing to compare with yet: still not best
    assert mgr.best() is None
    mgr.save(2, _plain_model(), metric_value=0.6)
    mgr.save(3, _plain_model(), metric_value=float("nan"))
    best = mgr.best()
    assert best is not None and best["step"] == 2
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [2, 3]  # the best is kept beside the last


def test_reshard_rank_states() -> None:
    saved = [{"batches": 10, "epoch": 1, "rank": 0}, {"batches": 10, "epoch": 1, "rank": 1}]
    assert default_reshard_rank_states(saved, 2) == saved
    three = default_reshard_rank_states(saved, 3)
    # keys equal on all saving ranks are kept, per-rank ones dropped; resharded_from says from where
    assert three == [{"batches": 10, "epoch": 1, "resharded_from": 2}] * 3
    assert default_reshard_rank_states(saved, 1) == [{"batches": 10, "epoch": 1, "resharded_from": 2}]
    assert default_reshard_rank_states([None, None], 1) == [None]


# ---------------------------------------------------------------- DMP 1 -> 2 -> 1 ranks
TABLES = {"t0": 12, "t1": 7}
DIM = 4


class _Model(torch.nn.Module):
    def __init__(self, device: torch.device) -> None:
        from torchrec.modules.embedding_configs import EmbeddingConfig
        from torchrec.modules.embedding_modules import EmbeddingCollection

        super().__init__()
        self.ec = EmbeddingCollection(
            tables=[
                EmbeddingConfig(name=t, embedding_dim=DIM, num_embeddings=n, feature_names=[f"f_{t}"])
                for t, n in TABLES.items()
            ],
            device=device,
        )
        self.dense = torch.nn.Linear(DIM, 1)

    def forward(self, kjt: Any) -> torch.Tensor:
        out = self.ec(kjt)
        x = torch.cat([out[f"f_{t}"].values() for t in TABLES])
        return self.dense(x).pow(2).mean()


def _dmp(sharding: Dict[str, str]) -> tuple:
    """A DMP over the default group with a fused Adagrad on the tables and Adam on the dense."""
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    torch.manual_seed(1234)  # a fresh model must differ from the trained one
    model = _Model(torch.device("meta"))
    apply_optimizer_in_backward(torch.optim.Adagrad, model.ec.parameters(), {"lr": 0.5})
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=dist.get_world_size(), compute_device="cpu"),
        constraints={t: ParameterConstraints(sharding_types=[st]) for t, st in sharding.items()},
    )
    sharders = [EmbeddingCollectionSharder()]
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda p: torch.optim.Adam(p, lr=0.05)
    )
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense])


def _train_dmp(dmp: torch.nn.Module, opt: Any, steps: int, seed: int) -> None:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(seed * 100 + dist.get_rank())
    for _ in range(steps):
        values = [torch.randint(0, n, (6,), generator=g) for n in TABLES.values()]
        kjt = KeyedJaggedTensor(
            keys=[f"f_{t}" for t in TABLES],
            values=torch.cat(values),
            lengths=torch.ones(12, dtype=torch.int32),
        )
        dmp(kjt).backward()
        opt.step()
        opt.zero_grad()


def _local(v: Any) -> Any:
    """This rank's part of a value: ("shards", size, [(offsets, tensor)]) or ("full", value)."""
    if isinstance(v, ShardedTensor):
        return (
            "shards",
            tuple(v.size()),
            [(s.metadata.shard_offsets, s.tensor.detach().clone()) for s in v.local_shards()],
        )
    if isinstance(v, DTensor):
        return ("full", v.full_tensor())
    return ("full", v.detach().clone() if isinstance(v, torch.Tensor) else v)


def _full_state(dmp: torch.nn.Module, opt: Any) -> Dict[str, Any]:
    """Every model and optimizer tensor, unsharded, on every rank.

    Built from local shards with their offsets, since a rank only holds optimizer state for
    the tables it owns (its state dict lacks the others' keys).
    """
    local = {f"model/{k}": _local(v) for k, v in dmp.state_dict().items()}
    for param, states in opt.state_dict()["state"].items():
        for name, v in states.items():
            local[f"optim/{param}/{name}"] = _local(v)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    out: Dict[str, Any] = {}
    for part in parts:
        for key, (kind, *rest) in part.items():
            if kind == "full":
                out.setdefault(key, rest[0])
                continue
            size, shards = rest
            full = out.setdefault(key, torch.full(size, float("nan")))
            for offsets, t in shards:
                full[tuple(slice(o, o + n) for o, n in zip(offsets, t.shape))] = t
    for key, v in out.items():  # every element was covered by some shard
        assert not (isinstance(v, torch.Tensor) and v.is_floating_point() and v.isnan().any()), key
    return dict(sorted(out.items()))


def _assert_same(actual: Dict[str, Any], expected: Dict[str, Any]) -> None:
    assert actual.keys() == expected.keys()
    for k in expected:
        if isinstance(expected[k], torch.Tensor):
            assert torch.equal(actual[k], expected[k]), k
        else:
            assert actual[k] == expected[k], k


def _two_rank_main(rank: int, store: str, tmp: str) -> None:
    init_rank(rank, 2, store)
    try:
        expected = torch.load(os.path.join(tmp, "ref1.pt"), weights_only=False)
        # t0 row-wise (split over both ranks), t1 table-wise (on one rank).
        dmp, opt = _dmp({"t0": "row_wise", "t1": "table_wise"})
        state = load_checkpoint(latest_checkpoint(os.path.join(tmp, "ckpt1")), dmp, opt)
        report: Dict[str, Any] = {
            "state": _full_state(dmp, opt),
            "step": state.step,
            "rank_state": state.rank_state,
            "draw": torch.rand(3),  # rank 0: the saved rank's RNG; rank 1: seeded from (step, 1)
        }
        _train_dmp(dmp, opt, 2, seed=2)
        save_checkpoint(
            os.path.join(tmp, "ckpt2"),
            5,
            dmp,
            opt,
            rank_state={"samples_seen": 10 * (rank + 1), "epoch": 0, "file_offset": rank},
            metadata={"best": {"valid/auc": 0.61}},
        )
        report["draw_after_save"] = torch.rand(3)
        report["ref2"] = _full_state(dmp, opt)
        report.update(_damaged_on_two_ranks(os.path.join(tmp, "damaged"), dmp, opt))
        torch.save(report, os.path.join(tmp, f"two_rank_{rank}.pt"))
        del expected
    finally:
        dist.destroy_process_group()


def _damaged_on_two_ranks(root: str, dmp: torch.nn.Module, opt: Any) -> Dict[str, Any]:
    """Two checkpoints; rank 0 damages every file of the newest; every rank verifies."""
    for step in (1, 2):
        save_checkpoint(root, step, dmp, opt)
    newest = os.path.join(root, "step_2")
    manifest = read_manifest(newest)
    if dist.get_rank() == 0:
        for name in manifest["files"]:
            with open(os.path.join(newest, name), "r+b") as fh:
                fh.write(b"\0" * 16)
    dist.barrier()
    return {
        "manifest_files": sorted(manifest["files"]),
        "problems": verify_checkpoint(newest),
        "selected": select_checkpoint(root),
    }


@pytest.fixture(scope="module")
def resharded(tmp_path_factory) -> Dict[str, Any]:
    """Trains on 1 rank and saves; loads on 2 ranks, trains, saves; loads back on 1 rank."""
    tmp = str(tmp_path_factory.mktemp("reshard"))
    out: Dict[str, Any] = {}
    init_rank(0, 1, file_store(tmp, "save_one_rank"))
    try:
        dmp, opt = _dmp({"t0": "row_wise", "t1": "row_wise"})
        _train_dmp(dmp, opt, 3, seed=1)
        save_checkpoint(os.path.join(tmp, "ckpt1"), 3, dmp, opt, rank_state={"samples_seen": 36, "epoch": 0})
        out["draw1"] = torch.rand(3)
        out["ref1"] = _full_state(dmp, opt)
        torch.save(out["ref1"], os.path.join(tmp, "ref1.pt"))
    finally:
        dist.destroy_process_group()

    spawn_ranks(_two_rank_main, (file_store(tmp, "two_ranks"), tmp))
    out["two"] = [torch.load(os.path.join(tmp, f"two_rank_{r}.pt"), weights_only=False) for r in range(2)]

    init_rank(0, 1, file_store(tmp, "load_one_rank"))
    try:
        dmp, opt = _dmp({"t0": "row_wise", "t1": "table_wise"})
        state = load_checkpoint(latest_checkpoint(os.path.join(tmp, "ckpt2")), dmp, opt)
        out["draw3"] = torch.rand(3)
        out["state3"] = _full_state(dmp, opt)
        out["ckpt3"] = state
    finally:
        dist.destroy_process_group()
    # An unsharded module (no DMP, no process group) reads the sharded tables too.
    plain = _Model(torch.device("cpu"))
    load_checkpoint(latest_checkpoint(os.path.join(tmp, "ckpt2")), plain, None, restore_rng=False)
    out["plain"] = {f"model/{k}": v.detach().clone() for k, v in plain.state_dict().items()}
    out["root"] = tmp
    return out


def test_one_rank_checkpoint_loads_on_two_ranks(resharded: Dict[str, Any]) -> None:
    ref1 = resharded["ref1"]
    assert any(k.startswith("optim/ec.embeddings.t0.weight/") for k in ref1)  # fused state covered
    assert any(k.startswith("optim/dense.weight/") for k in ref1)  # dense Adam state covered
    for rank in range(2):
        report = resharded["two"][rank]
        _assert_same(report["state"], ref1)
        assert report["step"] == 3
        assert report["rank_state"] == {
            "samples_seen": 36,
            "epoch": 0,
            "resharded_from": 1,
        }  # one rank: all its keys
    assert torch.equal(resharded["two"][0]["draw"], resharded["draw1"])
    assert not torch.equal(resharded["two"][1]["draw"], resharded["draw1"])


def test_two_rank_checkpoint_loads_on_one_rank(resharded: Dict[str, Any]) -> None:
    ref2 = resharded["two"][0]["ref2"]
    _assert_same(resharded["two"][1]["ref2"], ref2)  # both ranks saw the same full state
    assert not torch.equal(
        ref2["model/ec.embeddings.t0.weight"], resharded["ref1"]["model/ec.embeddings.t0.weight"]
    )
    _assert_same(resharded["state3"], ref2)
    state = resharded["ckpt3"]
    assert state.step == 5 and state.saved_world_size == 2
    assert state.rank_state == {"epoch": 0, "resharded_from": 2}  # samples_seen differed per rank: dropped
    assert state.metadata == {"best": {"valid/auc": 0.61}}
    assert torch.equal(resharded["draw3"], resharded["two"][0]["draw_after_save"])
    plain = resharded["plain"]
    _assert_same(plain, {k: v for k, v in ref2.items() if k.startswith("model/")})
    assert verify_checkpoint(os.path.join(resharded["root"], "ckpt2", "step_5")) == []
    with open(os.path.join(resharded["root"], "ckpt2", "step_5", "ranks.json")) as fh:
        ranks = json.load(fh)
    assert ranks["world_size"] == 2 and [s["file_offset"] for s in ranks["states"]] == [0, 1]


def test_two_ranks_hash_their_own_files_and_agree_on_a_damaged_checkpoint(resharded: Dict[str, Any]) -> None:
    one, two = resharded["two"]
    # each rank's data file is in the manifest (hashed by the rank that wrote it)
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.json", "ranks.json", "rng.pt"} <= set(
        one["manifest_files"]
    )
    # each rank checked a share of the files; the gathered problems, on both ranks, name them all
    assert one["problems"] == two["problems"]
    assert [p.split(":")[0] for p in one["problems"]] == one["manifest_files"]
    root = os.path.join(resharded["root"], "damaged")
    assert one["selected"] == two["selected"] == os.path.join(root, "step_1")
    assert sorted(os.listdir(root)) == ["step_1", "step_2.damaged"]


def _one_rank_group_main(rank: int, store: str, tmp: str) -> None:
    """Saves and loads under an initialised one-rank gloo group, recording DCP's ``no_dist``."""
    import torch.distributed.checkpoint as dcp

    init_rank(rank, 1, store)
    calls = []
    save, load = dcp.save, dcp.load
    dcp.save = lambda *a, **kw: (calls.append(("save", kw.get("no_dist"))), save(*a, **kw))[1]
    dcp.load = lambda *a, **kw: (calls.append(("load", kw.get("no_dist"))), load(*a, **kw))[1]
    try:
        dmp, opt = _dmp({"t0": "table_wise", "t1": "table_wise"})
        _train_dmp(dmp, opt, 2, seed=3)
        before = _full_state(dmp, opt)
        path = save_checkpoint(os.path.join(tmp, "one"), 2, dmp, opt, rank_state={"samples_seen": 4})
        _train_dmp(dmp, opt, 1, seed=4)
        load_checkpoint(path, dmp, opt)
        torch.save(
            {"calls": calls, "before": before, "after": _full_state(dmp, opt)}, os.path.join(tmp, "one.pt")
        )
    finally:
        dcp.save, dcp.load = save, load
        dist.destroy_process_group()


def test_a_one_rank_group_saves_and_loads_without_dcp_collectives(tmp_path) -> None:
    # DCP's collective save over a one-rank gloo group left every later training step of the
    # process ~40 % slower (docs/TRAINING.md); one rank has nothing to coordinate.
    spawn_ranks(_one_rank_group_main, (file_store(tmp_path), str(tmp_path)), nprocs=1)
    report = torch.load(os.path.join(tmp_path, "one.pt"), weights_only=False)
    assert report["calls"] == [("save", True), ("load", True)]
    _assert_same(report["after"], report["before"])  # the round trip still restores everything
