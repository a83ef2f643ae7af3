"""FSDP1 (``FullyShardedDataParallel``) and FSDP2 (``fully_shard``) backends.

FSDP1: each rank's ``.grad`` (a flat, zero-padded shard, or views of it with
``use_orig_params=True``) is disjoint within the shard group; FSDP2: grads are DTensor ``Shard(0)``
pieces, ``.to_local()`` is this rank's share. Both sum over the shard group only (HSDP / HYBRID_SHARD
replicas hold copies).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from ...errors import UserError
from .base import ParamGradBackend, dtensor_api, is_dtensor, world_size


class FSDP1Backend(ParamGradBackend):
    """torch FullyShardedDataParallel (FSDP1). Each rank's ``.grad`` (flat, zero-padded shard, or
    views of it with ``use_orig_params=True``; ``None`` where a rank's shard of a parameter is
    empty) is disjoint within the shard group. NO_SHARD keeps full replicated grads; HYBRID_SHARD
    replicates across nodes, so only the intra-node shard group is summed."""

    engine = "fsdp1"

    def __init__(self, model: nn.Module, **kw):
        super().__init__(**kw)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import ShardingStrategy

        self.module = model
        units = FSDP.fsdp_modules(model)
        if not units:
            raise UserError("model has no FullyShardedDataParallel module; wrap it with FSDP or use another backend")
        strategies = {u.sharding_strategy for u in units}
        if len(strategies) != 1:
            names = sorted(s.name for s in strategies)
            raise UserError(f"FSDP1 model mixes sharding strategies {names}; use one strategy for all FSDP units")
        self.strategy = strategies.pop()
        self.use_orig_params = bool(getattr(units[0], "_use_orig_params", False))
        self.cpu_offload = bool(getattr(getattr(units[0], "cpu_offload", None), "offload_params", False))
        root = units[0]
        shard_pg = root.process_group
        shard_size = dist.get_world_size(shard_pg)
        replicate = 1
        if self.strategy in (ShardingStrategy.HYBRID_SHARD, ShardingStrategy._HYBRID_SHARD_ZERO2):
            inter = getattr(root, "_inter_node_pg", None)
            replicate = dist.get_world_size(inter) if inter is not None else 1
        if shard_size == 1 and world_size() > 1 and getattr(root, "_inter_node_pg", None) is not None:
            # Measured (torch 2.13): HYBRID_SHARD with a 1-rank shard group silently becomes
            # NO_SHARD on that group and never all-reduces across the replicas.
            raise UserError(
                "FSDP1 HYBRID_SHARD with a 1-rank shard group was turned into NO_SHARD by torch and its "
                "gradients are not reduced across replicas; use a shard group of >= 2 ranks, or DDP"
            )
        if shard_size * replicate != world_size():
            raise UserError(
                f"FSDP1 data-parallel groups cover {shard_size * replicate} of {world_size()} ranks "
                "(tensor or pipeline parallelism?); the recorder supports pure data parallelism only"
            )
        self.shard_size = shard_size
        if self.strategy == ShardingStrategy.NO_SHARD or shard_size == 1:
            self.needs_reduce, self.reduce_group = False, None
        else:
            self.needs_reduce, self.reduce_group = True, shard_pg

    def meta(self):
        return {
            **super().meta(),
            "fsdp_strategy": self.strategy.name,
            "use_orig_params": self.use_orig_params,
            "shard_group_size": self.shard_size,
            "offload": self.cpu_offload,
        }


class FSDP2Backend(ParamGradBackend):
    """torch ``fully_shard`` (FSDP2): grads are DTensors sharded over the FSDP mesh. Local shards
    (``to_local()``) are disjoint over the shard dim and copies over an HSDP replicate dim, so the
    partial sums are all-reduced over the shard dim's group only."""

    engine = "fsdp2"

    def __init__(self, model: nn.Module, **kw):
        super().__init__(**kw)
        DTensor, Replicate, Shard = dtensor_api()

        self.module = model
        fsdp_mesh = _fsdp2_mesh(model)
        meshes = {}
        plain = []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if isinstance(p, DTensor):
                meshes[id(p.device_mesh)] = (p.device_mesh, tuple(p.placements), name)
            else:
                plain.append(name)
        if plain:
            raise UserError(
                f"FSDP2 model has parameters not managed by fully_shard (e.g. {plain[0]!r}); "
                "call fully_shard on the root module too"
            )
        if len(meshes) != 1:
            raise UserError(
                "FSDP2 model's parameters live on several device meshes; the recorder supports one "
                "data-parallel mesh only (no tensor/pipeline/context parallel dims)"
            )
        mesh, placements, name = next(iter(meshes.values()))
        if fsdp_mesh is not None and mesh.ndim != fsdp_mesh.ndim:
            raise UserError(
                f"FSDP2 parameter {name!r} is on a {mesh.ndim}-D mesh {mesh.mesh_dim_names} but FSDP "
                f"shards over {fsdp_mesh.ndim}-D; extra dims (tensor parallelism) are not supported"
            )
        shard_dims = [i for i, pl in enumerate(placements) if isinstance(pl, Shard)]
        bad = [pl for pl in placements if not isinstance(pl, (Shard, Replicate))]
        if bad or len(shard_dims) > 1:
            raise UserError(
                f"FSDP2 parameter {name!r} has placements {placements}; expected Shard on one mesh "
                "dim (FSDP) and Replicate on an optional HSDP replicate dim"
            )
        if mesh.size() != world_size():
            raise UserError(
                f"FSDP2 mesh covers {mesh.size()} of {world_size()} ranks; the recorder supports pure "
                "data parallelism over all ranks only"
            )
        self.mesh = mesh
        self.placements = placements
        if shard_dims and mesh.size(shard_dims[0]) > 1:
            self.needs_reduce = True
            self.reduce_group = mesh.get_group(shard_dims[0]) if mesh.ndim > 1 else mesh.get_group()
        self.hsdp = mesh.ndim == 2
        self.offload = _fsdp2_offloads(model)

    def local_part(self, g):
        if not is_dtensor(g):
            return g
        if tuple(g.placements) != self.placements:
            raise UserError(
                f"FSDP2 gradient placements {tuple(g.placements)} differ from the parameters' "
                f"{self.placements}; unreduced (Partial) gradients cannot be recorded exactly"
            )
        return g.to_local()

    def meta(self):
        return {
            **super().meta(),
            "fsdp_strategy": "HSDP" if self.hsdp else "FULLY_SHARD",
            "mesh_shape": list(self.mesh.shape),
            "placements": [str(p) for p in self.placements],
            "offload": self.offload,
        }


