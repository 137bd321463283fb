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
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import itertools
import math
import os
import random
import time
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Iterator, Mapping, Optional, Protocol, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from mtfm_rec.config import Config
from mtfm_rec.data.batch import Batch
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.training.logger import RunLogger, plot_curves
from mtfm_rec.training.sharding import (
    DistInfo,
    copy_full_state,
    describe_plan,
    init_distributed,
    make_optimizer,
    shard_model,
)

if TYPE_CHECKING:
    from mtfm_rec.training.checkpoint import CheckpointManager

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


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


class _TrackedIterator:
    """Endless iterator over a loader's epochs that records the loader state after each batch.

    Also measures the time spent waiting for the loader (``wait_s``), the data-loading share of
    the step time.
    """

    def __init__(self, loader: Loader) -> None:
        self.loader = loader
        self._it: Optional[Iterator[Batch]] = None
        self.pending: Deque[Tuple[Dict[str, Any], int]] = collections.deque()
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
            raise RuntimeError("the training split yields no batches")
        self.pending.append((copy.deepcopy(self.loader.state_dict()), int(batch.batch_size)))
        self.wait_s += time.perf_counter() - start
        return batch

    def pop(self) -> Tuple[Dict[str, Any], int]:
        """Loader state after, and sample count of, the oldest batch not yet trained on."""
        return self.pending.popleft()


