"""Learning-rate schedule: linear warm-up, then constant, cosine or linear decay to a floor, or
step decay (PyTorch's ``StepLR`` counted in optimizer steps, held at the floor).

::

    factor(step)   1 |      ______________                constant
                     |     /              ``--..__        cosine / linear
                     |    /                       ``--..  min_ratio
                     0 +---+--------------------------+--> step
                       0  warmup                  max_steps

    step decay       1 |      ____
                       |     /    |____               x gamma every step_every steps
                       |    /          |____
                       0 +---+----+----+----+-------> step
                         0  warmup  +step_every

Every parameter group of the optimizer (the dense Adam and the fused embedding optimizer of
TorchRec alike) gets ``base_lr * factor(step)``: TorchRec's fused optimizers copy their group's
``lr`` into the FBGEMM kernel at every ``zero_grad`` / ``step``, so the update fused into the
backward pass follows the schedule too. The schedule is a pure function of the step, so a resumed
run continues it exactly and a checkpoint needs nothing of it.
"""

from __future__ import annotations

import math
import typing
from typing import Any, List, Literal, Tuple

LRDecay = Literal["none", "cosine", "linear", "step"]
LR_DECAYS: Tuple[str, ...] = typing.get_args(LRDecay)


def lr_factor(
    step: int,
    max_steps: int,
    warmup_steps: int,
    decay: str,
    min_ratio: float,
    step_every: int = 0,
    gamma: float = 1.0,
) -> float:
    """The multiplier of the base learning rates for optimizer step ``step`` (1-based).

    ``step_every`` and ``gamma`` are the step decay's: the first ``step_every`` steps after the
    warm-up have factor 1, the next ``step_every`` ``gamma``, then ``gamma ** 2``, ... (as
    ``StepLR(step_size, gamma)`` stepped every ``step_every`` batches), never below ``min_ratio``.
    """
    if warmup_steps > 0 and step <= warmup_steps:
        return step / warmup_steps
    if decay == "step":
        return max(min_ratio, gamma ** (max(0, step - warmup_steps - 1) // step_every))
    if decay == "none" or max_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


class LRSchedule:
    """Sets every parameter group's ``lr`` from the base values it had when this was built.

    Args:
        optimizer: any optimizer with ``param_groups`` (a TorchRec ``CombinedOptimizer`` lists
            the groups of all its parts).
        max_steps / warmup_steps / decay / min_ratio / step_every / gamma: see :func:`lr_factor`.
    """

    def __init__(
        self,
        optimizer: Any,
        max_steps: int,
        warmup_steps: int,
        decay: str,
        min_ratio: float,
        step_every: int = 0,
        gamma: float = 1.0,
    ) -> None:
        if decay not in LR_DECAYS:
            raise ValueError(f"lr decay {decay!r} unknown; choose one of {LR_DECAYS}")
        if decay == "step" and step_every < 1:
            raise ValueError(f"step decay needs step_every >= 1, got {step_every}")
        self.optimizer = optimizer
        self.base_lrs: List[float] = [float(g["lr"]) for g in optimizer.param_groups]
        self.max_steps, self.warmup_steps, self.decay, self.min_ratio = (
            max_steps,
            warmup_steps,
            decay,
            min_ratio,
        )
        self.step_every, self.gamma = step_every, gamma

    @property
    def active(self) -> bool:
        return self.warmup_steps > 0 or self.decay != "none"

    def apply(self, step: int) -> float:
        """Sets the learning rates of optimizer step ``step``; returns the factor."""
        factor = lr_factor(
            step, self.max_steps, self.warmup_steps, self.decay, self.min_ratio, self.step_every, self.gamma
        )
        # looked up each time: a plain torch optimizer's load_state_dict replaces its group dicts
        groups = self.optimizer.param_groups
        if len(groups) != len(self.base_lrs):
            raise ValueError(
                f"the optimizer has {len(groups)} parameter groups, "
                f"the schedule was built for {len(self.base_lrs)}"
            )
        for group, base in zip(groups, self.base_lrs):
            group["lr"] = base * factor
        return factor
