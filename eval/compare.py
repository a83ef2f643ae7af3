"""Rebuild the pipeline report from existing run directories (same as `llm-refine compare`).

    python eval/compare.py runs/tiny                 # report.md/html + plots/ in runs/tiny
    python eval/compare.py runs/a runs/b --out cmp   # several sweeps in one report
"""

import sys

from llm_refine.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
