"""``python -m llm_refine.train CONFIG [--output_dir D] [--set key=value ...] [--prepare-only]``.

The packaged training entry point: works the same under ``python``, ``torchrun -m llm_refine.train``
and ``accelerate launch -m llm_refine.train``. CONFIG is a pretraining YAML (sections model, data,
train, schedule, output_dir) or a run's own ``run_config.json`` (the pipeline launches that).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llm_refine.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="pretraining YAML, or a run's run_config.json")
    p.add_argument("--output_dir", help="overrides the config's output_dir")
    # action="extend": `--set a=1 --set b=2` keeps both (plain nargs would keep only the last).
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="dotted overrides, e.g. train.max_steps=50 schedule.name=cosine schedule.file=s.json")
    p.add_argument("--prepare-only", "--prepare_only", dest="prepare_only", action="store_true",
                   help="only train the tokenizer and tokenize/pack the data into the cache, then exit "
                        "(do this once before a large multi-process run: ranks wait for rank 0's preparation)")
    return p


def main(argv: list[str] | None = None) -> int:
    from ..errors import run_reporting_errors
    from ..logsetup import stdout_logging

    a = build_parser().parse_args(argv)
    with stdout_logging():
        return run_reporting_errors("python -m llm_refine.train", lambda: run(a))


def _prepare(a: argparse.Namespace, overrides: list[str]) -> int:
    """--prepare-only: the tokenizer and the packed data in the cache. No torch import (seconds
    saved on every job of a SLURM chain's preparation step), no process group."""
    from .config import load_pretrain_config
    from .data import prepare_data

    data = prepare_data(load_pretrain_config(a.config, overrides).data)
    print(json.dumps({k: data.meta[k] for k in ("key", "train_sequences", "val_sequences_available", "train_tokens")}))
    return 0


def run(a: argparse.Namespace) -> int:
    """Train (or only prepare) from parsed arguments. Bad input raises `UserError`; the caller
    (``main`` here, ``llm-refine pretrain`` in the CLI) turns it into its one-line error, exit 2."""
    overrides = list(a.set) + ([f"output_dir={a.output_dir}"] if a.output_dir else [])
    if a.prepare_only:
        return _prepare(a, overrides)
    from .config import load_pretrain_config
    from .pretrain import run_pretrain, set_threads, shutdown_distributed

    ok = False
    try:
        config = load_pretrain_config(a.config, overrides)
        set_threads(config.train)
        summary = run_pretrain(config)
        ok = True
    finally:
        shutdown_distributed(barrier=ok)
    if os.environ.get("RANK", "0") == "0":  # one line per run, not per process
        print(json.dumps({k: summary[k] for k in ("final_val_loss", "perplexity", "tokens_seen", "wall_time_s", "steps_per_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
