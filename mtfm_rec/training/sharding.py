"""Sharding plan, DMP and the dense wrapper (DDP or FSDP2).

The embedding tables (of the ``EmbeddingCollection``, and of the ``EmbeddingBagCollection`` that
pools multi-hot features) are sharded by TorchRec's planner and ``DistributedModelParallel``; their
optimizer is fused into the backward pass (``apply_optimizer_in_backward``), so no dense
optimizer ever sees them. Everything else (the dense model) is data parallel: DDP, or FSDP2's
``fully_shard`` with the sharded tables ignored. The same code runs gloo on CPUs and NCCL on GPUs.
The process group is ``mtfm_rec.training.distributed``'s; the optimizers are
``mtfm_rec.training.optimizers``'.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from mtfm_rec.training.config import ShardingConfig, TrainConfig
from mtfm_rec.training.distributed import DistInfo
from mtfm_rec.training.optimizers import embedding_parameters, fused_optimizer_spec


# ----------------------------------------------------------------------- planning
def _tables(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, the module that holds it) of every EmbeddingCollection / EmbeddingBagCollection
    table of ``model``."""
    out: List[Tuple[str, nn.Module]] = []
    for module in model.modules():
        configs = getattr(module, "embedding_configs", None) or getattr(module, "embedding_bag_configs", None)
        if callable(configs):
            out.extend((table.name, module) for table in configs())
    return out


def _table_names(model: nn.Module) -> List[str]:
    """Names of every EmbeddingCollection / EmbeddingBagCollection table of ``model``."""
    return [name for name, _ in _tables(model)]


def _supported_types(module: nn.Module, compute_device: str) -> Optional[List[str]]:
    """The sharding types TorchRec's default sharder of ``module`` offers on ``compute_device``
    (an EmbeddingBagCollection has no row-wise sharding on the CPU, an EmbeddingCollection
    has); None for another module."""
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    if isinstance(module, EmbeddingBagCollection):
        return list(EmbeddingBagCollectionSharder().sharding_types(compute_device))
    if isinstance(module, EmbeddingCollection):
        return list(EmbeddingCollectionSharder().sharding_types(compute_device))
    return None


def make_constraints(
    model: nn.Module, cfg: ShardingConfig, compute_device: Optional[str] = None
) -> Dict[str, ParameterConstraints]:
    """Planner constraints from the config: global and per-table (prefix ``*``) sharding types.

    Args:
        model: the unsharded model.
        cfg: ``train.sharding``.
        compute_device: ``cpu`` or ``cuda``: when given, a table left with no sharding type its
            module supports there is refused here, by name (the planner's own error names no
            config key).

    Raises:
        ValueError: a ``table_sharding_types`` pattern matches no table, or (with
            ``compute_device``) a table has no supported sharding type left.
    """
    constraints: Dict[str, ParameterConstraints] = {}
    tables = _tables(model)
    names = [name for name, _ in tables]
    for pattern in cfg.table_sharding_types:
        if not any(_matches(pattern, t) for t in names):
            raise ValueError(f"train.sharding.table_sharding_types: {pattern!r} matches no table of {names}")
    for name, module in tables:
        types = list(cfg.sharding_types)
        for pattern, allowed in cfg.table_sharding_types.items():
            if _matches(pattern, name):
                types = list(allowed)
        supported = _supported_types(module, compute_device) if compute_device and types else None
        if supported is not None and not set(types) & set(supported):
            hint = "table_wise" if "table_wise" in supported else supported[0]
            raise ValueError(
                f"train.sharding: table {name!r} ({type(module).__name__}) may only be {types}, but on "
                f"{compute_device} it supports {supported}; allow one of them for it, e.g. "
                f'train.sharding.table_sharding_types={{"{name}": [{hint}]}}'
            )
        if types or cfg.compute_kernels:
            constraints[name] = ParameterConstraints(
                sharding_types=types or None,
                compute_kernels=list(cfg.compute_kernels) or None,
            )
    return constraints


def _matches(pattern: str, name: str) -> bool:
    return name.startswith(pattern[:-1]) if pattern.endswith("*") else name == pattern


def plan_sharding(model: nn.Module, info: DistInfo, cfg: ShardingConfig, batch_size: int) -> ShardingPlan:
    """Runs TorchRec's planner over the whole job (collective: every rank gets the same plan)."""
    topology = Topology(
        world_size=info.world_size,
        compute_device=info.device.type,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size)),
    )
    planner = EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        constraints=make_constraints(model, cfg, info.device.type),
        debug=False,
    )
    return planner.collective_plan(model, None, dist.GroupMember.WORLD)


