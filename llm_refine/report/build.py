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
from .collect import RunResult, ScheduleFile, refined_schedules, schedule_files
from .plots import plot_gradnorms, plot_loss_vs_lr, plot_loss_vs_size, plot_schedule_files, plot_schedules, plot_val_curves
from .render import render
from .stats import (
    NOISE_RATIO,
    VERDICT_RULE,
    baseline_for,
    best_cells,
    comparison_table,
    fairness_rows,
    flat_scalars,
    fmt_flops,
    fmt_loss,
    fmt_num,
    is_degenerate,
    lr_edge_warnings,
    tuned_table,
    loss_table,
    noise,
    noise_table,
    per_seed_table,
    rel_path,
    runs_table,
    sched_sort,
    schedule_compute,
    schedule_distance,
    schedule_source_dirs,
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
        if not nz.too_noisy:
            continue
        need = f" to about {nz.sequences_needed} or more" if nz.sequences_needed else ""
        if nz.judged_by == "paired":
            what = (f"the held-out share of the paired Δs' noise (SE {nz.paired_se:.4f} over {nz.val_sequences or '?'} "
                    f"held-out sequences) is {nz.paired_ratio:.2f} of the sd of Δ over seeds ({nz.paired_sd:.4f})")
        else:
            what = (f"the validation estimate's own noise (SE {nz.val_se:.4f} over {nz.val_sequences or '?'} held-out "
                    f"sequences) is {nz.ratio:.2f} of the seed-to-seed sd ({nz.seed_sd:.4f})")
        out.append(("warn", f"{size}: {what}, more than {NOISE_RATIO:.2g}: enlarge data.val_sequences{need} "
                            "(the SE shrinks as 1/√sequences) so that the comparison measures the models rather than "
                            "the held-out sample (see Validation noise)."))
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
    tuned = tuned_table(runs)
    if tuned is not None:
        blocks += [
            ("h3", f"Tuned comparison: each schedule at its own best peak LR vs {BASELINE} at its own"),
            ("table", *tuned),
            ("p", "The best LR of a schedule is the one with the lowest mean final loss over seeds; Δ pairs the "
                  "two best cells by seed."),
        ]
    blocks += [("warn", w) for w in lr_edge_warnings(runs)]
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
              "size's schedules and LRs. This SE is the noise of each run's loss level. A paired Δ is less "
              "exposed: both runs are scored on the same held-out sequences, so the held-out set's share of the "
              "noise in Δ is sd(per-sequence differences) / √sequences (median over the size's comparisons; also "
              "the last column of the paired-differences table), to set against the sd of Δ over seeds (pooled "
              "over the size's comparisons). The verdicts rest on paired Δs, so where eval.json holds per-sequence "
              "losses (evaluate_checkpoint(..., sequence_losses=True)) the held-out set is large enough when the "
              f"held-out SE of Δ is at most {NOISE_RATIO:.2g} of the sd of Δ; otherwise when the level SE is at most "
              f"{NOISE_RATIO:.2g} of the seed sd. With one seed neither sd is measured."),
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


def _reference(f: ScheduleFile, files: list[ScheduleFile]) -> ScheduleFile | None:
    """What a variant's schedule is compared with: round k with round k−1, the others with `refined`."""
    label = f.label
    if label.startswith("refined-r") and label[9:].isdigit():
        k = int(label[9:])
        want = "refined" if k == 2 else f"refined-r{k - 1}"
    elif label != "refined":
        want = "refined"
    else:
        return None
    same_lr = [g for g in files if g.size == f.size and g.label == want and set(g.lr_multipliers) & set(f.lr_multipliers)]
    return (same_lr or [g for g in files if g.size == f.size and g.label == want] or [None])[0]


def _sources_text(f: ScheduleFile, out: Path) -> str:
    prov = f.artifact.get("provenance") or {}
    pipe = prov.get("pipeline") or {}
    srcs = pipe.get("sources") or prov.get("sources") or [{"path": prov.get("source"), "sha256": prov.get("source_sha256")}]
    parts = [f"{_shown(s.get('path'), out) if s.get('path') else '?'} ({str(s.get('sha256') or '?')[:12]}…)" for s in srcs]
    if prov.get("aggregate"):
        parts.insert(0, f"per-step {prov['aggregate']} of")
    return " ".join(parts)


def _chosen_text(f: ScheduleFile) -> str:
    ch = ((f.artifact.get("provenance") or {}).get("pipeline") or {}).get("chosen") or {}
    if ch.get("transfer_from"):
        return f"transferred from {ch['transfer_from']}, resampled to {len(f.artifact.get('multipliers') or [])} steps"
    if ch.get("by") and ch.get("by") != "fixed":
        means = ", ".join(f"×{k}: {v:.4f}" for k, v in (ch.get("mean_loss") or {}).items())
        edge = f"; on the grid's {ch['edge']} edge" if ch.get("edge") else ""
        return f"best ×{ch['lr_multiplier']:g} ({means}){edge}"
    return "fixed by the recipe"


