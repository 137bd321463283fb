"""Ranks in child processes, bounded in time and joined through a file: a test that waits on a
rank never hangs the suite.

Two tests on the two pytest-xdist workers that each pick a "free" TCP port can pick the same one
between its probe and the store's bind; a rank that then joins the other test's store waits in a
collective for gloo's 30-minute default timeout, once per collective, and ``mp.spawn`` with it.
So ranks rendezvous through a ``FileStore`` in the test's own temporary folder (``file_store``),
and ``spawn_ranks`` ends every rank at a deadline and fails the test, naming the ranks.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Tuple

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

RANK_DEADLINE_S = 240.0


def file_store(folder: Any, name: str = "store") -> str:
    """The ``init_method`` of a new process group whose store is the file ``folder/name`` (one
    file per group: a file reused by a second group would mix the two rendezvous)."""
    path = os.path.join(str(folder), f"{name}.filestore")
    if os.path.exists(path):
        raise FileExistsError(f"{path}: a process group store exists; give each group its own name")
    return f"file://{path}"


def init_rank(rank: int, world_size: int, init_method: str) -> None:
    """Joins this process to the gloo group of ``world_size`` ranks at ``init_method``."""
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)


def spawn_ranks(
    fn: Callable[..., None], args: Tuple[Any, ...], nprocs: int = 2, deadline_s: float = RANK_DEADLINE_S
) -> None:
    """Runs ``fn(rank, *args)`` in ``nprocs`` spawned processes and waits for them all.

    Raises:
        torch.multiprocessing.ProcessRaisedException: a rank raised (as ``mp.spawn``).
        pytest.fail.Exception: the ranks did not all finish within ``deadline_s``; all are killed.
    """
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            alive = [rank for rank, proc in enumerate(ctx.processes) if proc.is_alive()]
            for proc in ctx.processes:
                proc.kill()
            name = getattr(fn, "__name__", repr(fn))
            pytest.fail(f"ranks {alive} of {name} did not finish in {deadline_s:.0f} s: one waits for a peer")
