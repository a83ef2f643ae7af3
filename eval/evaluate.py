"""Validation loss of a pretraining checkpoint (thin CLI over `llm_refine.train.evaluate`).

    python eval/evaluate.py runs/tiny/checkpoint-600 [--recipe RECIPE.yaml --set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys

from llm_refine.errors import UserError
from llm_refine.train.evaluate import evaluate_checkpoint
from llm_refine.train.pretrain import load_pretrain_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint-N directory written by recipes/pretrain.py")
    p.add_argument("--recipe", help="the run's recipe (default: config.json of the run holding the checkpoint)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for --recipe")
    a = p.parse_args(argv)
    try:
        config = load_pretrain_config(a.recipe, a.set) if a.recipe else None
        result = evaluate_checkpoint(a.checkpoint, config)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
