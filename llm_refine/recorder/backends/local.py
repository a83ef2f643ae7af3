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
        self._plain: bool | None = None  # no parameter is a DTensor (set at the first capture)

    def local_grads(self):
        # A plain parameter has a plain gradient: check the parameters once instead of every
        # gradient every step (local_part's check, which raises for DTensors, still runs if any is).
        if self._plain is None:
            self._plain = not any(is_dtensor(p) for p in self.parameters())
        if not self._plain:
            return super().local_grads()
        return [(p, g) for p in self.parameters() if (g := p.grad) is not None]

    def local_part(self, grad):
        if is_dtensor(grad):
            raise UserError(
                f"{self.engine} model has DTensor gradients (tensor parallelism?); the recorder "
                "supports plain data parallelism only: use FSDP2 without other mesh dims, or DDP"
            )
        return grad
