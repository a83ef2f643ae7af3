"""Pretrain a LLaMA-style model from a config (a thin example over ``python -m llm_refine.train``).

    python recipes/pretrain.py recipes/pretrain_tiny.yaml [--output_dir D] [--set key=value ...] [--prepare_only]
    torchrun --nproc_per_node 2 recipes/pretrain.py CONFIG.yaml ...
    accelerate launch --config_file launch/ddp.yaml recipes/pretrain.py CONFIG.yaml ...

The same works from anywhere with the installed package, no checkout needed:
``llm-refine pretrain CONFIG`` (= ``python -m llm_refine.train CONFIG``), ``torchrun -m
llm_refine.train``, ``accelerate launch -m llm_refine.train``; ``llm-refine examples copy
pretrain_tiny`` (or ``single_cpu``, ``ddp``, ...) copies a shipped config to edit.
"""

import sys

from llm_refine.train.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
