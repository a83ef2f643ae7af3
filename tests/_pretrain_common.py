"""Shared helpers of the pretraining tests.

Importing this module points ``LLM_REFINE_CACHE`` at a fresh directory for the whole pytest
session (inherited by the torchrun children), so tests never read or fill the user's cache and the
tokenizer/data are prepared once per session.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

if "LLM_REFINE_TEST_CACHE" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="llm-refine-test-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["LLM_REFINE_TEST_CACHE"] = _cache
os.environ["LLM_REFINE_CACHE"] = os.environ["LLM_REFINE_TEST_CACHE"]


def tiny_overrides(output_dir, *extra: str, steps: int = 30) -> list[str]:
    """A run of the smallest model that takes a few seconds: 30 steps, eval and checkpoint every 10."""
    return [
        f"output_dir={output_dir}",
        "model.size=cpu-0.5m",
        f"train.max_steps={steps}",
        "train.batch_size=8",
        "train.eval_every=10",
        "train.save_every=10",
        "train.save_total_limit=null",
        "train.print_every=0",
        "train.learning_rate=0.003",
        "data.val_sequences=16",
        "schedule.name=linear",
        "schedule.warmup_steps=5",
        *extra,
    ]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def history_records(path) -> list[dict]:
    return [r for r in read_jsonl(path) if "step" in r]
