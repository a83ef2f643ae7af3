"""The report's figures: LR schedules, validation-loss curves, final loss vs size, gradient norms.

Each ``plot_*`` returns the path it wrote, or None when there is nothing to draw. Figures come from
`llm_refine.figures` (object API, atomic save, format from the suffix).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import UserError
from ..figures import new_figure, save_figure
from ..labels import REFINED
from .collect import RunResult, num
from .stats import best_cells, cells, fmt_params, sched_sort, size_order

logger = logging.getLogger(__name__)


def schedule_curve(r: RunResult):
    """The multiplier per step the run used: its schedule config, else its logged LR / peak."""
    import numpy as np

    T = r.max_steps
    if T and r.schedule_config.get("name"):
        try:
            from ..schedules import ScheduleConfig, make_schedule

            cfg = dict(r.schedule_config)
            if cfg.get("name") == REFINED:
                f = r.refined_file
                if f is None or not f.exists():
                    raise FileNotFoundError(f"{r.run_dir}: its refined schedule file is gone")
                cfg["file"] = str(f)
            fn = make_schedule(ScheduleConfig.from_dict(cfg), T)
            return np.arange(T), np.array([fn(s, T) for s in range(T)])
        except Exception as e:  # any config the schedules no longer accept: fall back to the log
            logger.debug("%s: schedule not rebuilt from its config (%s); using the logged LR", r.run_dir, e)
    steps, lrs = r.lr_curve()
    if steps and r.peak_lr:
        return np.asarray(steps), np.asarray(lrs) / r.peak_lr
    return None


def plot_schedules(runs: list[RunResult], size: str, path: Path, artifact: dict | None) -> Path | None:
    fig, ax = new_figure(figsize=(6.5, 3.8))
    drawn = 0
    best = best_cells(runs)
    for i, sched in enumerate(sched_sort(r.schedule for r in runs if r.size == size)):
        curve = schedule_curve(best[(size, sched)][1].runs[0])
        if curve is None:
            continue
        ax.plot(curve[0], curve[1], lw=2.0 if sched == REFINED else 1.3, color=f"C{i}", label=f"{sched} (as trained)")
        drawn += 1
    if artifact is not None:
        m = artifact.get("multipliers") or []
        ax.plot(range(len(m)), m, lw=0.8, ls="--", color="k", alpha=0.6, label="refined multipliers (raw artifact)")
        drawn += 1
    if not drawn:
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("LR / peak LR")
    ax.set_title(f"{size}: learning-rate schedules")
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_schedule_files(files, size: str, path: Path) -> Path | None:
    """The raw multipliers of a size's refined-type schedule files (plain, per LR, aggregated,
    rounds, transferred) over normalized time: how the schedule moves between variants/rounds."""
    import numpy as np

    fig, ax = new_figure(figsize=(6.5, 3.8))
    drawn = 0
    order = sched_sort(f.label for f in files)
    for f in sorted(files, key=lambda f: (order.index(f.label), f.lr_multipliers)):
        m = np.asarray(f.artifact.get("multipliers") or [], dtype=float)
        if m.size < 2:
            continue
        lrs = ",".join(f"×{x:g}" for x in sorted(f.lr_multipliers))
        ax.plot(np.linspace(0, 1, m.size), m, lw=1.3, color=f"C{order.index(f.label)}",
                label=f.label + (f" ({lrs})" if sum(g.label == f.label for g in files) > 1 else ""))
        drawn += 1
    if not drawn:
        return None
    ax.set_xlabel("progress (step / steps)")
    ax.set_ylabel("multiplier")
    ax.set_title(f"{size}: refined schedules")
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _draw_val_curves(runs: list[RunResult], size: str, axes) -> tuple[int, list[float], int]:
    """Draw each schedule's runs at its best LR on ``axes``: (curves drawn, late values, last step)."""
    best = best_cells(runs)
    drawn, late, last_step = 0, [], 0
    sweep = len({x.lr_key for x in runs}) > 1
    for i, sched in enumerate(sched_sort(r.schedule for r in runs if r.size == size)):
        lr, c = best[(size, sched)]
        for j, r in enumerate(sorted(c.runs, key=lambda r: r.seed or 0)):
            steps, vals = r.val_curve()
            if not steps:
                continue
            lab = sched + (f" (lr×{lr:g})" if r.lr_multiplier is not None and sweep else "")
            for ax in axes:
                ax.plot(steps, vals, marker="o", ms=2.5, lw=1.4, color=f"C{i}", alpha=1.0 if j == 0 else 0.45,
                        label=lab if j == 0 else None)
            half = max(steps) / 2
            late += [v for s, v in zip(steps, vals) if s >= half]
            last_step = max(last_step, max(steps))
            drawn += 1
    return drawn, late, last_step


