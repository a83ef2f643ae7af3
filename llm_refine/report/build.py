"""The pipeline's report: verdict first, then the numbers behind it, then per size the plots.

`build_report(runs, out)` writes ``report.md``, a standalone ``report.html`` (CSS inline, PNGs
embedded as data URIs) and ``plots/*.png``. Every path in the documents is relative to ``out``, so
the folder can be zipped and opened elsewhere. Sections, in order:

1. **Verdict** — the rule, then one sentence per size (each schedule vs linear, paired by seed);
   a warning where the held-out set is too small for its noise to be negligible.
2. **Final validation loss** — size × schedule at its best LR: mean ± sd (n), Δ to linear with
   its 95% interval and the verdict; then every (size, schedule, LR) cell's paired difference.
3. **Validation noise** — per size the validation SE (over sequences, over tokens) beside the
   seed-to-seed sd.
4. Peak-LR sweep (when there is one), fairness settings, the refinement's diagnostics (a table).
5. One section per size: per-seed losses and Δ, the plots inline (gradient norms with the
   median filter, schedules as trained, validation curves, loss vs LR).
6. Every run.

The numbers come from `stats`, the figures from `plots`, the rendering from `render`. A degenerate
refinement is shown as such, never hidden.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from ..fileio import atomic_write_text
from ..labels import BASELINE
from ..train.rundir import EVAL_FILE, RUN_CONFIG, SUMMARY
from .collect import RunResult, refined_schedules
from .plots import plot_gradnorms, plot_loss_vs_lr, plot_loss_vs_size, plot_schedules, plot_val_curves
from .render import render
from .stats import (
    NOISE_RATIO,
    VERDICT_RULE,
    baseline_for,
    comparison_table,
    fairness_rows,
    flat_scalars,
    fmt_num,
    is_degenerate,
    loss_table,
    noise,
    noise_table,
    per_seed_table,
    rel_path,
    runs_table,
    sched_sort,
    size_order,
    sweep_table,
    tau_of,
    verdict_sentence,
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


def _noise_warnings(runs: list[RunResult]) -> list[tuple]:
    out = []
    for size in size_order(runs):
        nz = noise(runs, size)
        if nz.too_noisy:
            need = f" to about {nz.sequences_needed} or more" if nz.sequences_needed else ""
            out.append(("warn", f"{size}: the validation estimate's own noise (SE {nz.val_se:.4f} over "
                                f"{nz.val_sequences or '?'} held-out sequences) is {nz.ratio:.2f} of the seed-to-seed sd "
                                f"({nz.seed_sd:.4f}), more than {NOISE_RATIO:.2g}: enlarge data.val_sequences{need} "
                                "(the SE shrinks as 1/√sequences) so that the losses measure the models rather than "
                                "the held-out sample (for the paired Δ, see its held-out SE under Final validation "
                                "loss)."))
    return out


def _verdict_section(runs: list[RunResult]) -> list[tuple]:
    return [
        ("h2", "Verdict"),
        ("verdict", [verdict_sentence(runs, size) for size in size_order(runs)]),
        ("p", VERDICT_RULE),
        *_noise_warnings(runs),
    ]


def _loss_section(runs: list[RunResult], plots: Path) -> list[tuple]:
    srcs = sorted({r.loss_source for r in runs})
    blocks: list[tuple] = [
        ("h2", "Final validation loss"),
        ("table", *loss_table(runs)),
        ("p", "Mean ± sample standard deviation over seeds (n = number of seeds) of the final validation loss "
              f"(lower is better), each schedule at its best peak LR. For every schedule but {BASELINE}: Δ = the "
              f"mean paired difference to {BASELINE} (same seed, same peak LR), its 95% interval in brackets and "
              f"the verdict. Loss source: {', '.join(srcs)} "
              f"({EVAL_FILE} = the final checkpoint evaluated on the held-out validation set)."),
    ]
    missing = [r for r in runs if r.final_val_loss is None]
    if missing:
        blocks.append(("warn", f"{len(missing)} run(s) finished without a final loss: "
                               + ", ".join(rel_path(r.run_dir, plots.parent) for r in missing)))
    blocks += [
        ("h3", f"Paired differences to {BASELINE}, every size × schedule × peak LR"),
        ("table", *comparison_table(runs)),
    ]
    fig = plot_loss_vs_size(runs, plots / "final_loss_vs_size.png")
    if fig:
        blocks.append(("img", fig, "final validation loss vs model size (each schedule at its best LR; bars: sd over seeds)"))
    return blocks


def _noise_section(runs: list[RunResult]) -> list[tuple]:
    return [
        ("h2", "Validation noise"),
        ("table", *noise_table(runs)),
        ("p", "The validation loss is a mean over a finite held-out sample, so it has its own standard error (SE): "
              "how far another held-out sample of the same size would move it. The SE over sequences, sd(per-sequence "
              "mean loss) / √sequences, is the honest one, since tokens of one sequence share their context and are "
              "correlated; the SE over tokens treats them as independent and is shown for comparison (median over "
              "the size's runs). The seed-to-seed sd is the sample sd of the final loss over seeds, pooled over the "
              f"size's schedules and LRs. The held-out set is large enough when its SE is at most {NOISE_RATIO:.2g} "
              "of the seed sd; with one seed the seed sd is not measured. This SE is the noise of each run's loss "
              "level. A paired Δ is less exposed: both runs are scored on the same held-out sequences, so the "
              "held-out set's share of the noise in Δ is sd(per-sequence differences) / √sequences, the last "
              "column of the paired-differences table where eval.json holds per-sequence losses "
              "(evaluate_checkpoint(..., sequence_losses=True))."),
    ]


def _fairness_section(runs: list[RunResult], out: Path) -> list[tuple]:
    data_cfg = next((r.config.get("data") for r in runs if isinstance(r.config.get("data"), dict)), None)
    notes = ["Same seed ⇒ same initialization and data order for every schedule: runs differ only in the schedule "
             f"(and the peak LR where a sweep picks it); the last column checks this from each run's {RUN_CONFIG}."]
    if data_cfg:
        notes.append("data: " + ", ".join(f"{k}={_shown(v, out)}" for k, v in flat_scalars(data_cfg)))
    return [("h2", "Fairness settings"), ("table", *fairness_rows(runs)), ("list", notes)]


def _shown(v, out: Path) -> str:
    """A setting's value as shown: absolute paths relative to the report."""
    return rel_path(v, out) if isinstance(v, str) and os.path.isabs(v) else str(v)


