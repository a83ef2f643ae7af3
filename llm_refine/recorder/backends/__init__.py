"""Where each training engine keeps its gradients, and how to turn them into exact global sums.

- ``base``: the contract (:class:`NormBackend`; :class:`ParamGradBackend` for engines with
  per-parameter gradients) and shared pieces (``sums_of``, ``grad_scale_of``, ``world_size``).
- ``local``: single process and DDP. ``fsdp``: FSDP1 and FSDP2. ``deepspeed``: DeepSpeed ZeRO-0/1/2/3
  and its optimizer-step hook (imported only when a DeepSpeed engine is detected, or on demand).
- ``detect``: :func:`detect_backend`, the one place a backend is chosen and built.

Setups whose numbers we cannot get right (tensor/pipeline parallelism, DTensor meshes with
non-data-parallel dims, an unwrapped model on several ranks whose gradients are never reduced)
raise :class:`~llm_refine.errors.UserError` instead of recording wrong norms.
"""

from __future__ import annotations

from .base import NormBackend, ParamGradBackend, grad_scale_of, on_comm_device, sums_of, world_size
from .detect import detect_backend
from .fsdp import FSDP1Backend, FSDP2Backend
from .local import LocalBackend

__all__ = [
    "DeepSpeedBackend",
    "FSDP1Backend",
    "FSDP2Backend",
    "LocalBackend",
    "NormBackend",
    "ParamGradBackend",
    "detect_backend",
    "grad_scale_of",
    "on_comm_device",
    "sums_of",
    "world_size",
]


def __getattr__(name: str):
    # Lazy, so that importing the recorder never imports the DeepSpeed backend module.
    if name == "DeepSpeedBackend":
        from .deepspeed import DeepSpeedBackend

        return DeepSpeedBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