def _variants_section(runs: list[RunResult], files: list[ScheduleFile], out: Path, plots: Path) -> list[tuple]:
    """Every refined-type schedule (the plain refinement, one per LR, aggregated, rounds,
    transferred): its sources, how its baseline was chosen, how far it moved, what it cost; then
    transferred vs per-size refined."""
    if not any(f.label != "refined" for f in files) and len({(f.size, f.label) for f in files}) == len(files):
        return []
    header = ["size", "schedule", "file", "used at LR", "refined from (sha256)", "source chosen", "steps", "warm-up", "peak at",
              "above half", "mean |Δ| vs", "source training: FLOPs, wall s"]
    rows = []
    for f in sorted(files, key=lambda f: (size_order(runs).index(f.size) if f.size in size_order(runs) else 99,
                                          sched_sort(g.label for g in files).index(f.label), f.lr_multipliers)):
        diag = f.artifact.get("diagnostics") or {}
        ref = _reference(f, files)
        dist = schedule_distance(f.artifact, ref.artifact) if ref is not None else None
        flops, wall, _ = schedule_compute(f.artifact, runs)
        rows.append([
            f.size, f.label, rel_path(f.path, out), ", ".join(f"×{m:g}" for m in sorted(f.lr_multipliers)) or "?", _sources_text(f, out),
            _chosen_text(f), str(len(f.artifact.get("multipliers") or [])),
            f"{fmt_num(diag.get('warmup_steps'))} steps", f"step {fmt_num(diag.get('peak_step'))} ({_pct(diag.get('peak_fraction'))})",
            _pct(diag.get("above_half_fraction")),
            f"{fmt_num(dist, 3)} ({ref.label})" if ref is not None and dist is not None else "—",
            f"{fmt_flops(flops)}, {fmt_num(wall, 1)}",
        ])
    blocks: list[tuple] = [("h2", "Refinement variants")]
    for f in files:
        if f.label != "refined" and is_degenerate(f.artifact):
            reason = (f.artifact.get("diagnostics") or {}).get("degenerate_reason") or "?"
            blocks.append(("warn", f"{f.size} / {f.label}: the refinement is DEGENERATE ({reason}); its runs used it as it is."))
    blocks += [
        ("table", header, rows),
        ("p", "Each refined-type schedule file the runs trained with, with the run histories it was refined from "
              "(path and sha256; an aggregated schedule lists every seed's). Source chosen: with refine.from: best the "
              "baseline LR with the lowest mean final validation loss over seeds, picked once the baselines ran. "
              "Mean |Δ|: the mean absolute difference of the multipliers over normalized time from the previous round "
              "(rounds) or from the plain refined schedule (aggregated, transferred). Source training: the approximate "
              "compute (6 · parameters · tokens) and wall time of the runs whose norms the schedule needed (for a "
              "round, its whole chain down to the linear baseline)."),
    ]
    xfer = [sz for sz in size_order(runs) if any(f.size == sz and f.label == "refined-xfer" for f in files)]
    if xfer:
        best = best_cells(runs)
        trows = []
        for sz in xfer:
            own = next((f for f in files if f.size == sz and f.label == "refined"), None)
            tr = next(f for f in files if f.size == sz and f.label == "refined-xfer")
            lo, lt = best.get((sz, "refined"), (None, None)), best.get((sz, "refined-xfer"), (None, None))
            d = lt[1].mean - lo[1].mean if lo[1] is not None and lt[1] is not None and lo[1].mean is not None and lt[1].mean is not None else None
            co = schedule_compute(own.artifact, runs) if own is not None else (None, None, [])
            ct = schedule_compute(tr.artifact, runs)
            trows.append([sz, fmt_loss(lo[1]), fmt_loss(lt[1]), fmt_num(d), f"{fmt_flops(co[0])}, {fmt_num(co[1], 1)}",
                          f"{fmt_flops(ct[0])}, {fmt_num(ct[1], 1)} ({', '.join(r.size for r in ct[2]) or '?'})"])
        blocks += [
            ("h3", "Transferred vs per-size refined"),
            ("table", ["size", "refined (own baseline)", "refined-xfer", "Δ xfer − own", "own schedule's source: FLOPs, wall s",
                       "transferred schedule's source: FLOPs, wall s"], trows),
            ("p", "Each at its best peak LR. The transferred schedule needs no baseline run at the target size: its "
                  "cost is the source size's baseline, paid once for every size it is applied to."),
        ]
    for size in size_order(runs):
        fs = [f for f in files if f.size == size]
        if len(fs) > 1:
            fig = plot_schedule_files(fs, size, plots / f"refinements-{_safe(size)}.png")
            if fig:
                blocks.append(("img", fig, f"{size}: the refined-type schedules over normalized time (rounds in order)"))
    return blocks


def _refined_source(runs: list[RunResult], entry: tuple[Path, dict] | None) -> RunResult | None:
    """The run whose history the size's refined schedule was refined from (refine.from: best picks
    it at run time), when it is among the runs."""
    if entry is None:
        return None
    dirs = {d.resolve() for d in schedule_source_dirs(entry[1])}
    return next((r for r in runs if Path(r.run_dir).resolve() in dirs and r.history.exists()), None)


def _size_section(runs: list[RunResult], size: str, arts: Artifacts, plots: Path) -> list[tuple]:
    path = lambda kind: plots / f"{kind}-{_safe(size)}.png"  # noqa: E731
    base = _refined_source(runs, arts.get(size)) or baseline_for(runs, size)
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
        *_variants_section(runs, schedule_files(runs), out, plots),
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
