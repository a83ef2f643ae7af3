"""What a training script needs to know about, and do with, the engine a Trainer really ran.

``engine_info(trainer)``: a JSON-able description for a run summary (the distributed type, world
size, device, mixed precision, the ZeRO stage with DeepSpeed, the wrapped model's class), read from
the Trainer's accelerator and wrapped model — what ran, not what was asked for (frameworks
downgrade silently on CPU). ``release_engine(trainer)``: free the engine at the end of a run
(DeepSpeed's ``destroy()``; without it gloo runs occasionally abort at exit).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def engine_info(trainer: Any) -> dict:
    """The engine ``trainer`` trained with, as a JSON-able dict."""
    acc = trainer.accelerator
    info = {
        "distributed_type": str(acc.distributed_type).split(".")[-1],
        "world_size": acc.num_processes,
        "device": str(acc.device),
        "mixed_precision": str(acc.mixed_precision),
    }
    wrapped = getattr(trainer, "model_wrapped", None)
    if hasattr(wrapped, "zero_optimization_stage"):
        info["zero_stage"] = int(wrapped.zero_optimization_stage())
    info["model_class"] = type(wrapped).__name__
    return info


def release_engine(trainer: Any) -> None:
    """Release the Trainer's engine (DeepSpeed: ``engine.destroy()``); best effort, never raises."""
    wrapped = getattr(trainer, "model_wrapped", None)
    if hasattr(wrapped, "destroy"):
        try:
            wrapped.destroy()
        except Exception:  # best effort at exit
            log.debug("releasing %s failed", type(wrapped).__name__, exc_info=True)
