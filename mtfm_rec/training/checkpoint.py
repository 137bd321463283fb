"""Atomic, resharding checkpoints with ``torch.distributed.checkpoint`` (DCP).

A checkpoint is one directory ``<root>/step_<N>/``::

    step_<N>/
      .metadata, __<rank>_<i>.distcp   DCP: {"model": ..., "optim": ...}, every rank writes its shards
      meta.json                        step, world size, free-form metadata (config, best metric)
      ranks.json                       every rank's loader state (JSON), gathered to rank 0
      rng.pt                           every rank's RNG states (torch, cuda, numpy, python)
      COMPLETE                         written last: only directories with it are checkpoints

All ranks write into ``step_<N>.tmp/``; after a barrier rank 0 writes the side files, renames
the directory to ``step_<N>/`` and then writes ``COMPLETE``. A crash at any point leaves either a
``.tmp`` directory or one without ``COMPLETE``, both ignored by :func:`latest_checkpoint` and
removed by the next prune.

Resharding: DCP stores each tensor as chunks with global offsets (ShardedTensor / DTensor
metadata), and loads them into whatever sharding the *target* state dict has. Building the
target from the model as it is now sharded (any world size, any plan, or an unsharded module)
is all resharding needs. The loader positions and RNG states are per rank; how they map to a
new world size is in :func:`default_reshard_rank_states` and :func:`load_checkpoint`.

Requires a filesystem all ranks see (``root`` on a shared mount, or a single host).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Per-rank counters that add up to a global count; see default_reshard_rank_states.
SPLIT_COUNTERS: Tuple[str, ...] = ("samples_seen",)

RankStates = List[Optional[Dict[str, Any]]]
ReshardFn = Callable[[RankStates, int], RankStates]


@dataclass
class CheckpointState:
    """What :func:`load_checkpoint` restores besides the model and optimizer tensors.

    Attributes:
        path: the checkpoint directory.
        step: the training step it was saved at.
        metadata: the free-form dict given at save time (config, best metric, ...).
        rank_state: this rank's loader state (after resharding when the world size changed).
        saved_rank_states: every saving rank's loader state, in rank order.
        saved_world_size: the world size at save time.
        samples_seen: sum of ``samples_seen`` over the saving ranks' states (0 if absent).
    """

    path: str
    step: int
    metadata: Dict[str, Any] = field(default_factory=dict)
    rank_state: Optional[Dict[str, Any]] = None
    saved_rank_states: RankStates = field(default_factory=list)
    saved_world_size: int = 1
    samples_seen: int = 0


# ---------------------------------------------------------------------------- distributed
def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank(pg: Optional[dist.ProcessGroup]) -> int:
    return dist.get_rank(pg) if _dist_on() else 0


def _world(pg: Optional[dist.ProcessGroup]) -> int:
    return dist.get_world_size(pg) if _dist_on() else 1


def _barrier(pg: Optional[dist.ProcessGroup]) -> None:
    if _dist_on():
        dist.barrier(group=pg)


def _gather_to_rank0(obj: Any, pg: Optional[dist.ProcessGroup]) -> Optional[List[Any]]:
    """Every rank's ``obj`` on rank 0 (None elsewhere)."""
    if _world(pg) == 1:
        return [obj]
    out: Optional[List[Any]] = [None] * _world(pg) if _rank(pg) == 0 else None
    dst = dist.get_global_rank(pg, 0) if pg is not None else 0
    dist.gather_object(obj, out, dst=dst, group=pg)
    return out


