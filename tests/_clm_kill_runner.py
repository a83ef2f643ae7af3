"""Runs a training script (argv[1]: ``tests/_clm_no_trainer_loop.py``, or a hooked tmp copy of the stock
example) with its own arguments (argv[2:]) as ``__main__``,
optionally SIGKILLing this process at the start of the N-th ``accelerator.backward`` call
(``CLM_KILL_AT_BACKWARD=N``): a deterministic stand-in for a crash / preemption in the middle of an
optimizer step. Every rank counts its own backward calls, so under ``accelerate launch`` all ranks
die at the same point, before that micro-batch's all-reduce. The script itself is not changed."""

import os
import runpy
import signal
import sys

kill_at = int(os.environ.get("CLM_KILL_AT_BACKWARD", "0") or 0)
if kill_at:
    from accelerate import Accelerator

    orig = Accelerator.backward
    calls = [0]

    def backward(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(self, *args, **kwargs)

    Accelerator.backward = backward

script = sys.argv[1]
sys.argv = [script] + sys.argv[2:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")
