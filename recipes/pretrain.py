"""Pretrain a LLaMA-style model from a recipe (thin wrapper over `llm_refine.train.pretrain`).

    python recipes/pretrain.py recipes/pretrain_tiny.yaml [--output_dir D] [--set key=value ...] [--prepare_only]
    torchrun --nproc_per_node 2 recipes/pretrain.py RECIPE.yaml ...
    accelerate launch --config_file launch/ddp.yaml recipes/pretrain.py RECIPE.yaml ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from llm_refine.errors import UserError
from llm_refine.train.pretrain import load_pretrain_config, run_pretrain, shutdown_distributed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe YAML (sections model, data, train, schedule, output_dir)")
    p.add_argument("--output_dir", help="overrides the recipe's output_dir")
    # action="extend": `--set a=1 --set b=2` keeps both (plain nargs would keep only the last).
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="dotted overrides, e.g. train.max_steps=50 schedule.name=cosine schedule.file=s.json")
    p.add_argument("--prepare_only", action="store_true",
                   help="only train the tokenizer and tokenize/pack the data into the cache, then exit "
                        "(do this once before a large multi-process run: ranks wait for rank 0's preparation)")
    a = p.parse_args(argv)
    overrides = list(a.set) + ([f"output_dir={a.output_dir}"] if a.output_dir else [])
    ok = False
    try:
        config = load_pretrain_config(a.recipe, overrides)
        if a.prepare_only:
            from llm_refine.train.data import prepare_data

            data = prepare_data(config.data)
            print(json.dumps({k: data.meta[k] for k in ("key", "train_sequences", "val_sequences_available", "train_tokens")}))
            return 0
        summary = run_pretrain(config)
        ok = True
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed(barrier=ok)
    if os.environ.get("RANK", "0") == "0":  # one line per run, not per process
        print(json.dumps({k: summary[k] for k in ("final_val_loss", "perplexity", "tokens_seen", "wall_time_s", "steps_per_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