def plot_val_curves(runs: list[RunResult], size: str, path: Path) -> Path | None:
    """Two panels: the whole validation-loss curves, and the second half of training zoomed in,
    where the schedules differ (the curves of seeds beyond the first are drawn lighter)."""
    fig, (full, zoom) = new_figure(1, 2, figsize=(11, 3.8))
    drawn, late, last_step = _draw_val_curves(runs, size, (full, zoom))
    if not drawn:
        return None
    if late:
        lo, hi = min(late), max(late)
        pad = 0.05 * (hi - lo) + 1e-6
        zoom.set_xlim(last_step / 2 - 0.02 * last_step, last_step * 1.02)
        zoom.set_ylim(lo - pad, hi + pad)
    full.set_title(f"{size}: validation loss (each schedule at its best LR)")
    zoom.set_title("second half of training")
    for ax in (full, zoom):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
    full.legend(fontsize=8)
    return save_figure(fig, path)


def plot_loss_vs_size(runs: list[RunResult], path: Path) -> Path | None:
    best = best_cells(runs)
    sizes = size_order(runs)
    params = {r.size: r.parameters for r in runs if r.parameters}
    fig, ax = new_figure(figsize=(6.0, 3.8))
    drawn = 0
    use_params = all(s in params for s in sizes)
    for i, sched in enumerate(sched_sort(r.schedule for r in runs)):
        pts = [(params[size] if use_params else k, c.mean, c.std or 0.0)
               for k, size in enumerate(sizes)
               if (c := best.get((size, sched), (None, None))[1]) is not None and c.mean is not None]
        if pts:
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, lw=1.4, color=f"C{i}", label=sched)
            drawn += 1
    if not drawn:
        return None
    if use_params:
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks([params[s] for s in sizes], [f"{s}\n{fmt_params(params[s])}" for s in sizes])
        ax.set_xlabel("model size (parameters, log scale)")
    else:
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set_xlabel("model size")
    ax.set_ylabel("final validation loss")
    ax.set_title("final validation loss vs model size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _draw_norm_panel(ax, run: RunResult, records: list[dict], k: str, tau: float) -> None:
    import warnings

    from ..refine import median_width, prepare_norms, smooth_norms

    rows = [(int(r["step"]), r[k]) for r in records if num(r.get(k)) is not None]
    steps = [s for s, _ in rows]
    vals = [v for _, v in rows]
    ax.plot(steps, vals, lw=0.6, alpha=0.45, color="C0", label="raw")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            full_steps, full_vals, _ = prepare_norms(steps, vals, source=str(run.history))
        w = median_width(full_vals.size, tau)
        ax.plot(full_steps, smooth_norms(full_vals, tau), lw=1.8, color="C3", label=f"median filter (width {w}, tau {tau:g})")
    except UserError as e:
        logger.debug("%s: no smoothed %s curve (%s); the raw curve alone", run.history, k, e)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"gradient {k} norm")
    ax.set_title(f"{run.size}: {k} gradient norm (linear baseline)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def plot_gradnorms(run: RunResult, path: Path, tau: float = 0.1) -> Path | None:
    """Raw norms of the baseline and the median-filtered norms the refinement used (same τ)."""
    from ..history import read_jsonl

    try:
        _, records = read_jsonl(run.history)
    except Exception as e:  # an unreadable history is no plot, not a failed report
        logger.warning("%s: gradient norms not plotted (%s)", run.history, e)
        return None
    records = [r for r in records if not r.get("skipped")]
    if not records:
        return None
    keys = [k for k in ("l1", "l2") if any(k in r for r in records)]
    if not keys:
        return None
    fig, axes = new_figure(1, len(keys), figsize=(5.5 * len(keys), 3.6), squeeze=False)
    for ax, k in zip(axes[0], keys):
        _draw_norm_panel(ax, run, records, k, tau)
    return save_figure(fig, path)


def plot_loss_vs_lr(runs: list[RunResult], size: str, path: Path) -> Path | None:
    """Final validation loss vs peak LR (or LR multiplier) per schedule: each seed as a dot, the mean
    over seeds as a line; None when the size ran at fewer than two LRs."""
    rs = [r for r in runs if r.size == size and r.lr_key is not None and r.final_val_loss is not None]
    lrs = sorted({r.lr_key for r in rs})
    if len(lrs) < 2:
        return None
    mult = any(r.lr_multiplier is not None for r in rs)
    allc = cells(runs)
    fig, ax = new_figure(figsize=(6.0, 3.8))
    for i, sched in enumerate(sched_sort(r.schedule for r in rs)):
        pts = [(lr, c) for lr in lrs if (c := allc.get((size, sched, lr))) is not None and c.mean is not None]
        if not pts:
            continue
        ax.plot([lr for lr, _ in pts], [c.mean for _, c in pts], marker="o", lw=1.4, color=f"C{i}", label=f"{sched} (mean over seeds)")
        for lr, c in pts:
            ax.plot([lr] * c.n, c.losses, ls="none", marker=".", ms=4, color=f"C{i}", alpha=0.5)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(lrs, [f"{x:g}" for x in lrs])
    ax.set_xlabel("peak-LR multiplier" if mult else "peak LR")
    ax.set_ylabel("final validation loss")
    ax.set_title(f"{size}: final validation loss vs peak LR (dots: seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
