"""The Trainer: ``fit`` / ``evaluate`` / ``predict`` over a DMP-sharded model.

    trainer = Trainer(load_config("configs/ml1m_genre.yaml", ["data.raw=data/ml1m_genre"]))
    trainer.fit()                          # train (resumes from run_dir when train.resume=auto)
    test = trainer.evaluate("test")        # {"<scenario>/<task>": {"auc", "gauc", "logloss", "count"}}

A training step is driven by TorchRec's ``TrainPipelineSparseDist``: the host-to-device copy of
batch i+2, the input all-to-all of batch i+1 and the forward/backward of batch i overlap. The
step never reads a value back from the device: losses accumulate in a device tensor that is
reduced and read every ``train.log_every`` steps (the only sync, together with the stop
decision of the time budget, so all ranks stop at the same step).

The pipeline pulls batches ahead of the step that trains them, so the loader position saved in
a checkpoint is not the loader's current one: :class:`_TrackedIterator` remembers the loader
state after every batch it hands out, and a step pops the state of the batch it trained.

Nothing wrong is kept silently: a non-finite training loss, seen at a read-back (every
``train.log_every`` steps and at every checkpoint step), stops ``fit`` with
:class:`NonFiniteError` before the diverged state is saved; a split that cannot be trained
or validated on raises :class:`EmptySplitError` with the boundaries and the data's time range;
one ``run_dir`` serves one job at a time (:mod:`mtfm_rec.training.run_lock`).
docs/TRAINING.md ("Errors") lists every error.

Why one module of ~800 lines: the :class:`Trainer` is one object, a run's lifecycle (build,
fit, validate, checkpoint and resume, close) over state its methods share (model, optimizer,
pipeline, loader positions, counters); every part that stands on its own lives beside it
(``run_checks``, ``throughput``, ``checkpoint``, ``distributed``, ``optimizers``, ``rng``).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import itertools
import json
import math
import os
import time
from typing import (
    Any,
    Callable,
    Deque,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Protocol,
    Tuple,
)

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from tqdm.auto import tqdm

from mtfm_rec.config import Config, ConfigError
from mtfm_rec.data.aggregate import ensure_aggregated
from mtfm_rec.data.batch import Batch
from mtfm_rec.data.config import check_split_boundaries, fill_recommended_splits
from mtfm_rec.data.loader import ResumableLoader
from mtfm_rec.data.mixture import MixtureLoader, train_loader_from_config
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.model.zoo import build_model
from mtfm_rec.training.checkpoint import CheckpointManager, load_checkpoint, read_checkpoint_info
from mtfm_rec.training.distributed import DistInfo, init_distributed
from mtfm_rec.training.logger import RunLogger, plot_curves
from mtfm_rec.training.metrics import MetricAccumulator, NonFiniteError
from mtfm_rec.training.optimizers import make_optimizer
from mtfm_rec.training.rng import seed_everything
from mtfm_rec.training.run_checks import (
    EmptySplitError,
    check_start,
    describe_time_range,
    filled_note,
    split_rule,
)
from mtfm_rec.training.run_lock import RunDirLockedError, RunLock
from mtfm_rec.training.schedule import LRSchedule
from mtfm_rec.training.sharding import copy_full_state, describe_plan, shard_model
from mtfm_rec.training.throughput import (
    ThroughputWindow,
    WindowStats,
    flop_counter,
    global_peak_gflops,
    peak_memory,
)

Metrics = Dict[str, Dict[str, float]]  # "<scenario>/<task>" -> {"auc", "gauc", "logloss", "count"}


class Loader(Protocol):
    """What the trainer needs from a loader (``mtfm_rec.data.loader`` provides it)."""

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...


ModelFn = Callable[[DatasetSchema], nn.Module]
LoaderFn = Callable[[str], Loader]  # split name -> this rank's loader of that split


def log0(info: DistInfo, *parts: Any) -> None:
    if info.is_main:
        print("[train]", *parts, flush=True)


class _TrackedIterator:
    """Endless iterator over a loader's epochs that records the loader state after each batch.

    Also measures the time spent waiting for the loader (``wait_s``), the data-loading share of
    the step time, and counts each batch's model FLOPs with ``count`` while the batch is still
    on the host (NaN without a counter).
    """

    def __init__(
        self,
        loader: Loader,
        explain: Optional[Callable[[], str]] = None,
        count: Optional[Callable[[Batch], float]] = None,
    ) -> None:
        self.loader = loader
        self.explain = explain  # the message when the split yields no batch at all
        self.count = count
        self._it: Optional[Iterator[Batch]] = None
        self.pending: Deque[Tuple[Dict[str, Any], int, float]] = collections.deque()
        self.wait_s = 0.0
        self.epochs_started = 0

    def __iter__(self) -> "_TrackedIterator":
        return self

    def __next__(self) -> Batch:
        start = time.perf_counter()
        batch = None
        for _ in range(2):  # an exhausted epoch starts the next one, once
            if self._it is None:
                self._it = iter(self.loader)
                self.epochs_started += 1
            try:
                batch = next(self._it)
                break
            except StopIteration:
                self._it = None
        if batch is None:
            raise EmptySplitError(self.explain() if self.explain else "the training split yields no batches")
        state = copy.deepcopy(self.loader.state_dict())
        self.wait_s += time.perf_counter() - start
        flops = self.count(batch) if self.count is not None else math.nan
        self.pending.append((state, int(batch.batch_size), flops))
        return batch

    def pop(self) -> Tuple[Dict[str, Any], int, float]:
        """Loader state after, sample count and training-step FLOPs (NaN: not counted) of the
        oldest batch not yet trained on."""
        return self.pending.popleft()


class Trainer:
    """Builds the data, the sharded model and the optimizer from a :class:`Config`.

    Args:
        config: the job.
        model_fn: schema -> an unsharded model on the CPU with ``forward(batch) -> (loss,
            {scenario: probs [n_s, n_tasks]})``; default ``build_model(schema, config.model)``
            (MTFM or the baseline ``model.name`` names).
        loader_fn: split -> this rank's loader; default ``mtfm_rec.data.loader``.
        schema: the dataset schema when ``loader_fn`` is given (no ``data.raw`` needed).

    Raises:
        ConfigError: ``train.run_dir`` is a file, ``train.device=cuda`` without a GPU,
            ``train.resume`` names no complete checkpoint, inconsistent split boundaries.
        RunDirLockedError: another live job holds ``train.run_dir`` (held from here to
            :meth:`close`; rank 0 holds it, every rank raises).
        EmptySplitError: the training split yields no batches.
    """

    def __init__(
        self,
        config: Config,
        model_fn: Optional[ModelFn] = None,
        loader_fn: Optional[LoaderFn] = None,
        schema: Optional[DatasetSchema] = None,
    ) -> None:
        self.config = config
        tcfg = config.train
        check_start(config)  # before any collective: every rank refuses alike
        self.info = init_distributed(tcfg)
        seed_everything(tcfg.seed, tcfg.deterministic)
        self.run_dir = tcfg.run_dir
        if self.info.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
        self._lock: Optional[RunLock] = None
        try:
            self._lock = self._lock_run_dir()
            self._build(model_fn, loader_fn, schema)
        except BaseException:
            self._abandon()
            raise

    def _build(
        self, model_fn: Optional[ModelFn], loader_fn: Optional[LoaderFn], schema: Optional[DatasetSchema]
    ) -> None:
        """Data, sharded model, optimizer and counters (the part of ``__init__`` under the lock)."""
        config, tcfg = self.config, self.config.train
        self.dataset_dir: Optional[str] = None
        if loader_fn is None:
            self.schema, self.dataset_dir = self._prepare_data()
            loader_fn = self._default_loader
        elif schema is None:
            raise ValueError("Trainer: pass the schema together with loader_fn")
        else:
            self.schema = schema
        self._loader_fn = loader_fn

        # Initial values come from one CPU model built under the seed, then are copied into the
        # shards: the start is the same on any number of ranks and any plan.
        torch.manual_seed(tcfg.seed)
        model = (model_fn or self._default_model)(self.schema)
        init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.model, self.plan = shard_model(model, self.info, tcfg, config.data.loader.batch_size)
        copy_full_state(self.model, init_state)
        del init_state
        self.optimizer = make_optimizer(self.model, tcfg)
        self.schedule = LRSchedule(
            self.optimizer,
            tcfg.max_steps,
            tcfg.lr_warmup_steps,
            tcfg.lr_decay,
            tcfg.lr_min_ratio,
            tcfg.lr_step_every,
            tcfg.lr_step_gamma,
        )
        if tcfg.sharding.print_plan:
            log0(self.info, f"sharding plan ({self.info.world_size} rank(s), {self.info.backend}):")
            log0(self.info, describe_plan(self.plan))
        n_params = sum(p.numel() for p in model.parameters())
        log0(self.info, f"model: {type(model).__name__}, {n_params / 1e6:.2f} M parameters (unsharded)")

        self.step = 0
        self.samples_seen = 0  # global, over all ranks
        self.best: Optional[Dict[str, Any]] = None  # {"step", "score", <metric>: value} on valid
        self.evals_without_improvement = 0
        self.stopped_early = False
        self.train_loader = self._loader_fn("train")
        self._require_batches(self.train_loader, "train")
        if isinstance(self.train_loader, MixtureLoader):
            parts = ", ".join(f"{name} {src.num_batches()}" for name, src in self.train_loader.sources)
            log0(self.info, f"train epoch: {len(self.train_loader)} batches per rank ({parts})")
        self._loader_state = copy.deepcopy(self.train_loader.state_dict())
        self._resume_checked = False
        self._saved_step = -1
        self._pipeline: Optional[TrainPipelineSparseDist] = None
        self._iter: Optional[_TrackedIterator] = None
        self._feed: Iterator[Batch]  # what the pipeline pulls from; set by fit
        self.logger = RunLogger(self.run_dir, enabled=self.info.is_main, tensorboard=tcfg.tensorboard)
        self.checkpoints = CheckpointManager(
            os.path.join(self.run_dir, "checkpoints"),
            tcfg.keep_checkpoints,
            f"valid/{tcfg.early_stopping_metric}",
            "min" if tcfg.early_stopping_metric == "logloss" else "max",
        )
        self.perf: Dict[str, float] = {}
        self._count_flops = flop_counter(model)

    # ------------------------------------------------------------------ run directory lock
    def _lock_run_dir(self) -> Optional[RunLock]:
        """Rank 0 takes ``<run_dir>/run.lock``; every rank raises if it could not: a
        :class:`RunDirLockedError` when another job holds it, a ``ConfigError`` when the
        directory does not allow a lock (permissions, a read-only file system)."""
        lock, error = None, None  # error: (class name, message), broadcast to every rank
        if self.info.is_main:
            try:
                lock = RunLock(self.run_dir, log=lambda msg: log0(self.info, msg)).acquire()
            except RunDirLockedError as exc:
                if self.info.world_size == 1:
                    raise
                error = ("RunDirLockedError", str(exc))
            except OSError as exc:
                error = (
                    "ConfigError",
                    f"train.run_dir={self.run_dir!r}: cannot take the run lock there: {exc}",
                )
        if self.info.world_size > 1:  # the others must not go on without rank 0's lock
            box: List[Optional[Tuple[str, str]]] = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise (ConfigError if error[0] == "ConfigError" else RunDirLockedError)(error[1])
        return lock

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _abandon(self) -> None:
        """Cleanup of a failed ``__init__``: the lock and the process group we made."""
        self._release_lock()
        if self.info.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ data and model
    def _prepare_data(self) -> Tuple[DatasetSchema, str]:
        """Aggregates ``data.raw`` once (rank 0; the others wait), resolves the split times."""

        dcfg = self.config.data
        if not dcfg.raw:
            raise ValueError("data.raw is not set: pass data.raw=<dataset root>")
        if self.info.is_main:
            dataset_dir = ensure_aggregated(dcfg.raw, dcfg.cache_dir, dcfg.aggregation)
        dist.barrier()
        if not self.info.is_main:
            dataset_dir = ensure_aggregated(dcfg.raw, dcfg.cache_dir, dcfg.aggregation)
        schema = DatasetSchema.load(dataset_dir)
        filled = fill_recommended_splits(dcfg, schema.extra)
        for key in filled:
            log0(self.info, f"data.{key} unset: using the dataset's recommended_{key}={getattr(dcfg, key)}")
        try:
            check_split_boundaries(dcfg.eval_after, dcfg.valid_after, filled_note(filled))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        log0(
            self.info,
            f"data: {dcfg.raw} -> {dataset_dir}; eval_after={dcfg.eval_after} valid_after={dcfg.valid_after}",
        )
        return schema, dataset_dir

    def _default_loader(self, split: str) -> Loader:

        assert self.dataset_dir is not None
        if split == "train":  # with the extra passes of data.loader.extra_passes, if any
            return train_loader_from_config(
                self.dataset_dir,
                self.config.data,
                rank=self.info.rank,
                world_size=self.info.world_size,
                schema=self.schema,
            )
        return ResumableLoader.from_config(
            self.dataset_dir,
            self.config.data,
            split=split,
            rank=self.info.rank,
            world_size=self.info.world_size,
            schema=self.schema,
        )

    def _default_model(self, schema: DatasetSchema) -> nn.Module:

        return build_model(schema, self.config.model)

    def _split_report(self, split: str, problem: str = "yields no batches", loader: Any = None) -> str:
        """Why ``split`` is empty: the boundaries, the split's size and the data's time range."""
        dcfg = self.config.data
        parts = [
            f"the {split} split {problem}: data.valid_after={dcfg.valid_after}, "
            f"data.eval_after={dcfg.eval_after} "
            f"({split_rule(split, dcfg.eval_after, dcfg.valid_after)})"
        ]
        samples = getattr(getattr(loader, "dataset", None), "num_samples", None)
        if samples is not None:
            parts.append(
                f"{samples} samples of it for {self.info.world_size} rank(s) x "
                f"data.loader.batch_size={dcfg.loader.batch_size}"
            )
        if self.dataset_dir is not None:
            parts.append(
                describe_time_range(self.dataset_dir, self.schema, dcfg.eval_after, dcfg.valid_after)
            )
        else:
            parts.append("the data's time range is unknown here (a custom loader_fn)")
        return "; ".join(parts)

    def _require_batches(self, loader: Loader, split: str, note: str = "") -> None:
        """Raises :class:`EmptySplitError` when ``loader`` has no batches (same on all ranks)."""
        if hasattr(loader, "__len__") and len(loader) == 0:  # type: ignore[arg-type]
            raise EmptySplitError(self._split_report(split, loader=loader) + note)

    def _validation_note(self) -> str:
        tcfg = self.config.train
        stop = f" and stops early on it (train.early_stopping_patience={tcfg.early_stopping_patience})"
        return (
            f". train.eval_every={tcfg.eval_every} validates to choose the best model"
            f"{stop if tcfg.early_stopping_patience else ''}: fix the split boundaries, "
            "or set train.eval_every=0"
        )

    # ------------------------------------------------------------------ the step
    def _forward(self, batch: Batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
        """Model forward under the optional bf16 autocast; the output carries the detached loss."""
        with torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=self.config.train.bf16):
            loss, preds = self.model(batch)
        loss = loss.float()
        return loss, (loss.detach(), preds)

    def _make_pipeline(self) -> TrainPipelineSparseDist:
        return TrainPipelineSparseDist(
            self.model,
            self.optimizer,
            self.info.device,
            execute_all_batches=True,
            custom_model_fwd=self._forward,
        )

    def _restart_pipeline(self) -> None:
        """A fresh pipeline fed first with the old one's in-flight batches.

        Evaluation runs the model outside the pipeline; re-attaching a pipeline whose next
        batches already started their input all-to-all desynchronises the ranks' collectives,
        so the batches it had pulled ahead (already on the device, their loader states already
        recorded) are handed to a new pipeline instead, in order: no batch is dropped or
        repeated.
        """
        assert self._pipeline is not None and self._iter is not None
        in_flight = list(self._pipeline.batches)
        self._pipeline.detach()
        self._pipeline = self._make_pipeline()
        self._feed = itertools.chain(in_flight, self._iter)

    def _train_step(self) -> torch.Tensor:
        """One optimizer step; returns the (device, detached) loss of the step's batch."""
        assert self._iter is not None
        if self._pipeline is not None:
            loss, _ = self._pipeline.progress(self._feed)
            return loss
        batch = next(self._iter).to(self.info.device, non_blocking=True)
        self.optimizer.zero_grad()
        loss, (detached, _) = self._forward(batch)
        loss.backward()
        self.optimizer.step()
        return detached

    # ------------------------------------------------------------------ fit
    def fit(self) -> Dict[str, Any]:
        """Trains until ``max_steps``, the time budget or early stopping.

        Returns a summary: steps, samples seen, the best validation step and throughput figures.

        Raises:
            NonFiniteError: the training loss (or a validation prediction) is NaN or infinite;
                nothing of the diverged state is saved and every earlier checkpoint is kept.
            EmptySplitError: validation is on (``train.eval_every``) but the valid split is empty.
        """
        tcfg = self.config.train
        if tcfg.eval_every:  # validation chooses the best model: it must have something to score
            self._require_batches(self._loader_fn("valid"), "valid", self._validation_note())
        self.maybe_resume()
        self.logger.resume_from(self.step)  # log.csv keeps each step once (drops a killed run's later rows)
        start_step = self.step
        self.model.train()
        self._iter = _TrackedIterator(
            self.train_loader,
            lambda: self._split_report("train", loader=self.train_loader),
            self._count_flops,
        )
        self._pipeline = self._make_pipeline() if tcfg.pipeline else None
        self._feed = self._iter
        if self.step >= tcfg.max_steps:
            log0(self.info, f"already at step {self.step} >= max_steps={tcfg.max_steps}: nothing to train")
        peak = (
            self._global_peak_gflops()
            if self._count_flops is not None and self.step < tcfg.max_steps
            else math.nan
        )
        pbar = self._progress_bar()
        window = ThroughputWindow(self.step + 1, self.info.device, self.info.world_size)
        stop = self.stopped_early
        while self.step < tcfg.max_steps and not stop:
            lr_factor = self.schedule.apply(self.step + 1) if self.schedule.active else 1.0
            loss = self._train_step()
            self._loader_state, samples, flops = self._iter.pop()
            self.step += 1
            window.add(loss, samples, flops)
            if pbar is not None:
                pbar.update(1)
            over_budget = (
                tcfg.max_minutes > 0 and (time.perf_counter() - window.t_start) > 60 * tcfg.max_minutes
            )
            # alone, stop at the step the budget runs out; with peers, at the next log step,
            # where all ranks vote (so all stop at the same step without an extra sync)
            last = self.step >= tcfg.max_steps or (over_budget and self.info.world_size == 1)
            # a checkpoint step (validation saves one) closes the window too: its samples_seen
            # counts every trained step
            saves = any(n and self.step % n == 0 for n in (tcfg.checkpoint_every, tcfg.eval_every))
            if self.step % tcfg.log_every == 0 or last or saves:
                if self._log_window(window, over_budget, lr_factor, peak, pbar):
                    log0(self.info, f"time budget of {tcfg.max_minutes} min reached at step {self.step}")
                    stop = True
            stop = self._validate_or_checkpoint(window, last, stop)
        if window.steps:  # stopped between log steps (early stopping): count the samples
            self._count_window(window.close(self._iter.wait_s))
        if pbar is not None:
            pbar.close()
        return self._finish_fit(start_step, window, peak)

    def _count_window(self, stats: WindowStats) -> None:
        """Refuses a diverged window (before anything saves its state), then counts its samples."""
        self._stop_if_diverged(stats.mean_loss, stats.first_step)
        self.samples_seen += stats.samples

    def _log_window(
        self, window: ThroughputWindow, over_budget: bool, lr_factor: float, peak: float, pbar: Any
    ) -> bool:
        """Closes the window (its one read-back), logs it; returns whether a rank ran out of time."""
        assert self._iter is not None
        stats = window.close(self._iter.wait_s, over_budget)
        self._count_window(stats)
        scalars = {
            "train/loss": stats.mean_loss,
            **window.scalars(stats, peak),
            "train/samples_seen": self.samples_seen,
            "train/lr_factor": lr_factor,
        }
        self.logger.log(self.step, scalars)
        if pbar is not None:
            mfu = {"mfu": f"{100 * scalars['perf/mfu']:.2f}%"} if "perf/mfu" in scalars else {}
            pbar.set_postfix(
                loss=f"{stats.mean_loss:.4f}", samples_s=f"{scalars['perf/samples_per_s']:.0f}", **mfu
            )
        return stats.budget_votes > 0

    def _validate_or_checkpoint(self, window: ThroughputWindow, last: bool, stop: bool) -> bool:
        """Validates (which checkpoints) or checkpoints at their intervals, except at the last
        step (``fit`` ends with both); returns whether to stop (early stopping)."""
        tcfg = self.config.train
        if tcfg.eval_every and self.step % tcfg.eval_every == 0 and not last:
            t_eval = time.perf_counter()
            self._validate()  # also checkpoints
            window.add_eval(time.perf_counter() - t_eval)
            return stop or self.stopped_early
        if tcfg.checkpoint_every and self.step % tcfg.checkpoint_every == 0 and not last and not stop:
            self.save_checkpoint()
        return stop

    def _finish_fit(self, start_step: int, window: ThroughputWindow, peak: float) -> Dict[str, Any]:
        """The end of ``fit``: the last validation or checkpoint, the throughput summary, and the
        best validation model loaded for what follows."""
        tcfg = self.config.train
        perf = window.summary(peak)  # before the last validation: training time only
        if self._pipeline is not None:
            self._pipeline.detach()
            self._pipeline = None
        if self.step > start_step or not self.checkpoints.latest():
            if tcfg.eval_every and not self.stopped_early:
                self._validate()  # the last step is a candidate for best too; checkpoints
            elif self._saved_step != self.step:
                self.save_checkpoint()
        self.perf = {**perf, **peak_memory(self.info.device)}
        mfu = f", MFU {100 * self.perf['mfu']:.2f}% of {peak:.0f} GFLOP/s" if "mfu" in self.perf else ""
        log0(
            self.info,
            f"fit: step {self.step}, {self.samples_seen} samples, "
            f"{self.perf['samples_per_s']:.0f} samples/s, "
            f"data wait {100 * self.perf['data_wait_share']:.1f}% of step time{mfu}",
        )
        if self.best is not None and self.best["step"] != self.step:
            self.load_best()  # evaluation after fit() uses the best validation model
        return {"step": self.step, "samples_seen": self.samples_seen, "best": self.best, **self.perf}

    def _stop_if_diverged(self, mean_loss: float, first: int) -> None:
        """Raises :class:`NonFiniteError` for a non-finite loss window (the value is all-reduced,
        so every rank raises), before anything saves the state: earlier checkpoints stay."""
        if math.isfinite(mean_loss):
            return
        self.logger.log(self.step, {"train/loss": mean_loss})  # the record shows where it broke
        latest = self.checkpoints.latest()
        kept = (
            f"the newest checkpoint, {latest}, is kept" if latest else "no checkpoint was written before it"
        )
        steps = f"step {first}" if first == self.step else f"steps {first}-{self.step}"
        raise NonFiniteError(
            f"train/loss is {mean_loss} at step {self.step}: the training loss became non-finite in {steps} "
            f"(it is read every train.log_every={self.config.train.log_every} steps "
            "and at every checkpoint). "
            f"Stopped without checkpointing this state; {kept}. Lower train.lr / train.embedding_lr or look "
            "for bad inputs in those steps, then resume"
        )

    def _global_peak_gflops(self) -> float:
        """The matmul peak of all ranks together (``train.peak_gflops`` x ranks, or measured)."""
        tcfg = self.config.train
        peak, seconds = global_peak_gflops(
            self.info.device, self.info.world_size, tcfg.peak_gflops, tcfg.bf16
        )
        if tcfg.peak_gflops <= 0:
            log0(
                self.info,
                f"matmul peak {peak:.0f} GFLOP/s over {self.info.world_size} rank(s) "
                f"({'bf16' if tcfg.bf16 else 'fp32'}, {torch.get_num_threads()} thread(s) on rank 0, "
                f"{seconds:.2f} s): the MFU denominator",
            )
        return peak

    def _progress_bar(self) -> Any:
        tcfg = self.config.train
        if not (self.info.is_main and tcfg.progress_bar):
            return None

        return tqdm(
            total=tcfg.max_steps,
            initial=self.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
        )

    # ------------------------------------------------------------------ validation
    def _validate(self) -> float:
        """Evaluates on ``valid``, checkpoints with the score (the manager tracks the best) and
        updates early stopping; returns the score (higher is better)."""
        tcfg = self.config.train
        metrics = self.evaluate("valid")
        if not any(m.get("count", 0) for m in metrics.values()):
            raise EmptySplitError(
                self._split_report("valid", "has no labelled exposures") + self._validation_note()
            )
        summary = summarize(metrics)
        self.logger.log(self.step, {f"valid/{k}": v for k, v in summary.items()})
        # and per scenario x task: the learning curves of the scaling analysis read them
        self.logger.log(
            self.step,
            {f"valid/{key}/{m}": float(v[m]) for key, v in metrics.items() for m in ("auc", "gauc")},
        )
        key = tcfg.early_stopping_metric
        value = summary[key]
        score = -value if key == "logloss" else value
        log0(self.info, f"valid @ step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
        if math.isnan(score):  # undefined, not bad: never the best, and no evidence for stopping
            needs = (
                "a user with positive and negative labels"
                if key == "gauc"
                else "positive and negative labels"
            )
            log0(
                self.info,
                f"valid {key} is NaN at step {self.step} "
                f"(undefined for every scenario/task: it needs {needs}): "
                "not a candidate for the best model, not counted by early stopping",
            )
        elif self.best is None or score > self.best["score"]:
            self.best = {"step": self.step, "score": score, key: value}
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        if tcfg.early_stopping_patience and self.evals_without_improvement >= tcfg.early_stopping_patience:
            best_step = self.best["step"] if self.best is not None else None
            log0(self.info, f"early stopping at step {self.step} (best step {best_step})")
            self.stopped_early = True
        self.save_checkpoint(metric_value=None if math.isnan(value) else value)
        return score

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _eval_loop(self, split: str, save_predictions: Optional[str] = None) -> Metrics:

        acc = MetricAccumulator(self.schema, save_predictions=save_predictions is not None)
        scenarios = [s.name for s in self.schema.scenarios]
        was_training = self.model.training
        if self._pipeline is not None:  # the pipeline rewrote the forwards; restore them
            self._pipeline.detach()
        self.model.eval()
        try:
            for batch in self._loader_fn(split):
                batch = batch.to(self.info.device, non_blocking=True)
                with torch.autocast(
                    self.info.device.type, dtype=torch.bfloat16, enabled=self.config.train.bf16
                ):
                    _, out = self.model(batch)
                acc.update_batch(batch, {s: out[s].float() for s in scenarios})
        finally:
            self.model.train(was_training)
            if self._pipeline is not None:
                self._restart_pipeline()
        try:
            return acc.compute(predictions_path=save_predictions)
        except NonFiniteError as exc:  # raised on every rank alike
            raise NonFiniteError(f"evaluating the {split} split at step {self.step}: {exc}") from exc

    def evaluate(self, split: str = "test") -> Metrics:
        """Exact AUC / GAUC / logloss per scenario x task of ``split``, over all ranks.

        Returns the same ``{"<scenario>/<task>": {"auc", "gauc", "logloss", "count", ...}}`` on
        every rank.
        """
        return self._eval_loop(split)

    def predict(self, split: str = "test", path: Optional[str] = None) -> Metrics:
        """:meth:`evaluate`, and rank 0 writes every prediction of ``split`` to Parquet
        (default ``<run_dir>/predictions.parquet``; columns scenario, task, user_id, ts, label,
        score)."""
        return self._eval_loop(split, path or os.path.join(self.run_dir, "predictions.parquet"))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """The trainer's own counters (torch's ``Stateful`` protocol): what a checkpoint keeps
        besides the model, the optimizer, the loader positions and the RNG states."""
        return {
            "samples_seen": self.samples_seen,
            "best": self.best,
            "evals_without_improvement": self.evals_without_improvement,
            "stopped_early": self.stopped_early,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict` (keys absent from older checkpoints keep their start values)."""
        self.samples_seen = int(state.get("samples_seen", 0))
        self.best = state.get("best")
        self.evals_without_improvement = int(state.get("evals_without_improvement", 0))
        self.stopped_early = bool(state.get("stopped_early", False))

    def save_checkpoint(self, metric_value: Optional[float] = None) -> str:
        """Saves model, optimizer, loader position (of the last trained batch) and counters."""
        meta = {
            **self.state_dict(),
            "world_size": self.info.world_size,
            "model_identity": self._model_identity(),
        }
        path = self.checkpoints.save(
            self.step,
            self.model,
            self.optimizer,
            rank_state=self._loader_state,
            metadata=meta,
            metric_value=metric_value,
        )
        self._saved_step = self.step
        return path

    def maybe_resume(self) -> bool:
        """Restores the newest complete checkpoint (``train.resume=auto``) or a given path.

        A checkpoint of another world size reshards: DCP reshards the tensors, and the loader
        restarts at the same epoch and the same fraction of it (ranks see the samples in another
        order on another world size, so that position is the nearest one, not an exact one).
        """
        mode = self.config.train.resume
        if mode == "never" or self._resume_checked:
            return False
        self._resume_checked = True  # once per Trainer: fit() after an explicit call is a no-op

        path = self.checkpoints.resume_path(mode)  # verified against its manifest, or raises
        if path is None:
            return False
        self._check_same_model(path)
        state = load_checkpoint(path, self.model, self.optimizer, verify=False)  # resume_path verified it
        self.step = state.step
        self.load_state_dict(state.metadata)
        loader_state = state.rank_state or {}
        self.train_loader.load_state_dict(loader_state)  # exact, or resharded (the loader says how)
        self._loader_state = copy.deepcopy(self.train_loader.state_dict())
        if "resharded_from" in loader_state:
            log0(
                self.info,
                f"loader resharded from {loader_state['resharded_from']} to {self.info.world_size} rank(s): "
                f"epoch {self._loader_state['epoch']}, batch {self._loader_state['batches_in_epoch']}",
            )
        log0(
            self.info,
            f"resumed from {path} (saved on {state.saved_world_size} rank(s)): step {self.step}, "
            f"{self.samples_seen} samples seen",
        )
        return True

    # Model keys that choose how the same function is computed, not what it is: a checkpoint
    # trained with Triton on a GPU resumes on the CPU's PyTorch path (older checkpoints did
    # record them; they are ignored on both sides).
    _IMPLEMENTATION_KEYS = ("attention_backend",)

    def _model_identity(self) -> Dict[str, Any]:
        """What a checkpoint's tensors depend on: the model config and the embedding tables."""
        model = dataclasses.asdict(self.config.model)
        for key in self._IMPLEMENTATION_KEYS:
            model.pop(key, None)
        return {
            "model": model,
            "tables": {name: rows for name, (rows, _) in self.schema.embedding_tables().items()},
        }

    def _check_same_model(self, path: str) -> None:
        """Refuses, with the differences, a checkpoint of another model or dataset schema."""

        saved = read_checkpoint_info(path).get("metadata", {}).get("model_identity")
        if saved is None:
            return  # written before identities were recorded: DCP still checks every shape
        current = json.loads(json.dumps(self._model_identity()))  # as stored: JSON types
        for key in self._IMPLEMENTATION_KEYS:
            saved.get("model", {}).pop(key, None)
        diffs = [
            f"{section}.{key}: checkpoint {saved[section].get(key)!r}, now {current[section].get(key)!r}"
            for section in ("model", "tables")
            for key in sorted(set(saved[section]) | set(current[section]))
            if saved[section].get(key) != current[section].get(key)
        ]
        if diffs:
            raise RuntimeError(
                f"{path} was written by another model or dataset schema, so train.resume="
                f"{self.config.train.resume!r} cannot continue it ({'; '.join(diffs[:5])}"
                f"{'; ...' if len(diffs) > 5 else ''}). Use a new train.run_dir, or "
                "train.resume=never to start over in this one."
            )

    def load_best(self) -> Optional[int]:
        """Loads the weights of the best validation step; returns that step (None if none)."""

        best = self.checkpoints.best()
        if best is None:
            return None
        load_checkpoint(best["path"], self.model, None, restore_rng=False)
        log0(
            self.info,
            f"loaded the best validation model: step {best['step']} ({best['metric']} {best['value']:.4f})",
        )
        return int(best["step"])

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Closes the logs, draws the curves (rank 0), leaves the process group we made and
        releases the run directory's lock."""
        try:
            self.logger.close()
            if self.config.train.plots and self.info.is_main:
                plot_curves(self.run_dir)
            if self.info.owns_group and dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()
        finally:
            self._release_lock()


def summarize(metrics: Metrics) -> Dict[str, float]:
    """Unweighted means over scenario x task of AUC, GAUC and logloss (NaNs skipped)."""
    out = {}
    for key in ("auc", "gauc", "logloss"):
        values = [m[key] for m in metrics.values() if m.get(key) is not None and not math.isnan(m[key])]
        out[key] = float(np.mean(values)) if values else float("nan")
    return out