class Trainer:
    """Builds the data, the sharded model and the optimizer from a :class:`Config`.

    Args:
        config: the job.
        model_fn: schema -> an unsharded model on the CPU with ``forward(batch) -> (loss,
            {scenario: probs [n_s, n_tasks]})``; default ``MTFM(schema, config.model)``.
        loader_fn: split -> this rank's loader; default ``mtfm_rec.data.loader``.
        schema: the dataset schema when ``loader_fn`` is given (no ``data.raw`` needed).
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
        self.info = init_distributed(tcfg)
        seed_everything(tcfg.seed, tcfg.deterministic)
        self.run_dir = tcfg.run_dir
        if self.info.is_main:
            os.makedirs(self.run_dir, exist_ok=True)

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
        self._loader_state = copy.deepcopy(self.train_loader.state_dict())
        self._resume_checked = False
        self._saved_step = -1
        self._pipeline: Optional[TrainPipelineSparseDist] = None
        self._iter: Optional[_TrackedIterator] = None
        self.logger = RunLogger(self.run_dir, enabled=self.info.is_main, tensorboard=tcfg.tensorboard)
        self.perf: Dict[str, float] = {}

    # ------------------------------------------------------------------ data and model
    def _prepare_data(self) -> Tuple[DatasetSchema, str]:
        """Aggregates ``data.raw`` once (rank 0; the others wait), resolves the split times."""
        from mtfm_rec.data.aggregate import ensure_aggregated

        dcfg = self.config.data
        if not dcfg.raw:
            raise ValueError("data.raw is not set: pass data.raw=<dataset root>")
        if self.info.is_main:
            dataset_dir = ensure_aggregated(dcfg.raw, dcfg.cache_dir, dcfg.aggregation)
        dist.barrier()
        if not self.info.is_main:
            dataset_dir = ensure_aggregated(dcfg.raw, dcfg.cache_dir, dcfg.aggregation)
        schema = DatasetSchema.load(dataset_dir)
        for key in ("eval_after", "valid_after"):
            if getattr(dcfg, key) is None and schema.extra.get(f"recommended_{key}") is not None:
                setattr(dcfg, key, int(schema.extra[f"recommended_{key}"]))
                log0(self.info, f"data.{key} unset: using the dataset's recommended_{key}={getattr(dcfg, key)}")
        log0(self.info, f"data: {dcfg.raw} -> {dataset_dir}; eval_after={dcfg.eval_after} valid_after={dcfg.valid_after}")
        return schema, dataset_dir

    def _default_loader(self, split: str) -> Loader:
        from mtfm_rec.data.loader import ResumableLoader

        assert self.dataset_dir is not None
        return ResumableLoader.from_config(
            self.dataset_dir,
            self.config.data,
            split=split,
            rank=self.info.rank,
            world_size=self.info.world_size,
            schema=self.schema,
        )

    def _default_model(self, schema: DatasetSchema) -> nn.Module:
        from mtfm_rec.model.mtfm import MTFM

        return MTFM(schema, self.config.model)

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
        """
        tcfg = self.config.train
        self.maybe_resume()
        start_step = self.step
        self.model.train()
        self._iter = _TrackedIterator(self.train_loader)
        self._pipeline = self._make_pipeline() if tcfg.pipeline else None
        self._feed: Iterator[Batch] = self._iter
        if self.step >= tcfg.max_steps:
            log0(self.info, f"already at step {self.step} >= max_steps={tcfg.max_steps}: nothing to train")
        pbar = self._progress_bar()
        device = self.info.device
        loss_sum = torch.zeros((), device=device)
        window_steps, window_samples = 0, 0
        t_start = time.perf_counter()
        t_window, wait_window, eval_window = t_start, 0.0, 0.0  # eval time is not step time
        run_samples, run_wait, run_eval = 0, 0.0, 0.0
        stop = self.stopped_early
        while self.step < tcfg.max_steps and not stop:
            loss = self._train_step()
            loss_sum += loss
            self._loader_state, samples = self._iter.pop()
            self.step += 1
            window_steps += 1
            window_samples += samples
            if pbar is not None:
                pbar.update(1)
            over_budget = tcfg.max_minutes > 0 and (time.perf_counter() - t_start) > 60 * tcfg.max_minutes
            # alone, stop at the step the budget runs out; with peers, at the next log step,
            # where all ranks vote (so all stop at the same step without an extra sync)
            last = self.step >= tcfg.max_steps or (over_budget and self.info.world_size == 1)
            if self.step % tcfg.log_every == 0 or last:
                now = time.perf_counter()
                wait = self._iter.wait_s - wait_window
                # the one read-back of the window: loss, samples and the stop vote of all ranks
                stats = torch.stack(
                    [loss_sum, torch.tensor(float(window_samples), device=device), torch.tensor(float(over_budget), device=device)]
                )
                dist.all_reduce(stats)
                mean_loss, global_samples, votes = (float(x) for x in stats.cpu())
                mean_loss /= window_steps * self.info.world_size
                elapsed = now - t_window - eval_window
                self.samples_seen += int(global_samples)
                run_samples += int(global_samples)
                run_wait += wait
                scalars = {
                    "train/loss": mean_loss,
                    "perf/samples_per_s": global_samples / max(elapsed, 1e-9),
                    "perf/data_wait_share": wait / max(elapsed, 1e-9),
                    "train/samples_seen": self.samples_seen,
                }
                self.logger.log(self.step, scalars)
                if pbar is not None:
                    pbar.set_postfix(loss=f"{mean_loss:.4f}", samples_s=f"{scalars['perf/samples_per_s']:.0f}")
                loss_sum.zero_()
                window_steps, window_samples = 0, 0
                t_window, wait_window, eval_window = now, self._iter.wait_s, 0.0
                if votes > 0:
                    log0(self.info, f"time budget of {tcfg.max_minutes} min reached at step {self.step}")
                    stop = True
            if tcfg.eval_every and self.step % tcfg.eval_every == 0 and not last:
                t_eval = time.perf_counter()
                self._validate()  # also checkpoints
                eval_window += time.perf_counter() - t_eval
                run_eval += time.perf_counter() - t_eval
                stop = stop or self.stopped_early
            elif tcfg.checkpoint_every and self.step % tcfg.checkpoint_every == 0 and not last and not stop:
                self.save_checkpoint()
        if window_steps:  # stopped between log steps (early stopping): count the samples
            stats = torch.tensor([float(window_samples)], device=device)
            dist.all_reduce(stats)
            self.samples_seen += int(stats.item())
            run_samples += int(stats.item())
        total = time.perf_counter() - t_start - run_eval
        if pbar is not None:
            pbar.close()
        if self._pipeline is not None:
            self._pipeline.detach()
            self._pipeline = None
        if self.step > start_step or not self.checkpoints.latest():
            if tcfg.eval_every and not self.stopped_early:
                self._validate()  # the last step is a candidate for best too; checkpoints
            elif self._saved_step != self.step:
                self.save_checkpoint()
        self.perf = {
            "samples_per_s": run_samples / max(total, 1e-9),
            "data_wait_share": run_wait / max(total, 1e-9),
            "seconds": total,
        }
        self.perf.update(self._peak_memory())
        log0(
            self.info,
            f"fit: step {self.step}, {self.samples_seen} samples, {self.perf['samples_per_s']:.0f} samples/s, "
            f"data wait {100 * self.perf['data_wait_share']:.1f}% of step time",
        )
        if self.best is not None and self.best["step"] != self.step:
            self.load_best()  # evaluation after fit() uses the best validation model
        return {"step": self.step, "samples_seen": self.samples_seen, "best": self.best, **self.perf}

    def _peak_memory(self) -> Dict[str, float]:
        """Peak host RSS (and device memory on GPUs) in GiB, the maximum over ranks."""
        import resource

        values = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20]  # KiB on Linux
        if self.info.device.type == "cuda":
            values.append(torch.cuda.max_memory_allocated(self.info.device) / 2**30)
        peak = torch.tensor(values, dtype=torch.float64, device=self.info.device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        out = {"peak_host_rss_gb": float(peak[0])}
        if len(values) > 1:
            out["peak_device_memory_gb"] = float(peak[1])
        return out

    def _progress_bar(self) -> Any:
        tcfg = self.config.train
        if not (self.info.is_main and tcfg.progress_bar):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=tcfg.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)

    # ------------------------------------------------------------------ validation
    def _validate(self) -> float:
        """Evaluates on ``valid``, checkpoints with the score (the manager tracks the best) and
        updates early stopping; returns the score (higher is better)."""
        tcfg = self.config.train
        summary = summarize(self.evaluate("valid"))
        self.logger.log(self.step, {f"valid/{k}": v for k, v in summary.items()})
        key = tcfg.early_stopping_metric
        value = summary[key]
        score = -value if key == "logloss" else value
        log0(self.info, f"valid @ step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
        if self.best is None or score > self.best["score"]:
            self.best = {"step": self.step, "score": score, key: value}
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        if tcfg.early_stopping_patience and self.evals_without_improvement >= tcfg.early_stopping_patience:
            log0(self.info, f"early stopping at step {self.step} (best step {self.best['step']})")
            self.stopped_early = True
        self.save_checkpoint(metric_value=value)
        return score

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _eval_loop(self, split: str, save_predictions: Optional[str] = None) -> Metrics:
        from mtfm_rec.training.metrics import MetricAccumulator

        acc = MetricAccumulator(self.schema, save_predictions=save_predictions is not None)
        scenarios = [s.name for s in self.schema.scenarios]
        was_training = self.model.training
        if self._pipeline is not None:  # the pipeline rewrote the forwards; restore them
            self._pipeline.detach()
        self.model.eval()
        try:
            for batch in self._loader_fn(split):
                batch = batch.to(self.info.device, non_blocking=True)
                with torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=self.config.train.bf16):
                    _, out = self.model(batch)
                acc.update_batch(batch, {s: out[s].float() for s in scenarios})
        finally:
            self.model.train(was_training)
            if self._pipeline is not None:
                self._restart_pipeline()
        return acc.compute(predictions_path=save_predictions)

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
    @property
    def checkpoints(self) -> "CheckpointManager":
        from mtfm_rec.training.checkpoint import CheckpointManager

        tcfg = self.config.train
        mode = "min" if tcfg.early_stopping_metric == "logloss" else "max"
        return CheckpointManager(
            os.path.join(self.run_dir, "checkpoints"), tcfg.keep_checkpoints, f"valid/{tcfg.early_stopping_metric}", mode
        )

    def save_checkpoint(self, metric_value: Optional[float] = None) -> str:
        """Saves model, optimizer, loader position (of the last trained batch) and counters."""
        meta = {
            "samples_seen": self.samples_seen,
            "best": self.best,
            "evals_without_improvement": self.evals_without_improvement,
            "stopped_early": self.stopped_early,
            "world_size": self.info.world_size,
            "model_identity": self._model_identity(),
        }
        path = self.checkpoints.save(
            self.step, self.model, self.optimizer, rank_state=self._loader_state, metadata=meta, metric_value=metric_value
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
        from mtfm_rec.training.checkpoint import load_checkpoint

        path = self.checkpoints.latest() if mode == "auto" else mode
        if path is None:
            return False
        self._check_same_model(path)
        state = load_checkpoint(path, self.model, self.optimizer)
        meta = state.metadata
        self.step = state.step
        self.samples_seen = int(meta.get("samples_seen", 0))
        self.best = meta.get("best")
        self.evals_without_improvement = int(meta.get("evals_without_improvement", 0))
        self.stopped_early = bool(meta.get("stopped_early", False))
        loader_state = state.rank_state or {}
        if "resharded_from" in loader_state:
            self._reposition_loader(loader_state)
        else:
            self.train_loader.load_state_dict(loader_state)
        self._loader_state = copy.deepcopy(self.train_loader.state_dict())
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
        from mtfm_rec.training.checkpoint import read_checkpoint_info

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

    def _reposition_loader(self, state: Mapping[str, Any]) -> None:
        """Moves the train loader to the epoch and epoch fraction of a resharded state."""
        loader: Any = self.train_loader
        consumed = int(state["batches_in_epoch"]) * int(state["batch_size"]) * int(state["resharded_from"])
        per_batch = int(self.config.data.loader.batch_size) * self.info.world_size
        loader.set_epoch(int(state["epoch"]))
        loader.batches_in_epoch = min(len(loader), round(consumed / per_batch))
        log0(
            self.info,
            f"loader resharded from {state['resharded_from']} to {self.info.world_size} rank(s): "
            f"epoch {loader.epoch}, batch {loader.batches_in_epoch} of {len(loader)}",
        )

    def load_best(self) -> Optional[int]:
        """Loads the weights of the best validation step; returns that step (None if none)."""
        from mtfm_rec.training.checkpoint import load_checkpoint

        best = self.checkpoints.best()
        if best is None:
            return None
        load_checkpoint(best["path"], self.model, None, restore_rng=False)
        log0(self.info, f"loaded the best validation model: step {best['step']} ({best['metric']} {best['value']:.4f})")
        return int(best["step"])

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Closes the logs, draws the curves (rank 0) and leaves the process group we made."""
        self.logger.close()
        if self.config.train.plots and self.info.is_main:
            plot_curves(self.run_dir)
        if self.info.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def summarize(metrics: Metrics) -> Dict[str, float]:
    """Unweighted means over scenario x task of AUC, GAUC and logloss (NaNs skipped)."""
    out = {}
    for key in ("auc", "gauc", "logloss"):
        values = [m[key] for m in metrics.values() if m.get(key) is not None and not math.isnan(m[key])]
        out[key] = float(np.mean(values)) if values else float("nan")
    return out
