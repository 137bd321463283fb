"""torchx components for mtfm_rec (see docs/LAUNCH.md).

    torchx run -s local_cwd launch/components.py:train -j 1x2 -- --config configs/synthetic.yaml data.raw=...
    torchx run -s slurm launch/components.py:train -j 4x8 --gpu 8 -- --config configs/ml1m_genre.yaml ...

``train`` is ``dist.ddp`` (torchrun under the hood: one process per GPU / CPU slot, c10d
rendezvous, the RANK / WORLD_SIZE / MASTER_ADDR environment that
:func:`mtfm_rec.training.sharding.init_distributed` reads) running ``python -m mtfm_rec.train``
with mtfm_rec's defaults: the module entry point (no sys.path games), and on GPUs the NCCL
settings; the same AppDef runs on local_cwd, slurm and kubernetes.
"""

# No `from __future__ import annotations`: torchx decodes parameters from real type objects.
from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components.dist import ddp


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
        max_retries: whole-job restarts on failure; with train.resume=auto (the default) a
            restarted job continues from the newest complete checkpoint.
        rdzv_port: c10d rendezvous port on the first node.
        mounts: scheduler mounts (e.g. the shared file system holding data and run_dir).
    """
    job_env = {"OMP_NUM_THREADS": str(max(1, cpu // max(1, _nproc(j)))), "PYTHONUNBUFFERED": "1"}
    if gpu:
        job_env.update({"NCCL_ASYNC_ERROR_HANDLING": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"})
    job_env.update(env or {})
    return ddp(
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


def _nproc(j: str) -> int:
    return int(j.split("x")[-1]) if "x" in j else int(j)
