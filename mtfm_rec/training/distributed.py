"""The process group and the collectives the trainer, checkpoints, metrics and loader share.

:func:`init_distributed` joins the torchrun / torchx job's group or makes a one-rank group (DMP
and DCP want one); the helpers below work with or without an initialised group (one process:
rank 0 of 1), so every caller has one definition of "rank / world size if initialised" and of
gathering to rank 0.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist

from mtfm_rec.training.config import TrainConfig

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    owns_group: bool  # we created the process group (and destroy it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_distributed(cfg: TrainConfig) -> DistInfo:
    """Joins (or creates) the default process group.

    Under torchrun / torchx (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` set) the
    group spans the job; a bare process gets a one-rank group, because DMP and DCP want one.
    An already initialised group (e.g. a caller's) is reused as is.
    """
    if cfg.device == "auto":
        use_cuda = torch.cuda.is_available()
    else:
        use_cuda = cfg.device == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    owns = False
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=30)
        if all(k in os.environ for k in _TORCHRUN_ENV):
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            dist.init_process_group(
                backend=backend,
                init_method=f"tcp://127.0.0.1:{_free_port()}",
                rank=0,
                world_size=1,
                timeout=timeout,
            )
        owns = True
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=device,
        backend=dist.get_backend(),
        owns_group=owns,
    )


# ----------------------------------------------------------------------- collectives
def is_distributed() -> bool:
    """torch.distributed is usable and a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank(pg: Optional[dist.ProcessGroup] = None) -> int:
    """This process's rank in ``pg`` (the world by default); 0 without a process group."""
    return dist.get_rank(pg) if is_distributed() else 0


def get_world_size(pg: Optional[dist.ProcessGroup] = None) -> int:
    """The size of ``pg`` (the world by default); 1 without a process group."""
    return dist.get_world_size(pg) if is_distributed() else 1


def barrier(pg: Optional[dist.ProcessGroup] = None) -> None:
    """A barrier over ``pg``; nothing without a process group."""
    if is_distributed():
        dist.barrier(group=pg)


def gather_to_rank0(obj: Any, pg: Optional[dist.ProcessGroup]) -> Optional[List[Any]]:
    """Every rank's ``obj`` on rank 0 (None elsewhere)."""
    if get_world_size(pg) == 1:
        return [obj]
    out: Optional[List[Any]] = [None] * get_world_size(pg) if get_rank(pg) == 0 else None
    dst = dist.get_global_rank(pg, 0) if pg is not None else 0
    dist.gather_object(obj, out, dst=dst, group=pg)
    return out


def broadcast_from_rank0(obj: Any, pg: Optional[dist.ProcessGroup]) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if get_world_size(pg) == 1:
        return obj
    box = [obj]
    src = dist.get_global_rank(pg, 0) if pg is not None else 0
    dist.broadcast_object_list(box, src=src, group=pg)
    return box[0]


def all_gather(obj: Any, pg: Optional[dist.ProcessGroup]) -> List[Any]:
    """Every rank's ``obj`` on every rank, in rank order."""
    if get_world_size(pg) == 1:
        return [obj]
    out: List[Any] = [None] * get_world_size(pg)
    dist.all_gather_object(out, obj, group=pg)
    return out
