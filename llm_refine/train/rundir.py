"""The run directory and the pipeline's output tree: file names, and the readers every layer uses.

One place for what a run leaves on disk, so pretraining (writes), the pipeline (decides skip /
resume / run), evaluation and the report (read) agree on names and on what "finished" means::

    <run_dir>/run_config.json   the resolved pretraining config (+ "runtime"); re-runnable as is
              gradnorms.jsonl   the gradient-norm history (llm_refine.history)
              train_log.jsonl   per logged step: step, loss, lr, batch fingerprint
              eval_log.jsonl    per evaluation: step, val_loss
              checkpoint-N/     Trainer checkpoints (the model's own config.json lives here), each
                                with llm_refine_progress.json: the run's elapsed time up to it
              summary.json      written last: its presence means the run finished
              eval.json         the pipeline's evaluation of the final checkpoint
              pipeline_stage.json  what the pipeline launched here (stage id, spec hash)
    <out>/pipeline_state.json  recipe.yaml  report.md  report.html  plots/
    <out>/<size>/refined_schedule.json

The run's own config is ``run_config.json``, not ``config.json``: that name belongs to the HF
model config inside every checkpoint.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..fileio import read_json, read_jsonl

RUN_CONFIG = "run_config.json"
GRADNORMS = "gradnorms.jsonl"
TRAIN_LOG = "train_log.jsonl"
EVAL_LOG = "eval_log.jsonl"
SUMMARY = "summary.json"
EVAL_FILE = "eval.json"
STAGE_MARKER = "pipeline_stage.json"
STATE_FILE = "pipeline_state.json"
REFINED_FILE = "refined_schedule.json"
RECIPE_COPY = "recipe.yaml"
LOCK_FILE = ".pipeline.lock"
PROGRESS_FILE = "llm_refine_progress.json"  # in each checkpoint-N/

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")

__all__ = [
    "RUN_CONFIG", "GRADNORMS", "TRAIN_LOG", "EVAL_LOG", "SUMMARY", "EVAL_FILE", "STAGE_MARKER", "STATE_FILE",
    "REFINED_FILE", "RECIPE_COPY", "LOCK_FILE", "PROGRESS_FILE", "read_json", "read_jsonl", "latest_checkpoint",
    "checkpoint_step", "final_checkpoint", "is_finished", "read_summary", "read_run_config",
]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The ``checkpoint-N`` with the largest N that the Trainer can resume from (it has a complete
    ``trainer_state.json``), or None. One rule for every caller: the pipeline reports "resumed"
    exactly when pretraining will resume."""
    best, best_step = None, -1
    for p in Path(run_dir).glob("checkpoint-*"):
        m = _CHECKPOINT.fullmatch(p.name)
        if m and int(m.group(1)) > best_step and (p / "trainer_state.json").is_file():
            best, best_step = p, int(m.group(1))
    return best


def checkpoint_step(ckpt: str | os.PathLike) -> int:
    """The optimizer steps done at a checkpoint (from its trainer state)."""
    return int(json.loads((Path(ckpt) / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])


def read_summary(run_dir: str | os.PathLike) -> dict | None:
    s = read_json(Path(run_dir) / SUMMARY)
    return s if isinstance(s, dict) else None


def is_finished(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / SUMMARY).is_file()


def read_run_config(run_dir: str | os.PathLike) -> dict | None:
    c = read_json(Path(run_dir) / RUN_CONFIG)
    return c if isinstance(c, dict) else None


def final_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint the run ended with: summary.json's ``last_checkpoint``, else the newest."""
    last = (read_summary(run_dir) or {}).get("last_checkpoint")
    if isinstance(last, str) and Path(last).is_dir():
        return Path(last)
    return latest_checkpoint(run_dir)
