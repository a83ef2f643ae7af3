"""Single process and DDP: every rank holds the full, already averaged gradient in ``p.grad``."""

from __future__ import annotations

from typing import Any

from torch import nn

from ...errors import UserError
from .base import ParamGradBackend, is_dtensor


class LocalBackend(ParamGradBackend):
    """Single process, or DDP (``engine="ddp"``, ``group`` = DDP's process group): the gradient is
    replicated, so nothing is reduced (summing would count it world-size times)."""

    def __init__(self, module: nn.Module, *, engine: str = "single", group: Any = None, **kw):
        super().__init__(**kw)
        self.module = module
        self.engine = engine
        self.group = group

    def local_part(self, grad):
        if is_dtensor(grad):
            raise UserError(
                f"{self.engine} model has DTensor gradients (tensor parallelism?); the recorder "
                "supports plain data parallelism only: use FSDP2 without other mesh dims, or DDP"
            )
        return grad