def _pct(x) -> str:
    return f"{100 * x:.0f}%" if isinstance(x, (int, float)) and not isinstance(x, bool) else "?"


def refinement_table(arts: Artifacts, sizes: list[str], out: Path) -> tuple[list[str], list[list[str]]]:
    header = ["size", "schedule file", "refined from (sha256)", "norm, tau", "steps", "warm-up", "peak at",
              "above half the peak", "final anneal", "fit: warm-up, power, R²", "degenerate"]
    rows = []
    for size in (s for s in sizes if s in arts):
        f, art = arts[size]
        prov, diag, fit = art.get("provenance") or {}, art.get("diagnostics") or {}, art.get("fit") or {}
        src = prov.get("source")
        rows.append([
            size, rel_path(f, out),
            f"{_shown(src, out) if src else '?'} ({str(prov.get('source_sha256', '?'))[:12]}…)",
            f"{prov.get('norm', '?')}, {fmt_num(prov.get('tau'))}",
            str(len(art.get("multipliers") or [])),
            f"{fmt_num(diag.get('warmup_steps'))} steps, from {fmt_num(diag.get('start_multiplier'), 3)}",
            f"step {fmt_num(diag.get('peak_step'))} ({_pct(diag.get('peak_fraction'))})",
            _pct(diag.get("above_half_fraction")),
            f"{fmt_num(diag.get('final_anneal_steps'))} steps ({_pct(diag.get('final_anneal_fraction'))})",
            (f"{_pct(fit.get('warmup_fraction'))}, {fmt_num(fit.get('power'), 3)}, {fmt_num(fit.get('r2'), 3)}"
             if fit else "—"),
            f"YES: {diag.get('degenerate_reason') or '?'}" if is_degenerate(art) else "no",
        ])
    return header, rows


def _refinement_section(runs: list[RunResult], arts: Artifacts, out: Path) -> list[tuple]:
    if not arts:
        return []
    blocks: list[tuple] = [("h2", "Refinement")]
    for size in (s for s in size_order(runs) if s in arts):
        if is_degenerate(arts[size][1]):
            blocks.append(("warn", f"{size}: the refinement is DEGENERATE ({arts[size][1]['diagnostics'].get('degenerate_reason') or '?'}); "
                                   "the refined runs used it as it is."))
    blocks += [
        ("table", *refinement_table(arts, size_order(runs), out)),
        ("p", "Warm-up: steps before the multiplier first reaches 90% of its peak; above half the peak: share of "
              "steps; final anneal: steps after the last one above half the peak; fit: least-squares linear warm-up "
              "then (1 − progress)^power. Degenerate: peak in the last quarter of the run or < 10% of steps above "
              "half the peak."),
    ]
    return blocks


def _size_section(runs: list[RunResult], size: str, arts: Artifacts, plots: Path) -> list[tuple]:
    path = lambda kind: plots / f"{kind}-{_safe(size)}.png"  # noqa: E731
    base = baseline_for(runs, size)
    figures = [
        (plot_gradnorms(base, path("gradnorms"), tau_of(arts.get(size))) if base else None,
         f"{size}: raw gradient norms of the linear baseline and the median filter the refinement used"),
        (plot_schedules(runs, size, path("schedules"), arts.get(size, (None, None))[1]),
         f"{size}: LR schedules as trained"),
        (plot_val_curves(runs, size, path("val_loss")), f"{size}: validation loss curves"),
        (plot_loss_vs_lr(runs, size, path("loss_vs_lr")), f"{size}: final validation loss vs peak LR"),
    ]
    blocks: list[tuple] = [
        ("h2", f"Size {size}"),
        ("p", verdict_sentence(runs, size)),
        ("h3", "Final validation loss per seed (each schedule at its best LR) and Δ to linear"),
        ("table", *per_seed_table(runs, size)),
    ]
    if not any(p for p, _ in figures[3:]):
        blocks.append(("p", "One peak LR: no loss-vs-LR plot."))
    return blocks + [("img", p, cap) for p, cap in figures if p]


def build_report(runs: list[RunResult], out: str | os.PathLike, *, title: str = "llm-refine report", recipe=None) -> dict:
    """Write report.md, report.html and plots/*.png under ``out``; returns their paths."""
    out = Path(out)
    if not runs:
        raise UserError(f"{out}: no finished runs (no {SUMMARY}) to report on; run the pipeline first")
    arts = refined_schedules(runs)
    plots = out / "plots"
    sw = sweep_table(runs)
    blocks = [
        *_overview(runs, title, recipe),
        *_verdict_section(runs),
        *_loss_section(runs, plots),
        *_noise_section(runs),
        *([("h2", "Peak-LR sweep"), ("table", *sw)] if sw is not None else []),
        *_fairness_section(runs, out),
        *_refinement_section(runs, arts, out),
        *(b for size in size_order(runs) for b in _size_section(runs, size, arts, plots)),
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
