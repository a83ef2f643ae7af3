"""Comparison reports over run directories.

Modules import downward only: `collect` (run dirs → RunResult) ← `stats` (aggregation, tables) ←
`plots` (figures) and `render` (Markdown/HTML) ← `build` (`build_report`) ← `compare` (the CLI).
"""

from .build import build_report
from .collect import collect_runs
from .compare import add_compare_arguments, main_compare

__all__ = ["build_report", "collect_runs", "add_compare_arguments", "main_compare"]
