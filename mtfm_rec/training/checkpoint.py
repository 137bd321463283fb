"""Atomic, verified, resharding checkpoints with ``torch.distributed.checkpoint`` (DCP).

A checkpoint is one directory ``<root>/step_<N>/``::

    step_<N>/
      .metadata, __<rank>_<i>.distcp   DCP: {"model": ..., "optim": ...}, every rank writes its shards
      meta.json                        step, world size, free-form metadata (config, best metric)
      ranks.json                       every rank's loader state (JSON), gathered to rank 0
      rng.pt                           every rank's RNG states (torch, cuda, numpy, python)
      COMPLETE                         written last: the manifest (size and sha256 of every file)

All ranks write into ``step_<N>.tmp/``; each rank then hashes the DCP files it wrote (in
parallel, while they are still in the page cache); rank 0 writes the side files, hashes them,
renames the directory to ``step_<N>/`` and then writes ``COMPLETE`` (atomically: a temporary
file renamed). A crash at any point leaves either a ``.tmp`` directory or one without
``COMPLETE``, both ignored by :func:`latest_checkpoint` and removed by the next prune. A failed
write (disk full, ...) removes the partial directory and raises :class:`CheckpointWriteError`
on every rank.

Resume verifies a checkpoint against its manifest before reading it (:func:`verify_checkpoint`:
every rank checks a share of the files, the problems are gathered so that all ranks agree);
:func:`select_checkpoint` takes the newest one that verifies, and raises
:class:`CheckpointCorruptError` when none does. Checkpoints written before manifests existed
(``COMPLETE`` holds only the step) load unverified, with a warning.

Resharding: DCP stores each tensor as chunks with global offsets (ShardedTensor / DTensor
metadata), and loads them into whatever sharding the *target* state dict has. Building the
target from the model as it is now sharded (any world size, any plan, or an unsharded module)
is all resharding needs. The loader positions and RNG states are per rank; how they map to a
new world size is in :func:`default_reshard_rank_states` and :func:`load_checkpoint`.

Requires a filesystem all ranks see (``root`` on a shared mount, or a single host). What a
checkpoint leaves on disk (layout, manifest, verification, pruning, the errors) is
``mtfm_rec.training.checkpoint_files``; this module moves the state in and out.

Why one module of ~630 lines: saving and loading are inverses over one format
(``FORMAT_VERSION``: which state goes to DCP, which to the side files, how rank states reshard),
and the manager is their policy (keep last K and the best); split, a format change would have to
be made in step across files.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mtfm_rec.training.checkpoint_files import (
    COMPLETE,
    MANIFEST_VERSION,
    CheckpointWriteError,
    checkpoint_path,
    digest_files,
    fsync_dir,
    is_complete,
    latest_checkpoint,
    list_checkpoints,
    manifest_files,
    own_dcp_files,
    prune_checkpoints,
    require_verified,
    select_checkpoint,
    write_bytes,
    write_error,
    write_json,
)
from mtfm_rec.training.distributed import (
    barrier,
    broadcast_from_rank0,
    gather_to_rank0,
    get_rank,
    get_world_size,
)
from mtfm_rec.training.rng import get_rng_state, seed_everything, set_rng_state

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1

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
        saved_world_size: the world size at save time.
    """

    path: str
    step: int
    metadata: Dict[str, Any] = field(default_factory=dict)
    rank_state: Optional[Dict[str, Any]] = None
    saved_world_size: int = 1


# ---------------------------------------------------------------------------- distributed
def _dcp_no_dist(pg: Optional[dist.ProcessGroup]) -> bool:
    """DCP's ``no_dist`` for a save or load over ``pg``: set for a one-rank group. DCP's
    collective save, even over a one-rank gloo group, left every later training step of the
    process ~40 % slower (12.4 -> 7.4 steps/s on mtfm_small on the CPU after one save;
    docs/TRAINING.md), and one rank has nothing to coordinate."""
    return get_world_size(pg) == 1


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


