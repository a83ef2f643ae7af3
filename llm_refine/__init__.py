"""llm-refine: refined learning-rate schedules from gradient-norm histories.

Implements "Optimal Linear Decay Learning Rate Schedules and Further Refinements" (Defazio,
Cutkosky, Mehta, Mishchenko; arXiv 2310.07831).

Names are imported lazily so that ``import llm_refine`` (and the CLI's ``refine``) does not pull in
torch or transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"  # the only place the version is written (pyproject reads it; see CHANGELOG.md)

_LAZY = {
    # refinement
    "refine_schedule": "llm_refine.refine",
    "refine_trace": "llm_refine.refine",
    "refine_file": "llm_refine.refine",
    "prepare_norms": "llm_refine.refine",
    "describe_schedule": "llm_refine.refine",
    "fit_warmup_poly": "llm_refine.refine",
    # schedules
    "ScheduleConfig": "llm_refine.schedules",
    "make_schedule": "llm_refine.schedules",
    "lambda_lr": "llm_refine.lr_schedulers",
    "use_schedule": "llm_refine.lr_schedulers",
    "get_refined_schedule_with_warmup": "llm_refine.lr_schedulers",
    "LinearSchedule": "llm_refine.schedules",
    "CosineSchedule": "llm_refine.schedules",
    "PolynomialSchedule": "llm_refine.schedules",
    "WSDSchedule": "llm_refine.schedules",
    "InverseSqrtSchedule": "llm_refine.schedules",
    "ConstantSchedule": "llm_refine.schedules",
    "RefinedSchedule": "llm_refine.schedules",
    # files
    "load_trace": "llm_refine.history",
    "HistoryWriter": "llm_refine.history",
    "read_schedule": "llm_refine.artifact",
    "write_schedule": "llm_refine.artifact",
    # recording
    "GradNormCallback": "llm_refine.recorder.callback",
    "GradNormRecorder": "llm_refine.recorder.core",
    "AccelerateGradNormHook": "llm_refine.recorder.accelerate_hook",
    "UserError": "llm_refine.errors",
    # pretraining
    "PretrainConfig": "llm_refine.train.config",
    "load_pretrain_config": "llm_refine.train.config",
    "run_pretrain": "llm_refine.train.pretrain",
    "build_model": "llm_refine.train.models",
    "prepare_data": "llm_refine.train.data",
    "evaluate_checkpoint": "llm_refine.train.evaluate",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'llm_refine' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value