def _fsdp2_offloads(model: nn.Module) -> bool:
    """Whether FSDP2 keeps parameters/gradients on the CPU (CPUOffloadPolicy; private API)."""
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy
    except ImportError:  # pragma: no cover - older torch
        return False
    for m in model.modules():
        state = m._get_fsdp_state() if hasattr(m, "_get_fsdp_state") else None
        group = getattr(state, "_fsdp_param_group", None) if state is not None else None
        if group is not None and isinstance(getattr(group, "offload_policy", None), CPUOffloadPolicy):
            return True
    return False


def _fsdp2_mesh(model: nn.Module):
    """The mesh the outermost FSDP2 module shards over (private API; None if unavailable)."""
    try:
        state = model._get_fsdp_state()  # type: ignore[attr-defined]
        pg = state._fsdp_param_group
        if pg is None:
            for m in model.modules():
                st = m._get_fsdp_state() if hasattr(m, "_get_fsdp_state") else None
                if st is not None and st._fsdp_param_group is not None:
                    pg = st._fsdp_param_group
                    break
        return pg.mesh_info.mesh if pg is not None else None
    except Exception:
        return None


def has_fsdp1(model: nn.Module) -> bool:
    """``model`` is or contains an FSDP1 ``FullyShardedDataParallel`` unit."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return isinstance(model, FSDP) or any(isinstance(m, FSDP) for m in model.modules())


def has_fsdp2(model: nn.Module) -> bool:
    """``model`` is or contains an FSDP2 (``fully_shard``) module."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6 keeps FSDP2 private
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return False
    return isinstance(model, FSDPModule) or any(isinstance(m, FSDPModule) for m in model.modules())
