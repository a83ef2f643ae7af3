"""Refinement speed and memory benchmark; same as `llm-refine bench refine`."""

import sys

from llm_refine.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "refine", *sys.argv[1:]]))