# ---------------------------------------------------------------------------- save / load
def _save_tensors(
    root: str,
    final: str,
    tmp: str,
    model: torch.nn.Module,
    optimizer: Optional[Any],
    process_group: Optional[dist.ProcessGroup],
) -> None:
    """Every rank's shards of the model (and optimizer) state into ``tmp`` with DCP; a failure
    (raised on every rank alike) removes ``tmp`` and becomes a :class:`CheckpointWriteError`."""
    state: Dict[str, Any] = {"model": _model_state(model)}
    if optimizer is not None:
        state["optim"] = _optim_state(model, optimizer)
    try:
        dcp.save(
            state,
            storage_writer=dcp.FileSystemWriter(tmp),
            process_group=process_group,
            no_dist=_dcp_no_dist(process_group),
        )
    except (Exception, CheckpointException) as exc:  # DCP raises on every rank alike
        if get_rank(process_group) == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(final, root, exc) from exc


def _hash_own_files(tmp: str, rank: int) -> Dict[str, Any]:
    """The manifest entries of the DCP files this rank wrote, or the error that stopped it (raised
    by rank 0 once gathered, so that all ranks fail together)."""
    hashed: Dict[str, Any] = {"files": {}, "error": None}
    try:
        hashed["files"] = digest_files(tmp, own_dcp_files(tmp, rank))
    except OSError as exc:
        hashed["error"] = exc
    return hashed


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
        rank_state: this rank's JSON-serialisable loader position (each rank passes its own).
        metadata: JSON-serialisable free-form dict (config, best metric); rank 0's is kept.
        process_group: the group the model is sharded over (default: world).
        keep_last: if given, prune to this many complete checkpoints (plus ``keep``).
        keep: checkpoint paths never pruned (e.g. the best one).

    Returns:
        The final checkpoint path.

    Raises:
        CheckpointWriteError: on every rank, when the checkpoint could not be written (for a
            full disk, ``errno`` is ``errno.ENOSPC`` and the message says so); the partial
            directory is removed and earlier checkpoints are untouched.
    """
    # Fail on the offending rank before any collective rather than on rank 0 after them.
    json.dumps(rank_state)
    json.dumps(metadata)
    rank = get_rank(process_group)
    final = checkpoint_path(root, step)
    tmp = f"{final}.tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crashed save of this step
    barrier(process_group)

    _save_tensors(root, final, tmp, model, optimizer, process_group)
    hashed = _hash_own_files(tmp, rank)  # in parallel, and still in this rank's page cache
    gathered = gather_to_rank0({"rank_state": rank_state, "rng": get_rng_state(), **hashed}, process_group)

    def finish() -> None:
        assert gathered is not None
        _finish_save(root, step, final, tmp, gathered, optimizer is not None, metadata)
        if keep_last is not None:
            prune_checkpoints(root, keep_last, keep)

    _on_rank0(finish, process_group, lambda exc: write_error(final, root, exc))
    return final


def _finish_save(
    root: str,
    step: int,
    final: str,
    tmp: str,
    gathered: List[Dict[str, Any]],
    has_optimizer: bool,
    metadata: Optional[Dict[str, Any]],
) -> None:
    """Rank 0's part of a save: side files, manifest, rename, ``COMPLETE``; on any failure the
    partial directory is removed (an earlier checkpoint of the same step is already gone)."""
    renamed = False
    try:
        for part in gathered:
            if part["error"] is not None:
                raise part["error"]
        world = len(gathered)
        write_json(
            os.path.join(tmp, "ranks.json"),
            {"world_size": world, "states": [g["rank_state"] for g in gathered]},
        )
        buffer = io.BytesIO()
        torch.save([g["rng"] for g in gathered], buffer)
        write_bytes(os.path.join(tmp, "rng.pt"), buffer.getvalue())
        write_json(
            os.path.join(tmp, "meta.json"),
            {
                "format_version": FORMAT_VERSION,
                "step": int(step),
                "world_size": world,
                "has_optimizer": has_optimizer,
                "metadata": metadata or {},
            },
        )
        files: Dict[str, Any] = {}
        for part in gathered:
            files.update(part["files"])
        files.update(digest_files(tmp, [n for n in manifest_files(tmp) if n not in files]))
        if os.path.exists(final):  # re-saving a step: the new one replaces it
            shutil.rmtree(final)
        os.rename(tmp, final)
        renamed = True
        fsync_dir(root)
        manifest = {"manifest_version": MANIFEST_VERSION, "step": int(step), "files": files}
        write_json(os.path.join(final, COMPLETE), manifest)  # atomic: the commit point
        fsync_dir(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if renamed and not is_complete(final):
            shutil.rmtree(final, ignore_errors=True)
        raise


def _on_rank0(
    fn: Callable[[], None],
    pg: Optional[dist.ProcessGroup],
    error: Callable[[BaseException], CheckpointWriteError],
) -> None:
    """Runs ``fn`` on rank 0; if it fails, every rank raises the same :class:`CheckpointWriteError`
    (rather than rank 0 alone, with the others left waiting in the next collective)."""
    failure: Optional[BaseException] = None
    if get_rank(pg) == 0:
        try:
            fn()
        except Exception as exc:
            failure = exc
    made = error(failure) if failure is not None else None
    args = broadcast_from_rank0(None if made is None else (str(made), made.path, made.errno), pg)
    if args is not None:
        raise CheckpointWriteError(*args) from failure


def default_reshard_rank_states(states: RankStates, world_size: int) -> RankStates:
    """Maps the saving ranks' loader states to ``world_size`` new ranks.

    Same world size: unchanged, rank ``r`` resumes from rank ``r``'s state. Otherwise every new
    rank gets the keys whose value is equal on all saving ranks (epoch, batches in the epoch,
    batch size, seed, ...); the per-rank keys (rank, file offsets, ...) are dropped, and
    ``resharded_from`` records the old world size, from which the loader re-derives its position
    (``ResumableLoader.load_state_dict``).
    """
    if len(states) == world_size:
        return list(states)
    present = [s for s in states if s is not None]
    if not present:
        return [None] * world_size
    common = set(present[0]).intersection(*present[1:]) if len(present) > 1 else set(present[0])
    base = {k: present[0][k] for k in sorted(common) if all(s[k] == present[0][k] for s in present)}
    base["resharded_from"] = len(states)
    return [dict(base) for _ in range(world_size)]


def read_checkpoint_info(path: str) -> Dict[str, Any]:
    """``meta.json`` of a checkpoint (step, world_size, metadata, ...); not verified (see
    :func:`verify_checkpoint`)."""
    with open(os.path.join(path, "meta.json")) as fh:
        return json.load(fh)


def _load_tensors(
    path: str,
    info: Mapping[str, Any],
    model: torch.nn.Module,
    optimizer: Optional[Any],
    process_group: Optional[dist.ProcessGroup],
) -> None:
    """DCP reads the model (and optimizer) state into the current sharding, in place."""
    state: Dict[str, Any] = {"model": _model_state(model)}
    if optimizer is not None:
        if not info.get("has_optimizer", True):
            raise ValueError(f"{path}: saved without optimizer state")
        if _is_keyed(optimizer):
            _init_keyed_optimizer_state(optimizer)
        state["optim"] = _optim_state(model, optimizer)
    dcp.load(
        state,
        storage_reader=dcp.FileSystemReader(path),
        process_group=process_group,
        no_dist=_dcp_no_dist(process_group),
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


def _restore_rng(path: str, step: int, rank: int) -> None:
    """Saved rank ``rank``'s RNG states; a rank beyond the saved world size gets a seed of
    ``(step, rank)``."""
    rng = torch.load(os.path.join(path, "rng.pt"), weights_only=True)
    if rank < len(rng):
        set_rng_state(rng[rank])
    else:
        seed_everything(step * 1_000_003 + rank)


def load_checkpoint(
    path: str,
    model: Optional[torch.nn.Module] = None,
    optimizer: Optional[Any] = None,
    *,
    process_group: Optional[dist.ProcessGroup] = None,
    restore_rng: bool = True,
    reshard_rank_states: ReshardFn = default_reshard_rank_states,
    verify: bool = True,
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
        verify: check every file against the manifest first (:func:`verify_checkpoint`);
            False only for a path just verified (e.g. by :func:`select_checkpoint`), or to
            load a damaged checkpoint deliberately.

    Returns:
        The step, metadata and this rank's loader state.

    Raises:
        FileNotFoundError: ``path`` is not a complete checkpoint.
        CheckpointCorruptError: a file is missing or differs from the manifest.
    """
    if not is_complete(path):
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {COMPLETE} marker)")
    if verify:
        require_verified(path, process_group)
    info = read_checkpoint_info(path)
    if model is not None:
        _load_tensors(path, info, model, optimizer, process_group)
    rank, world = get_rank(process_group), get_world_size(process_group)
    with open(os.path.join(path, "ranks.json")) as fh:
        saved_states: RankStates = json.load(fh)["states"]
    new_states = reshard_rank_states(saved_states, world)
    if restore_rng:
        _restore_rng(path, int(info["step"]), rank)
    return CheckpointState(
        path=path,
        step=int(info["step"]),
        metadata=info.get("metadata", {}),
        rank_state=new_states[rank] if rank < len(new_states) else None,
        saved_world_size=int(info["world_size"]),
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

    def __init__(
        self, root: str, keep_last: int = 3, best_metric: Optional[str] = None, mode: str = "max"
    ) -> None:
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
        """The newest complete checkpoint (not verified: see :meth:`resume_path`)."""
        return latest_checkpoint(self.root)

    def resume_path(self, resume: str, process_group: Optional[dist.ProcessGroup] = None) -> Optional[str]:
        """The verified checkpoint to resume from; collective over the group.

        Args:
            resume: ``"auto"`` (the newest checkpoint that verifies, see
                :func:`select_checkpoint`; None if there is none), ``"never"`` (None) or a
                checkpoint path (verified).

        Raises:
            CheckpointCorruptError: the given checkpoint, or with ``"auto"`` every checkpoint,
                fails verification.
        """
        if resume == "never":
            return None
        if resume == "auto":
            path = select_checkpoint(self.root, process_group)
        elif not is_complete(resume):
            raise FileNotFoundError(f"{resume}: not a complete checkpoint (no {COMPLETE} marker)")
        else:
            require_verified(resume, process_group)
            path = resume
        if path is not None:
            step = int(read_checkpoint_info(path)["step"])
            best_file = os.path.join(self.root, "BEST")
            _on_rank0(
                lambda: self._rewind_best(step),
                process_group,
                lambda e: write_error(best_file, self.root, e, "the record"),
            )
        return path

    def _rewind_best(self, step: int) -> None:
        """Makes ``BEST`` name the best checkpoint at or before ``step``: a run resuming there
        (from an older checkpoint than the newest) abandons the later ones' validations."""
        path = os.path.join(self.root, "BEST")
        try:
            with open(path) as fh:
                record = json.load(fh)
        except FileNotFoundError:
            return
        if int(record.get("step", -1)) <= step:
            return
        best: Optional[Dict[str, Any]] = None
        for saved, ckpt in list_checkpoints(self.root):
            try:
                metric = (
                    read_checkpoint_info(ckpt).get("metadata", {}).get("metric") if saved <= step else None
                )
            except (OSError, ValueError):  # unverified older checkpoint: not a candidate
                metric = None
            if metric and metric.get("value") is not None and self._better(metric["value"], best):
                best = {
                    "name": os.path.basename(ckpt),
                    "step": saved,
                    "metric": self.best_metric,
                    "value": metric["value"],
                }
        if best is None:
            os.remove(path)
        else:
            write_json(path, best)
        logger.warning(
            "%s: step %s is after the resumed step %d; best is now %s",
            path,
            record.get("step"),
            step,
            f"step {best['step']}" if best else "none",
        )

    def _better(self, value: float, old: Optional[Dict[str, Any]]) -> bool:
        if not math.isfinite(value):  # a NaN/inf score is never the best, whoever calls
            return False
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
            self.root,
            step,
            model,
            optimizer,
            rank_state=rank_state,
            metadata=meta,
            process_group=process_group,
        )

        def record_best_and_prune() -> None:
            nonlocal best
            if metric_value is not None and self._better(metric_value, best):
                best = {
                    "name": os.path.basename(path),
                    "step": step,
                    "metric": self.best_metric,
                    "value": metric_value,
                }
                write_json(os.path.join(self.root, "BEST"), best)
                best["path"] = path
            if self.keep_last > 0:
                prune_checkpoints(self.root, self.keep_last, [best["path"]] if best else [])

        # The checkpoint itself is complete here; BEST (written atomically) may not be.
        best_file = os.path.join(self.root, "BEST")
        _on_rank0(
            record_best_and_prune,
            process_group,
            lambda e: write_error(best_file, self.root, e, "the record"),
        )
        return path
