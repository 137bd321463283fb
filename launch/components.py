"""torchx components for mtfm_rec (see docs/LAUNCH.md).

    torchx run -s local_cwd launch/components.py:train -j 1x2 -- --config configs/synthetic.yaml data.raw=...
    torchx run -s slurm launch/components.py:train -j 4x8 --gpu 8 -- --config configs/ml1m_genre.yaml ...

``train`` is ``dist.ddp`` (torchrun under the hood: one process per GPU / CPU slot, c10d
rendezvous, the RANK / WORLD_SIZE / MASTER_ADDR environment that
:func:`mtfm_rec.training.sharding.init_distributed` reads) running ``python -m mtfm_rec.train``
with mtfm_rec's defaults: the module entry point (no sys.path games), torchrun's own restarts
(``--max-restarts``: when a rank dies, even by SIGKILL, torchrun stops the others and starts the
whole worker group again, with a fresh rendezvous store, and ``train.resume=auto`` continues
from the newest complete checkpoint), and on GPUs the NCCL settings; the same AppDef runs on
local_cwd, slurm and kubernetes.
"""

# No `from __future__ import annotations`: torchx decodes parameters from real type objects.
import shlex
from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components.dist import ddp

# torchrun env var that gives every (re)started worker group a store of its own; see train().
RESTART_SAFE_STORE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def train(
    *script_args: str,
    j: str = "1x2",
    image: str = "ghcr.io/pytorch/torchx:0.7.0",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    name: str = "mtfm_rec",
    env: Optional[Dict[str, str]] = None,
    max_restarts: int = 3,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Distributed MTFM training: ``python -m mtfm_rec.train <script_args>`` on every rank.

    Args:
        script_args: arguments of mtfm_rec.train: ``--config <yaml>`` and ``key=value`` overrides.
        j: ``{nnodes}x{nproc_per_node}``; elastic ``{min}:{max}x{nproc}`` works as in dist.ddp.
        image: container image (local_cwd ignores it and runs in the current directory).
        cpu: CPUs per node (role resource request).
        gpu: GPUs per node; one process per GPU when set (``j``'s nproc must match).
        memMB: memory per node in MB.
        h: a named resource (scheduler specific), overriding cpu/gpu/memMB.
        name: job name.
        env: extra environment variables.
        max_restarts: torchrun's ``--max-restarts``: how many times a failed worker group
            (any rank killed or crashed) is restarted in place, without a human or the
            scheduler; with train.resume=auto (the default) each restart continues from the
            newest complete checkpoint. 0 fails the job on the first dead rank.
        max_retries: the scheduler's whole-job retries (a new allocation), for what torchrun
            cannot restart: a lost node or a dead torchrun agent.
        rdzv_port: c10d rendezvous port on the first node.
        mounts: scheduler mounts (e.g. the shared file system holding data and run_dir).
    """
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
    job_env = {
        "OMP_NUM_THREADS": str(max(1, cpu // max(1, _nproc(j)))),
        "PYTHONUNBUFFERED": "1",
        # torchrun's agent shares its rendezvous store with the ranks and keeps it across
        # restarts, stale keys and all: a restarted rank can read the killed attempt's address of
        # rank 0 and fail to connect (gloo "connectFullMesh ... Connection refused", NCCL alike;
        # pytorch/pytorch#135712, #167288). Without sharing, each attempt gets a fresh store.
        RESTART_SAFE_STORE: "1",
    }
    if gpu:
        job_env.update({"NCCL_ASYNC_ERROR_HANDLING": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"})
    job_env.update(env or {})
    app = ddp(
        *script_args,
        m="mtfm_rec.train",
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=j,
        env=job_env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        mounts=mounts,
    )
    _add_torchrun_flags(app.roles[0], ["--max-restarts", str(max_restarts)])
    return app


def _add_torchrun_flags(role: specs.Role, flags: List[str]) -> None:
    """Puts ``flags`` right after ``torchrun`` in the role's command.

    dist.ddp has no parameter for them: it runs ``bash -c "torchrun --rdzv_backend ..."`` (its
    ``max_retries`` is the scheduler's), so the command it built is extended. A dist.ddp that
    builds another shape of command is refused rather than silently run without the flags.
    """
    args = role.args
    if role.entrypoint != "bash" or len(args) != 2 or args[0] != "-c" or not args[1].startswith("torchrun "):
        raise RuntimeError(
            f"dist.ddp built an unexpected command {role.entrypoint} {args}: cannot add {flags}"
        )
    role.args = ["-c", "torchrun " + shlex.join(flags) + args[1][len("torchrun") :]]


def _nproc(j: str) -> int:
    return int(j.split("x")[-1]) if "x" in j else int(j)
