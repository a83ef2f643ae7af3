"""Gradient-norm recorder: exact global ℓ1/ℓ2 per optimizer step for single-process, DDP, FSDP1,
FSDP2 and DeepSpeed training, as a HF Trainer callback or an accelerate hook.

- ``backends``: the backend contract, one backend per engine (single/DDP, FSDP1/2, DeepSpeed) and
  ``detect_backend``, the one place a backend is chosen.
- ``core``: ``GradNormRecorder`` (device buffer, one all-reduce per step, periodic host flush).
- ``callback``: ``GradNormCallback`` for ``transformers.Trainer``.
- ``accelerate_hook``: ``AccelerateGradNormHook`` for custom accelerate loops.
- ``engine``: ``engine_info(trainer)`` / ``release_engine(trainer)`` for training scripts.

Names are imported lazily, so importing one piece does not pull in transformers or deepspeed.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "GradNormRecorder": ".core",
    "GradNormCallback": ".callback",
    "AccelerateGradNormHook": ".accelerate_hook",
    "NormBackend": ".backends",
    "ParamGradBackend": ".backends",
    "detect_backend": ".backends",
    "grad_scale_of": ".backends",
    "DeepSpeedBackend": ".backends.deepspeed",
    "install_step_hook": ".backends.deepspeed",
    "engine_info": ".engine",
    "release_engine": ".engine",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'llm_refine.recorder' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value
    return value