# ---------------------------------------------------------------------------- RNG
def get_rng_state() -> Dict[str, Any]:
    """This process's RNG states as tensors and primitives (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, gauss],
        "python": [version, list(py_state), py_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`get_rng_state`."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:  # a different node shape: this rank's current device only
            torch.cuda.set_rng_state(cuda_states[min(torch.cuda.current_device(), len(cuda_states) - 1)])


def seed_rng(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# ---------------------------------------------------------------------------- state dicts
def _is_dmp(model: torch.nn.Module) -> bool:
    try:
        from torchrec.distributed.model_parallel import DistributedModelParallel
    except ImportError:  # pragma: no cover - torchrec is a hard dependency of the package
        return False
    return isinstance(model, DistributedModelParallel)


def _is_keyed(optimizer: Any) -> bool:
    from torchrec.optim.keyed import KeyedOptimizer, OptimizerWrapper

    return isinstance(optimizer, (KeyedOptimizer, OptimizerWrapper))


def _init_keyed_optimizer_state(optimizer: Any) -> None:
    """Materialises lazy optimizer state so that DCP can load into it in place.

    Fused (in-backward) optimizers own their state from construction; dense keyed optimizers
    (e.g. ``KeyedOptimizerWrapper`` over Adam) create it on the first step, so a zero-grad step
    creates it here. That step may move parameters (weight decay); the load that follows
    overwrites them.
    """
    from torchrec.optim.fused import FusedOptimizer
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, OptimizerWrapper

    if isinstance(optimizer, CombinedOptimizer):
        for _, sub in optimizer.optimizers:
            _init_keyed_optimizer_state(sub)
    elif isinstance(optimizer, OptimizerWrapper):
        _init_keyed_optimizer_state(optimizer._optimizer)
    elif isinstance(optimizer, FusedOptimizer):
        return
    elif isinstance(optimizer, KeyedOptimizer):
        params = [p for p in optimizer.params.values() if getattr(p, "requires_grad", False)]
        if any(p not in optimizer.state for p in params):
            optimizer.init_state()
            optimizer.zero_grad(set_to_none=True)


def _model_state(model: torch.nn.Module) -> Dict[str, Any]:
    # DMP's own state_dict drops its wrapper prefixes and returns ShardedTensors/DTensors that
    # alias the sharded tables, so DCP can load in place; torch's helper handles DDP/FSDP2.
    return model.state_dict() if _is_dmp(model) else get_model_state_dict(model)


def _optim_state(model: torch.nn.Module, optimizer: Any) -> Dict[str, Any]:
    # KeyedOptimizers (TorchRec, incl. DMP's fused_optimizer) are already keyed by parameter
    # FQN with sharded state tensors; plain torch optimizers go through torch's FQN mapping.
    return optimizer.state_dict() if _is_keyed(optimizer) else get_optimizer_state_dict(model, optimizer)


# ---------------------------------------------------------------------------- layout
def checkpoint_path(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step}")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def list_checkpoints(root: str) -> List[Tuple[int, str]]:
    """Complete checkpoints under ``root`` as (step, path), oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if m and is_complete(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str) -> Optional[str]:
    """The newest complete checkpoint under ``root``, or None (``.tmp`` and incomplete ignored)."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prune_checkpoints(root: str, keep_last: int, keep: Sequence[str] = ()) -> List[str]:
    """Deletes complete checkpoints but the newest ``keep_last`` and those in ``keep``, and any
    ``.tmp`` or incomplete directory older than the newest complete checkpoint.

    Returns:
        The deleted paths. Call on one rank only.
    """
    found = list_checkpoints(root)
    if not found:
        return []
    protect = {os.path.abspath(p) for p in keep}
    protect |= {os.path.abspath(p) for _, p in (found[-keep_last:] if keep_last > 0 else [])}
    newest = found[-1][0]
    deleted = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        m = re.match(r"^step_(\d+)(\.tmp)?$", name)
        if not m or os.path.abspath(path) in protect:
            continue
        stale = int(m.group(1)) < newest and (m.group(2) or not is_complete(path))
        if (is_complete(path) and not m.group(2)) or stale:
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
            logger.info("pruned checkpoint %s", path)
    return deleted


# ---------------------------------------------------------------------------- save / load
def save_checkpoint(
    root: str,
    step: int,
    model: torch.nn.Module,
    optimizer: Optional[Any] = None,
    *,
    rank_state: Optional[Dict[str, Any]] = None,
    metadata: Optional[Dict[str, Any]] = None,
    process_group: Optional[dist.ProcessGroup] = None,
    keep_last: Optional[int] = None,
    keep: Sequence[str] = (),
) -> str:
    """Saves a checkpoint atomically to ``<root>/step_<step>/``; collective over the group.

    Args:
        root: checkpoint root directory (shared by all ranks).
        step: the training step (names the directory).
        model: the model: DMP (sharded tables + DDP dense), FSDP2 / DDP, or a plain module.
        optimizer: a TorchRec KeyedOptimizer (e.g. ``CombinedOptimizer([dmp.fused_optimizer,
            dense])``) or a plain torch optimizer; None saves no optimizer state.
        rank_state: this rank's JSON-serialisable loader position (each rank passes its own);
            ``samples_seen`` in it is treated as a per-rank counter.
        metadata: JSON-serialisable free-form dict (config, best metric); rank 0's is kept.
        process_group: the group the model is sharded over (default: world).
        keep_last: if given, prune to this many complete checkpoints (plus ``keep``).
        keep: checkpoint paths never pruned (e.g. the best one).

    Returns:
        The final checkpoint path.
    """
    # Fail on the offending rank before any collective rather than on rank 0 after them.
    json.dumps(rank_state)
    json.dumps(metadata)
    rank = _rank(process_group)
    final = checkpoint_path(root, step)
    tmp = f"{final}.tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crashed save of this step
    _barrier(process_group)

    state: Dict[str, Any] = {"model": _model_state(model)}
    if optimizer is not None:
        state["optim"] = _optim_state(model, optimizer)
    dcp.save(
        state, storage_writer=dcp.FileSystemWriter(tmp), process_group=process_group, no_dist=not _dist_on()
    )

    rank_states = _gather_to_rank0(rank_state, process_group)
    rng_states = _gather_to_rank0(get_rng_state(), process_group)
    if rank == 0:
        assert rank_states is not None and rng_states is not None
        world = _world(process_group)
        _write_json(os.path.join(tmp, "ranks.json"), {"world_size": world, "states": rank_states})
        torch.save(rng_states, os.path.join(tmp, "rng.pt"))
        _write_json(
            os.path.join(tmp, "meta.json"),
            {
                "format_version": FORMAT_VERSION,
                "step": int(step),
                "world_size": world,
                "has_optimizer": optimizer is not None,
                "metadata": metadata or {},
            },
        )
        if os.path.exists(final):  # re-saving a step: the new one replaces it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        with open(os.path.join(final, COMPLETE), "w") as fh:
            fh.write(f"{step}\n")
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(final)
        if keep_last is not None:
            prune_checkpoints(root, keep_last, keep)
    _barrier(process_group)
    return final


def default_reshard_rank_states(states: RankStates, world_size: int) -> RankStates:
    """Maps the saving ranks' loader states to ``world_size`` new ranks.

    Same world size: unchanged, rank ``r`` resumes from rank ``r``'s state. Otherwise every new
    rank gets the keys whose value is equal on all saving ranks (e.g. ``epoch``, ``step``);
    each counter in :data:`SPLIT_COUNTERS` (``samples_seen``) is summed over the saving ranks
    and split as evenly as possible over the new ranks, so the global total is preserved; the
    other per-rank keys (file offsets, ...) are dropped, and ``resharded_from`` records the old
    world size so that the loader knows to re-derive its position from the counters.
    """
    if len(states) == world_size:
        return list(states)
    present = [s for s in states if s is not None]
    if not present:
        return [None] * world_size
    common = set(present[0]).intersection(*present[1:]) if len(present) > 1 else set(present[0])
    base = {
        k: present[0][k]
        for k in sorted(common)
        if k not in SPLIT_COUNTERS and all(s[k] == present[0][k] for s in present)
    }
    base["resharded_from"] = len(states)
    out: RankStates = [dict(base) for _ in range(world_size)]
    for key in SPLIT_COUNTERS:
        if key in common and all(isinstance(s[key], int) for s in present):
            total = sum(int(s[key]) for s in present)
            for r, state in enumerate(out):
                assert state is not None
                state[key] = total // world_size + (1 if r < total % world_size else 0)
    return out


def read_checkpoint_info(path: str) -> Dict[str, Any]:
    """``meta.json`` of a checkpoint (step, world_size, metadata, ...)."""
    with open(os.path.join(path, "meta.json")) as fh:
        return json.load(fh)


def load_checkpoint(
    path: str,
    model: Optional[torch.nn.Module] = None,
    optimizer: Optional[Any] = None,
    *,
    process_group: Optional[dist.ProcessGroup] = None,
    restore_rng: bool = True,
    reshard_rank_states: ReshardFn = default_reshard_rank_states,
) -> CheckpointState:
    """Loads a checkpoint into ``model`` and ``optimizer`` in place; collective over the group.

    The model (and optimizer) must already be built and sharded the way they will train; DCP
    reads each rank's shards from whatever sharding they were saved with. An unsharded module
    can load a DMP checkpoint's model state (pass ``optimizer=None``: fused embedding optimizer
    state only fits a TorchRec fused optimizer).

    Args:
        path: a checkpoint directory (e.g. from :func:`latest_checkpoint`).
        model: the model to load into; None loads no tensors.
        optimizer: the optimizer to load into; None skips optimizer state.
        process_group: the group the model is sharded over (default: world).
        restore_rng: restore this rank's RNG states. Rank ``r`` gets the saved rank ``r``'s
            states; ranks beyond the saved world size get a fresh seed derived from
            ``(step, rank)``.
        reshard_rank_states: maps the saved loader states to the current world size.

    Returns:
        The step, metadata and this rank's loader state.
    """
    if not is_complete(path):
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {COMPLETE} marker)")
    info = read_checkpoint_info(path)
    if model is not None:
        state: Dict[str, Any] = {"model": _model_state(model)}
        if optimizer is not None:
            if not info.get("has_optimizer", True):
                raise ValueError(f"{path}: saved without optimizer state")
            if _is_keyed(optimizer):
                _init_keyed_optimizer_state(optimizer)
            state["optim"] = _optim_state(model, optimizer)
        dcp.load(
            state, storage_reader=dcp.FileSystemReader(path), process_group=process_group,
            no_dist=not _dist_on(),
        )
        if _is_dmp(model):
            # In place already for sharded tables; load_state_dict also covers dense tensors
            # that DMP's state_dict returns as copies.
            model.load_state_dict(state["model"])
        else:
            set_model_state_dict(model, state["model"])
        if optimizer is not None:
            if _is_keyed(optimizer):
                optimizer.load_state_dict(state["optim"])
            else:
                set_optimizer_state_dict(model, optimizer, state["optim"])

    rank, world = _rank(process_group), _world(process_group)
    with open(os.path.join(path, "ranks.json")) as fh:
        saved_states: RankStates = json.load(fh)["states"]
    new_states = reshard_rank_states(saved_states, world)
    if restore_rng:
        rng = torch.load(os.path.join(path, "rng.pt"), weights_only=True)
        if rank < len(rng):
            set_rng_state(rng[rank])
        else:
            seed_rng(int(info["step"]) * 1_000_003 + rank)
    samples = sum(int(s.get("samples_seen", 0)) for s in saved_states if s is not None)
    return CheckpointState(
        path=path,
        step=int(info["step"]),
        metadata=info.get("metadata", {}),
        rank_state=new_states[rank] if rank < len(new_states) else None,
        saved_rank_states=saved_states,
        saved_world_size=int(info["world_size"]),
        samples_seen=samples,
    )


# ---------------------------------------------------------------------------- manager
class CheckpointManager:
    """Periodic checkpoints under one root: keeps the last K and the best one.

    The best checkpoint is recorded in ``<root>/BEST`` (JSON: name, step, metric, value), so
    it survives restarts and is never pruned.

    Args:
        root: checkpoint root (``<run_dir>/checkpoints``).
        keep_last: complete checkpoints to keep besides the best; <= 0 keeps all.
        best_metric: name of the validation metric that decides "best", stored in BEST.
        mode: ``"max"`` (AUC) or ``"min"`` (logloss).
    """

    def __init__(self, root: str, keep_last: int = 3, best_metric: Optional[str] = None, mode: str = "max") -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.root, self.keep_last, self.best_metric, self.mode = root, keep_last, best_metric, mode

    def best(self) -> Optional[Dict[str, Any]]:
        """The BEST record ({"path", "step", "metric", "value"}) if its checkpoint exists."""
        try:
            with open(os.path.join(self.root, "BEST")) as fh:
                record = json.load(fh)
        except FileNotFoundError:
            return None
        # Stored relative to root, so a moved run directory keeps its best checkpoint.
        record["path"] = os.path.join(self.root, record["name"])
        return record if is_complete(record["path"]) else None

    def latest(self) -> Optional[str]:
        return latest_checkpoint(self.root)

    def _better(self, value: float, old: Optional[Dict[str, Any]]) -> bool:
        if old is None or old.get("value") is None:
            return True
        return value > old["value"] if self.mode == "max" else value < old["value"]

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: Optional[Any] = None,
        *,
        rank_state: Optional[Dict[str, Any]] = None,
        metadata: Optional[Dict[str, Any]] = None,
        metric_value: Optional[float] = None,
        process_group: Optional[dist.ProcessGroup] = None,
    ) -> str:
        """Saves step ``step``; updates BEST when ``metric_value`` improves it; prunes."""
        best = self.best()
        meta = dict(metadata or {})
        if metric_value is not None:
            meta["metric"] = {"name": self.best_metric, "value": metric_value}
        path = save_checkpoint(
            self.root, step, model, optimizer,
            rank_state=rank_state, metadata=meta, process_group=process_group,
        )
        if _rank(process_group) == 0:
            if metric_value is not None and self._better(metric_value, best):
                best = {"name": os.path.basename(path), "step": step, "metric": self.best_metric,
                        "value": metric_value}
                _write_json(os.path.join(self.root, "BEST"), best)
                best["path"] = path
            if self.keep_last > 0:
                prune_checkpoints(self.root, self.keep_last, [best["path"]] if best else [])
        _barrier(process_group)
        return path
