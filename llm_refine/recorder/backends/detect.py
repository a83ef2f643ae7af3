"""``detect_backend``: the one place where the recorder's backend for a model is chosen and built."""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from ...errors import UserError
from .base import NormBackend, is_dtensor, world_size
from .fsdp import FSDP1Backend, FSDP2Backend, has_fsdp1, has_fsdp2
from .local import LocalBackend


def _unwrap_compiled(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def detect_backend(model: Any, *, scale_fn: Callable[[], torch.Tensor | None] | None = None) -> NormBackend:
    """Pick the backend for ``model`` as the training loop sees it (the wrapped model: DDP, FSDP,
    a fully_shard'ed module, a DeepSpeed engine, or a plain module)."""
    model = _unwrap_compiled(model)
    # A DeepSpeed engine can only exist if deepspeed was imported; don't pay its import otherwise.
    ds = sys.modules.get("deepspeed")
    if ds is not None and isinstance(model, getattr(ds, "DeepSpeedEngine", ())):
        from .deepspeed import DeepSpeedBackend  # the only import of the DeepSpeed backend

        return DeepSpeedBackend(model)

    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(model, DDP):
        inner = model.module
        if has_fsdp1(inner) or has_fsdp2(inner):
            raise UserError("DDP wraps an FSDP model; use FSDP alone (HYBRID_SHARD / HSDP for replication)")
        pg = model.process_group
        if dist.get_world_size(pg) != world_size():
            raise UserError(
                f"DDP replicates over {dist.get_world_size(pg)} of {world_size()} ranks (tensor or "
                "pipeline parallelism?); the recorder supports pure data parallelism only"
            )
        return LocalBackend(inner, engine="ddp", group=pg, scale_fn=scale_fn)
    if has_fsdp1(model):
        return FSDP1Backend(model, scale_fn=scale_fn)
    if has_fsdp2(model):
        return FSDP2Backend(model, scale_fn=scale_fn)
    if any(is_dtensor(p) for p in model.parameters()):
        raise UserError(
            "model has DTensor parameters but is not FSDP2-sharded (tensor parallelism?); the recorder "
            "supports data parallelism only (DDP, FSDP1, FSDP2, DeepSpeed)"
        )
    if world_size() > 1:
        raise UserError(
            f"torch.distributed has {world_size()} ranks but the model is not wrapped by DDP/FSDP/DeepSpeed, "
            "so its gradients are never reduced (each rank trains alone, or pipeline parallelism); wrap it "
            "(with the HF Trainer on CPU pass use_cpu=True under torchrun)"
        )
    return LocalBackend(model, engine="single", scale_fn=scale_fn)
