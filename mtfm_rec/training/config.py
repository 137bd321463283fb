"""Training configuration: optimisation, parallelism, checkpoints, logging."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    lr: float = 3e-4  # Adam, as in the paper
    max_steps: int = 1000
    seed: int = 0
