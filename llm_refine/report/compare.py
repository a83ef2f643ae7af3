"""`llm-refine compare DIR... [--out DIR]`: rebuild the report from existing runs, so nothing needs
retraining to re-plot (also ``python eval/compare.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from ..train.rundir import SUMMARY
from .build import build_report
from .collect import collect_runs


def add_compare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("dirs", nargs="+", metavar="DIR", help=f"pipeline outputs or run directories (searched for {SUMMARY})")
    parser.add_argument("--out", default=None, help="where report.md/html and plots/ go (default: the DIR when only one is given)")
    parser.add_argument("--title", default=None, help="report title")
    return parser


def main_compare(args: argparse.Namespace) -> int:
    dirs = [Path(d) for d in args.dirs]
    out = Path(args.out) if getattr(args, "out", None) else None
    if out is None:
        if len(dirs) != 1:
            raise UserError("compare: several DIRs given; pass --out DIR for the report")
        out = dirs[0]
    runs = collect_runs(dirs, tag_sources=len(dirs) > 1)
    title = getattr(args, "title", None) or f"llm-refine comparison: {', '.join(d.name or str(d) for d in dirs)}"
    paths = build_report(runs, out, title=title)
    # The command's result line (CLI edge code, not a diagnostic).
    print(f"{len(runs)} runs -> {paths['markdown']}, {paths['html']}, {len(paths['plots'])} plots in {out / 'plots'}")
    return 0
