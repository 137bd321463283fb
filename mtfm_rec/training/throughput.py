"""Training throughput: the counters of one log window, the totals of a run, and what MFU and
the memory report need (the model FLOPs of a batch, the machine's matmul peak, peak memory).

The trainer adds every step's loss, samples and model FLOPs to the window on the device (no
host sync); at a log step :meth:`ThroughputWindow.close` does the window's one all-reduce (loss,
samples, FLOPs and the ranks' time-budget votes), returns the global figures and starts the next
window. Validation time is counted apart, so samples/s and MFU are those of training steps.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from mtfm_rec.bench.peak import trainer_peak_gflops
from mtfm_rec.data.batch import Batch
from mtfm_rec.model.flops import model_flops
from mtfm_rec.model.mtfm import MTFM


def utilisation(flops: float, seconds: float, peak_gflops: float) -> Dict[str, float]:
    """``perf/model_gflops_per_s`` and ``perf/mfu`` (model FLOP/s over the matmul peak) of
    ``flops`` done in ``seconds``; empty where the FLOPs are unknown (NaN), no MFU without a peak."""
    if not math.isfinite(flops):
        return {}
    rate = flops / 1e9 / max(seconds, 1e-9)
    out = {"perf/model_gflops_per_s": rate}
    if math.isfinite(peak_gflops) and peak_gflops > 0:
        out["perf/mfu"] = rate / peak_gflops
    return out


@dataclass
class WindowStats:
    """One closed window, summed over all ranks."""

    first_step: int  # the window's first step (for the divergence message)
    mean_loss: float  # mean training loss over its steps and ranks
    samples: int
    flops: float  # model FLOPs (NaN when some batch was not counted)
    budget_votes: float  # ranks whose time budget ran out
    seconds: float  # training time of the window (validation excluded)
    wait_s: float  # of which this rank waited for its loader


class ThroughputWindow:
    """The steps since the last log step, and the run's totals.

    Args:
        first_step: the first step the run trains.
        device: where the losses live (the all-reduce runs there).
        world_size: ranks whose losses are averaged.
    """

    def __init__(self, first_step: int, device: torch.device, world_size: int) -> None:
        self.device, self.world_size = device, world_size
        self.loss_sum = torch.zeros((), device=device)
        self.steps, self.samples, self.flops, self.first_step = 0, 0, 0.0, first_step
        self.t_start = time.perf_counter()
        self.t_window, self.wait_mark, self.eval_s = self.t_start, 0.0, 0.0
        # totals of the run (all ranks; run_wait is this rank's)
        self.run_samples, self.run_flops, self.run_wait, self.run_eval = 0, 0.0, 0.0, 0.0

    def add(self, loss: torch.Tensor, samples: int, flops: float) -> None:
        """One trained step: its (device, detached) loss, this rank's samples and model FLOPs."""
        self.loss_sum += loss
        self.steps += 1
        self.samples += samples
        self.flops += flops

    def add_eval(self, seconds: float) -> None:
        """Validation time inside the window: not training time."""
        self.eval_s += seconds
        self.run_eval += seconds

    def close(self, wait_total_s: float, over_budget: bool = False) -> WindowStats:
        """Reduces the window over the ranks (collective), adds it to the totals, starts the next.

        Args:
            wait_total_s: this rank's loader wait since the run started.
            over_budget: this rank's time budget ran out (summed into ``budget_votes``).
        """
        now = time.perf_counter()
        counts = [float(self.samples), float(over_budget), self.flops]
        stats = torch.cat([self.loss_sum.reshape(1), torch.tensor(counts, device=self.device)])
        dist.all_reduce(stats)
        loss, samples, votes, flops = (float(x) for x in stats.cpu())
        out = WindowStats(
            first_step=self.first_step,
            mean_loss=loss / (self.steps * self.world_size),
            samples=int(samples),
            flops=flops,
            budget_votes=votes,
            seconds=now - self.t_window - self.eval_s,
            wait_s=wait_total_s - self.wait_mark,
        )
        self.run_samples += out.samples
        self.run_flops += out.flops
        self.run_wait += out.wait_s
        self.first_step += self.steps
        self.loss_sum.zero_()
        self.steps, self.samples, self.flops = 0, 0, 0.0
        self.t_window, self.wait_mark, self.eval_s = now, wait_total_s, 0.0
        return out

    def scalars(self, stats: WindowStats, peak_gflops: float) -> Dict[str, float]:
        """The window's throughput figures for the log."""
        elapsed = max(stats.seconds, 1e-9)
        out = {
            "perf/samples_per_s": stats.samples / elapsed,
            "perf/data_wait_share": stats.wait_s / elapsed,
        }
        out.update(utilisation(stats.flops, stats.seconds, peak_gflops))
        return out

    def summary(self, peak_gflops: float) -> Dict[str, float]:
        """The run's throughput: samples/s, data-wait share, training seconds, model GFLOP/s and
        MFU (where FLOPs were counted), and the TFLOPs done."""
        total = time.perf_counter() - self.t_start - self.run_eval
        out = {
            "samples_per_s": self.run_samples / max(total, 1e-9),
            "data_wait_share": self.run_wait / max(total, 1e-9),
            "seconds": total,
        }
        out.update(
            {k.removeprefix("perf/"): v for k, v in utilisation(self.run_flops, total, peak_gflops).items()}
        )
        if "model_gflops_per_s" in out:
            out.update(model_tflops=self.run_flops / 1e12, peak_gflops=peak_gflops)
        return out


def flop_counter(model: nn.Module) -> Optional[Callable[[Batch], float]]:
    """Training-step FLOPs of a host batch (``mtfm_rec.model.flops``) for an MTFM model; None
    for another model, whose FLOPs are unknown (no ``perf/mfu`` rather than a wrong one)."""
    if not isinstance(model, MTFM):
        return None
    config, schema = model.config, model.schema

    def count(batch: Batch) -> float:
        if batch.token_ts.device.type != "cpu":  # reading the mask's values would sync
            return math.nan
        return float(model_flops(config, schema, batch).train_step)

    return count


def global_peak_gflops(
    device: torch.device, world_size: int, configured: float, bf16: bool
) -> Tuple[float, float]:
    """(the matmul peak of all ranks together in GFLOP/s, seconds spent measuring): ``configured``
    x ranks when set (> 0), else the sum of each rank's measurement (``mtfm_rec.bench.peak``;
    once per process, all ranks at once; collective)."""
    if configured > 0:
        return configured * world_size, 0.0
    start = time.perf_counter()
    total = torch.tensor(trainer_peak_gflops(device, bf16), dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total), time.perf_counter() - start


def peak_memory(device: torch.device) -> Dict[str, float]:
    """Peak host RSS (and device memory on GPUs) in GiB, the maximum over ranks (collective)."""
    values = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20]  # KiB on Linux
    if device.type == "cuda":
        values.append(torch.cuda.max_memory_allocated(device) / 2**30)
    peak = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    out = {"peak_host_rss_gb": float(peak[0])}
    if len(values) > 1:
        out["peak_device_memory_gb"] = float(peak[1])
    return out
