"""A tiny pretraining run that SIGKILLs its own process as optimizer step ``KILL_STEP`` ends: no
exception handlers, no flushes, no atexit — like an OOM kill or a preempted node.

    python tests/_pretrain_kill.py OUTPUT_DIR KILL_STEP
"""

from __future__ import annotations

import os
import signal
import sys

from transformers import TrainerCallback

from _pretrain_common import REPO, tiny_overrides
from llm_refine.train.pretrain import load_pretrain_config, run_pretrain


class KillAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    out, step = sys.argv[1], int(sys.argv[2])
    cfg = load_pretrain_config(REPO / "recipes" / "pretrain_tiny.yaml", tiny_overrides(out))
    run_pretrain(cfg, callbacks=[KillAt(step)])
    sys.exit(3)  # not reached: the kill comes first
