"""Comparison reports over run directories: collect, statistics, plots, render."""

from .build import build_report, collect_runs  # noqa: F401
