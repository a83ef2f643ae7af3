"""The pipeline's report: final validation loss by size × schedule, fairness settings, plots.

`build_report(runs, out)` writes ``report.md``, a standalone ``report.html`` (PNGs embedded as data
URIs) and ``plots/*.png``: each section below is a list of blocks (`render`), the figures come from
`plots`, the numbers from `stats`. A degenerate refinement is shown as such, never hidden.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from ..fileio import atomic_write_text
from ..train.rundir import EVAL_FILE, RUN_CONFIG, SUMMARY
from .collect import RunResult, refined_schedules
from .plots import plot_gradnorms, plot_loss_vs_size, plot_schedules, plot_val_curves
from .render import render
from .stats import (
    baseline_for,
    fairness_rows,
    flat_scalars,
    fmt_num,
    is_degenerate,
    loss_table,
    runs_table,
    sched_sort,
    size_order,
    sweep_table,
    tau_of,
)

Artifacts = dict[str, tuple[Path, dict]]


def _overview(runs: list[RunResult], title: str, recipe) -> list[tuple]:
    blocks: list[tuple] = [("h1", title)]
    if recipe is not None and getattr(recipe, "description", ""):
        blocks.append(("p", recipe.description))
    seeds = sorted({r.seed for r in runs if r.seed is not None})
    blocks.append(("p", f"{len(runs)} finished runs: sizes {', '.join(size_order(runs))}; "
                        f"schedules {', '.join(sched_sort(r.schedule for r in runs))}; "
                        f"seeds {', '.join(map(str, seeds)) or '?'}."))
    return blocks


def _loss_section(runs: list[RunResult]) -> list[tuple]:
    srcs = sorted({r.loss_source for r in runs})
    blocks: list[tuple] = [
        ("h2", "Final validation loss"),
        ("table", *loss_table(runs)),
        ("p", "Mean ± standard deviation over seeds (n = number of seeds) of the final validation loss "
              "(lower is better); [±x%] is the relative change vs linear at the same size. Each schedule is "
              f"shown at its best peak LR. Loss source: {', '.join(srcs)} "
              f"({EVAL_FILE} = the final checkpoint evaluated on the held-out validation set)."),
    ]
    missing = [r for r in runs if r.final_val_loss is None]
    if missing:
        blocks.append(("warn", f"{len(missing)} run(s) finished without a final loss: " + ", ".join(str(r.run_dir) for r in missing)))
    sw = sweep_table(runs)
    if sw is not None:
        blocks += [("h2", "Peak-LR sweep"), ("table", *sw)]
    return blocks


def _fairness_section(runs: list[RunResult]) -> list[tuple]:
    data_cfg = next((r.config.get("data") for r in runs if isinstance(r.config.get("data"), dict)), None)
    notes = ["Same seed ⇒ same initialization and data order for every schedule: runs differ only in the schedule "
             f"(and the peak LR where a sweep picks it); the last column checks this from each run's {RUN_CONFIG}."]
    if data_cfg:
        notes.append("data: " + ", ".join(f"{k}={v}" for k, v in flat_scalars(data_cfg)))
    return [("h2", "Fairness settings"), ("table", *fairness_rows(runs)), ("list", notes)]


def _refinement_items(f: Path, art: dict) -> list[str]:
    prov = art.get("provenance") or {}
    items = [f"schedule file: {f}", f"refined from: {prov.get('source', '?')} (sha256 {str(prov.get('source_sha256', '?'))[:12]}…)",
             f"norm {prov.get('norm', '?')}, tau {prov.get('tau', '?')}, {len(art.get('multipliers', []))} steps"]
    items += [f"{k}: {fmt_num(v)}" for k, v in flat_scalars(art.get("diagnostics") or {}) if v not in ("", None)][:20]
    items += [f"fit {k}: {fmt_num(v)}" for k, v in flat_scalars(art.get("fit") or {})][:8]
    return items


def _refinement_section(runs: list[RunResult], arts: Artifacts) -> list[tuple]:
    if not arts:
        return []
    blocks: list[tuple] = [("h2", "Refinement")]
    for size in (s for s in size_order(runs) if s in arts):
        f, art = arts[size]
        if is_degenerate(art):
            blocks.append(("warn", f"{size}: the refinement is DEGENERATE — see the diagnostics below; "
                                   "the refined runs used it as it is."))
        blocks += [("h3", size), ("list", _refinement_items(f, art))]
    return blocks


def _plots_section(runs: list[RunResult], arts: Artifacts, plots: Path) -> list[tuple]:
    figures = [(plot_loss_vs_size(runs, plots / "final_loss_vs_size.png"), "final validation loss vs model size")]
    for size in size_order(runs):
        path = lambda kind: plots / f"{kind}-{_safe(size)}.png"  # noqa: E731
        base = baseline_for(runs, size)
        figures += [
            (plot_schedules(runs, size, path("schedules"), arts.get(size, (None, None))[1]),
             f"{size}: LR schedules: refined beside linear and cosine"),
            (plot_val_curves(runs, size, path("val_loss")), f"{size}: validation loss curves"),
            (plot_gradnorms(base, path("gradnorms"), tau_of(arts.get(size))) if base else None,
             f"{size}: raw and smoothed gradient norms of the linear baseline"),
        ]
    return [("h2", "Plots")] + [("img", p, cap) for p, cap in figures if p]


def build_report(runs: list[RunResult], out: str | os.PathLike, *, title: str = "llm-refine report", recipe=None) -> dict:
    """Write report.md, report.html and plots/*.png under ``out``; returns their paths."""
    out = Path(out)
    if not runs:
        raise UserError(f"{out}: no finished runs (no {SUMMARY}) to report on; run the pipeline first")
    arts = refined_schedules(runs)
    blocks = [
        *_overview(runs, title, recipe),
        *_loss_section(runs),
        *_fairness_section(runs),
        *_refinement_section(runs, arts),
        *_plots_section(runs, arts, out / "plots"),
        ("h2", "Runs"),
        ("table", *runs_table(runs, out)),
    ]
    md, page = render(blocks, out)
    return {
        "markdown": atomic_write_text(out / "report.md", md),
        "html": atomic_write_text(out / "report.html", page),
        "plots": [b[1] for b in blocks if b[0] == "img"],
    }


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in s)
