"""Training configuration: optimisation, parallelism, checkpoints, logging."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Tuple

from mtfm_rec.training.schedule import LR_DECAYS, LRDecay

# Enum-like fields are Literal types, so the YAML loader refuses other values naming the file and
# key (mtfm_rec.config_parsing); the tuples serve the checks of programmatic construction.
DenseParallel = Literal["ddp", "fsdp"]
EmbeddingOptimizer = Literal["auto", "adam", "adagrad", "rowwise_adagrad", "sgd"]
Device = Literal["auto", "cpu", "cuda"]
DistBackend = Literal["auto", "gloo", "nccl"]
EarlyStoppingMetric = Literal["auc", "gauc", "logloss"]
DENSE_PARALLEL: Tuple[str, ...] = typing.get_args(DenseParallel)
EMBEDDING_OPTIMIZERS: Tuple[str, ...] = typing.get_args(EmbeddingOptimizer)
DEVICES: Tuple[str, ...] = typing.get_args(Device)
DIST_BACKENDS: Tuple[str, ...] = typing.get_args(DistBackend)
EARLY_STOPPING_METRICS: Tuple[str, ...] = typing.get_args(EarlyStoppingMetric)
RESUME_MODES = ("auto", "never")  # or a checkpoint path: not a Literal
# Splits train.eval_splits may name: the loader's splits (mtfm_rec.data.splits.SPLITS, kept
# equal by a test; not imported so that loading a config needs no pyarrow).
EVAL_SPLITS = ("train", "valid", "test", "all")


@dataclass
class ShardingConfig:
    """How the TorchRec planner may shard the embedding tables.

    Table names are the batch's sparse feature keys (``seq/<q>/<f>``, ``exp/<s>/<g>/<c>``; see
    ``DatasetSchema.sparse_feature_keys``), or whatever names the model gives its tables.
    """

    # Sharding types the planner may choose from for every table (TorchRec names:
    # data_parallel, table_wise, row_wise, column_wise, table_row_wise, ...); empty = any.
    sharding_types: List[str] = field(default_factory=list)
    # Per table (exact name, or a prefix ending in "*"), the allowed types; overrides the above.
    table_sharding_types: Dict[str, List[str]] = field(default_factory=dict)
    # Compute kernels the planner may use (fused, dense, ...); empty = planner's choice.
    compute_kernels: List[str] = field(default_factory=list)
    print_plan: bool = True  # print the sharding plan on rank 0 at start


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    # ---- optimisation (paper 4.1.3: Adam, lr 3e-4)
    lr: float = 3e-4  # dense Adam
    weight_decay: float = 0.0
    # fused into backward: auto (adam on GPU, adagrad on CPU: FBGEMM has no fused CPU Adam) |
    # adam | adagrad | rowwise_adagrad | sgd
    embedding_optimizer: EmbeddingOptimizer = "auto"
    embedding_lr: Optional[float] = None  # None: lr for adam/sgd, 0.01 for the adagrads
    # schedule of every lr (dense and embedding; mtfm_rec/training/schedule.py): linear warm-up
    # over lr_warmup_steps, then none | cosine | linear decay to lr_min_ratio * lr at max_steps |
    # step: x lr_step_gamma every lr_step_every steps, never below lr_min_ratio (StepLR)
    lr_warmup_steps: int = 0
    lr_decay: LRDecay = "none"
    lr_min_ratio: float = 0.1
    lr_step_every: int = 0  # steps between step decays (lr_decay: step needs >= 1)
    lr_step_gamma: float = 0.85  # the factor of each step decay
    max_steps: int = 1000  # optimizer steps (global batches)
    max_minutes: float = 0.0  # wall-clock budget for fit() (0 = none); stops at a step boundary
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms + fixed threads
    # ---- parallelism
    dense_parallel: DenseParallel = "ddp"  # ddp | fsdp (FSDP2 fully_shard) for the non-embedding params
    backend: DistBackend = "auto"  # auto (nccl on GPU, gloo on CPU) | gloo | nccl
    device: Device = "auto"  # auto | cpu | cuda
    bf16: bool = False  # bf16 autocast of the forward (CPU: AMX; GPU: tensor cores)
    pipeline: bool = True  # TrainPipelineSparseDist; false = a plain step loop (debugging)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    # ---- evaluation, early stopping, best model (validation split only)
    eval_every: int = 0  # steps between validation passes (0 = only at the end)
    early_stopping_patience: int = 0  # validation passes without improvement (0 = off)
    early_stopping_metric: EarlyStoppingMetric = "auc"  # auc | gauc | logloss (mean over scenario x task)
    eval_splits: List[str] = field(default_factory=lambda: ["valid", "test"])  # after fit()
    save_predictions: bool = False  # <run_dir>/predictions.parquet of the test split
    # ---- checkpoints
    checkpoint_every: int = 0  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto (newest complete checkpoint in run_dir) | never | <path>
    # ---- logging
    log_every: int = 50  # steps between loss read-backs (the only host-device syncs)
    # matmul peak of one rank in GFLOP/s, the denominator of perf/mfu; 0 = measured at the start
    # of fit (mtfm_rec.bench.peak: a square matmul in the training dtype on the rank's threads)
    peak_gflops: float = 0.0
    progress_bar: bool = True  # tqdm on rank 0
    tensorboard: bool = True
    plots: bool = True  # loss / AUC curves as PNG at the end

    def __post_init__(self) -> None:
        if self.dense_parallel not in DENSE_PARALLEL:
            raise ValueError(f"dense_parallel must be one of {DENSE_PARALLEL}, got {self.dense_parallel!r}")
        if self.embedding_optimizer not in EMBEDDING_OPTIMIZERS:
            raise ValueError(
                f"embedding_optimizer must be one of {EMBEDDING_OPTIMIZERS}, got {self.embedding_optimizer!r}"
            )
        if self.device not in DEVICES:  # anything else would silently train on the CPU
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.early_stopping_metric not in EARLY_STOPPING_METRICS:
            raise ValueError(
                f"early_stopping_metric must be one of {EARLY_STOPPING_METRICS}, "
                f"got {self.early_stopping_metric!r}"
            )
        if self.backend not in DIST_BACKENDS:
            raise ValueError(f"backend must be one of {DIST_BACKENDS}, got {self.backend!r}")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay must be one of {LR_DECAYS}, got {self.lr_decay!r}")
        if self.lr_warmup_steps < 0 or not 0.0 <= self.lr_min_ratio <= 1.0:
            raise ValueError(
                "lr_warmup_steps must be >= 0 and lr_min_ratio in [0, 1], "
                f"got {self.lr_warmup_steps}, {self.lr_min_ratio}"
            )
        if self.lr_decay == "step" and not (self.lr_step_every >= 1 and 0.0 < self.lr_step_gamma <= 1.0):
            raise ValueError(
                "lr_decay=step needs lr_step_every >= 1 and lr_step_gamma in (0, 1], "
                f"got {self.lr_step_every}, {self.lr_step_gamma}"
            )
        if self.log_every < 1:
            raise ValueError("log_every must be >= 1")
        if not (self.peak_gflops >= 0 and math.isfinite(self.peak_gflops)):
            raise ValueError(
                f"peak_gflops must be a finite number >= 0 (0 = measured at start), got {self.peak_gflops!r}"
            )
        unknown = [s for s in self.eval_splits if s not in EVAL_SPLITS]
        if unknown:
            raise ValueError(f"eval_splits: {unknown} not among the splits {list(EVAL_SPLITS)}")
