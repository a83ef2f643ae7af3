"""Gradient-norm recorder: exact global ℓ1/ℓ2 per optimizer step for single-process, DDP, FSDP1,
FSDP2 and DeepSpeed training, as a HF Trainer callback or an accelerate hook.

- ``backends``: where each engine keeps its gradients → this rank's partial sums.
- ``core``: ``GradNormRecorder`` (device buffer, one all-reduce per step, periodic host flush).
- ``callback``: ``GradNormCallback`` for ``transformers.Trainer``.
- ``accelerate_hook``: ``AccelerateGradNormHook`` for custom accelerate loops.
- ``deepspeed``: the DeepSpeed backend and its optimizer-step hook.

Names are imported lazily, so importing one piece does not pull in transformers or deepspeed.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "GradNormRecorder": ".core",
    "GradNormCallback": ".callback",
    "AccelerateGradNormHook": ".accelerate_hook",
    "NormBackend": ".backends",
    "detect_backend": ".backends",
    "grad_scale_of": ".backends",
    "DeepSpeedBackend": ".deepspeed",
    "install_step_hook": ".deepspeed",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'llm_refine.recorder' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value
    return value
