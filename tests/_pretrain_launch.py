"""What the distributed pretraining tests start under torchrun: ``recipes/pretrain.py``'s main.

With ``DS_ACCELERATOR=cpu`` it first stops DeepSpeed from JIT-compiling its shared-memory
all-reduce op (35-75 s of g++ on first use; only inference all-reduce uses it, training
collectives go through torch.distributed/gloo): deepspeed 0.19.8 skips the build when
``deepspeed.ops.__compatible_ops__[NAME]`` is False, a per-process dict that keeps edits.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

if os.environ.get("DS_ACCELERATOR") == "cpu":
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False

recipe_main = runpy.run_path(str(Path(__file__).resolve().parents[1] / "recipes" / "pretrain.py"))["main"]
sys.exit(recipe_main(sys.argv[1:]))
