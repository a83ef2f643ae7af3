"""History I/O benchmark (issue #11): same as `llm-refine bench history`.

    python bench/history_io.py [--steps 1000000] [--python-reader] [--json]
"""

import sys

from llm_refine.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "history", *sys.argv[1:]]))