def describe_plan(plan: ShardingPlan) -> str:
    """One line per table: sharding type, kernel, ranks."""
    lines = []
    for module_path, params in plan.plan.items():
        for table, ps in params.items():
            ranks = sorted(set(ps.ranks or []))
            lines.append(
                f"  {module_path or '<root>'}.{table}: {ps.sharding_type} / {ps.compute_kernel}"
                f" on ranks {ranks}"
            )
    return "\n".join(lines)


# ----------------------------------------------------------------------- dense wrappers
class FSDP2Wrapper(DataParallelWrapper):
    """Wraps the dense part of a DMP in FSDP2 (``fully_shard``), ignoring the sharded tables.

    Every largest dense submodule with a ``forward`` becomes its own FSDP unit (parameters are
    gathered one unit at a time, see :func:`_fsdp_units`), then the root takes whatever dense
    parameters are left.
    """

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        from torch.distributed.fsdp import fully_shard

        root = dmp._dmp_wrapped_module
        sharded = set(DistributedModelParallel._sharded_parameter_names(root))
        ignored: Set[nn.Parameter] = {p for n, p in root.named_parameters() if n in sharded}
        for unit in _fsdp_units(root, ignored):
            fully_shard(unit)
        fully_shard(root, ignored_params=ignored or None)


def _fsdp_units(module: nn.Module, ignored: Set[nn.Parameter]) -> List[nn.Module]:
    """The largest submodules holding only dense parameters and having a ``forward``.

    Containers (ModuleDict / ModuleList have no forward) and modules that hold sharded tables
    are descended into; their dense children become units of their own.
    """
    units: List[nn.Module] = []
    for child in module.children():
        params = list(child.parameters())
        if not params:
            continue
        is_container = isinstance(child, (nn.ModuleDict, nn.ModuleList))
        if is_container or any(p in ignored for p in params):
            units.extend(_fsdp_units(child, ignored))
        else:
            units.append(child)
    return units


def shard_model(
    model: nn.Module, info: DistInfo, cfg: TrainConfig, batch_size: int
) -> Tuple[DistributedModelParallel, ShardingPlan]:
    """Fuses the embedding optimizer into backward, plans, and wraps ``model`` in DMP.

    ``model`` must have been built on the CPU (or meta) with its final initial values: DMP
    allocates sharded tables afresh, so :func:`copy_full_state` is used afterwards to restore the
    unsharded initial values (identical starts on any world size).
    """
    opt_cls, opt_kwargs = fused_optimizer_spec(cfg, info.device)
    apply_optimizer_in_backward(opt_cls, embedding_parameters(model), opt_kwargs)
    plan = plan_sharding(model, info, cfg.sharding, batch_size)
    wrapper = FSDP2Wrapper() if cfg.dense_parallel == "fsdp" else None
    dmp = DistributedModelParallel(
        module=model,
        env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
        device=info.device,
        plan=plan,
        data_parallel_wrapper=wrapper,
    )
    return dmp, plan


# ----------------------------------------------------------------------- initial values
@torch.no_grad()
def copy_full_state(dmp: nn.Module, full_state: Dict[str, torch.Tensor]) -> None:
    """Copies unsharded tensors into a sharded/wrapped model, shard by shard.

    Handles plain tensors, TorchRec ShardedTensors and DTensors (FSDP2 / DTensor-backed tables),
    so a model initialised once on the CPU starts from the same values on any number of ranks.
    Keys are matched after dropping wrapper prefixes (``_dmp_wrapped_module.``, ``module.``).
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    def norm(key: str) -> str:
        for prefix in ("_dmp_wrapped_module.", "module.", "_fsdp_wrapped_module."):
            key = key.replace(prefix, "")
        return key

    full = {norm(k): v for k, v in full_state.items()}
    missing = []
    for key, target in dmp.state_dict().items():
        src = full.get(norm(key))
        if src is None:
            missing.append(key)
            continue
        if isinstance(target, ShardedTensor):
            for shard in target.local_shards():
                md = shard.metadata
                index = tuple(slice(o, o + s) for o, s in zip(md.shard_offsets, md.shard_sizes))
                shard.tensor.copy_(src[index])
        elif isinstance(target, DTensor):
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(src.to(target.device), target.device_mesh, target.placements)
            target.to_local().copy_(value.to_local())
        elif isinstance(target, torch.Tensor):
            target.copy_(src)
    if missing:
        raise KeyError(f"copy_full_state: no initial value for {missing[:5]}")
