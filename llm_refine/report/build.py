"""The pipeline's report: final validation loss by size × schedule, fairness settings, plots.

`collect_runs(dirs)` finds finished runs (a ``summary.json``) under any directories — a pipeline
output, a folder of run dirs, or run dirs themselves — and reads what each recorded. `build_report`
writes ``report.md``, a standalone ``report.html`` (PNGs embedded as data URIs) and
``plots/*.png``. `llm-refine compare DIR... [--out DIR]` (`main_compare`) rebuilds it from existing
runs, so nothing needs retraining to re-plot.

Numbers are never filtered: every finished run is counted, a degenerate refinement is shown as
such, and a schedule that lost is reported as losing.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import UserError
from ..fileio import atomic_write_text

BASELINE = "linear"
REFINED = "refined"
SCHEDULE_ORDER = ("linear", "refined", "cosine", "wsd")


# ---------------------------------------------------------------------------------------------
# Reading runs


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _read_jsonl(path: Path) -> list[dict]:
    out: list[dict] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line of an interrupted run
                if isinstance(obj, dict):
                    out.append(obj)
    except FileNotFoundError:
        pass
    return out


def _get(d: Any, dotted: str, default=None):
    cur = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur


def _num(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class RunResult:
    """What one finished run recorded, as the report needs it."""

    run_dir: Path
    size: str
    schedule: str  # label (column of the table)
    schedule_name: str
    seed: int | None
    lr_multiplier: float | None
    peak_lr: float | None
    final_val_loss: float | None
    perplexity: float | None
    loss_source: str  # "eval.json" (final checkpoint evaluated) or "summary.json"
    max_steps: int | None
    tokens_seen: int | None
    parameters: int | None
    wall_time_s: float | None
    schedule_config: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    @property
    def lr_key(self) -> float | None:
        return self.lr_multiplier if self.lr_multiplier is not None else self.peak_lr

    def val_curve(self) -> tuple[list[int], list[float]]:
        rows = [r for r in _read_jsonl(self.run_dir / "eval_log.jsonl") if _num(r.get("val_loss")) is not None]
        return [int(r["step"]) for r in rows], [float(r["val_loss"]) for r in rows]

    def lr_curve(self) -> tuple[list[int], list[float]]:
        rows = [r for r in _read_jsonl(self.run_dir / "train_log.jsonl") if _num(r.get("lr")) is not None and "step" in r]
        return [int(r["step"]) for r in rows], [float(r["lr"]) for r in rows]

    @property
    def history(self) -> Path:
        return self.run_dir / "gradnorms.jsonl"

    @property
    def refined_file(self) -> Path | None:
        f = self.schedule_config.get("file")
        if f:
            p = Path(f)
            return p if p.is_absolute() else (self.run_dir / p if (self.run_dir / p).exists() else p)
        p = self.run_dir.parent / "refined_schedule.json"
        return p if self.schedule_name == REFINED and p.exists() else None


def load_run(run_dir: Path) -> RunResult | None:
    """A RunResult for a finished run dir, or None when it has no summary.json."""
    run_dir = Path(run_dir)
    summary = _read_json(run_dir / "summary.json")
    if not isinstance(summary, dict):
        return None
    marker = _read_json(run_dir / "pipeline_stage.json") or {}
    config = _read_json(run_dir / "config.json") or {}
    ev = _read_json(run_dir / "eval.json") or {}
    sched_cfg = _get(config, "schedule") if isinstance(_get(config, "schedule"), dict) else {}
    schedule_name = marker.get("schedule_name") or sched_cfg.get("name") or summary.get("schedule") or "run"
    if isinstance(summary.get("schedule"), dict):
        schedule_name = marker.get("schedule_name") or summary["schedule"].get("name", schedule_name)
    label = marker.get("schedule") or (schedule_name if isinstance(schedule_name, str) else "run")
    size = marker.get("size") or summary.get("size") or _get(config, "model.size") or run_dir.parent.name
    seed = marker.get("seed", _get(config, "train.seed", summary.get("seed")))
    if _num(ev.get("val_loss")) is not None:
        loss, ppl, src = float(ev["val_loss"]), _num(ev.get("perplexity")), "eval.json"
    else:
        loss, ppl, src = _num(summary.get("final_val_loss")), _num(summary.get("perplexity")), "summary.json"
    return RunResult(
        run_dir=run_dir,
        size=str(size),
        schedule=str(label),
        schedule_name=str(schedule_name),
        seed=int(seed) if isinstance(seed, int) else None,
        lr_multiplier=_num(marker.get("lr_multiplier")),
        peak_lr=_num(_get(config, "train.learning_rate", summary.get("learning_rate", summary.get("peak_lr")))),
        final_val_loss=loss,
        perplexity=ppl,
        loss_source=src,
        max_steps=summary.get("max_steps") if isinstance(summary.get("max_steps"), int) else _get(config, "train.max_steps"),
        tokens_seen=summary.get("tokens_seen") if isinstance(summary.get("tokens_seen"), int) else None,
        parameters=summary.get("parameters") if isinstance(summary.get("parameters"), int) else None,
        wall_time_s=_num(summary.get("wall_time_s")),
        schedule_config=dict(sched_cfg or {}),
        config=config if isinstance(config, dict) else {},
        summary=summary,
    )


def collect_runs(dirs: Iterable[str | os.PathLike], *, tag_sources: bool = False) -> list[RunResult]:
    """Every finished run at or below ``dirs`` (checkpoint folders are not searched).

    ``tag_sources``: prefix each run's size with the name of the DIR it was found under
    (``a/cpu-2m``), so runs of separate sweeps are compared side by side instead of being pooled as
    if they were extra seeds.
    """
    runs: list[RunResult] = []
    seen: set[Path] = set()
    for d in dirs:
        d = Path(d)
        if not d.exists():
            raise UserError(f"{d}: no such directory; pass a pipeline output or run directories")
        candidates = [d] if (d / "summary.json").exists() else sorted(p.parent for p in d.rglob("summary.json"))
        for rd in candidates:
            rd = rd.resolve()
            if rd in seen or any(part.startswith("checkpoint-") for part in rd.parts):
                continue
            r = load_run(rd)
            if r is not None:
                seen.add(rd)
                if tag_sources:
                    r.size = f"{d.resolve().name}/{r.size}"
                runs.append(r)
    return runs


# ---------------------------------------------------------------------------------------------
# Aggregation


@dataclass
class Cell:
    """Final validation losses of one size × schedule at one LR, over seeds."""

    losses: list[float]
    runs: list[RunResult]

    @property
    def n(self) -> int:
        return len(self.losses)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.losses) if self.losses else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.losses) if len(self.losses) > 1 else None


def _sched_sort(labels: Iterable[str]) -> list[str]:
    def key(s):
        return (SCHEDULE_ORDER.index(s) if s in SCHEDULE_ORDER else len(SCHEDULE_ORDER), s)

    return sorted(set(labels), key=key)


def size_order(runs: list[RunResult]) -> list[str]:
    params: dict[str, int] = {}
    for r in runs:
        if r.parameters:
            params[r.size] = r.parameters
    return sorted({r.size for r in runs}, key=lambda s: (params.get(s, 0), s))


def cells(runs: list[RunResult]) -> dict[tuple[str, str, float | None], Cell]:
    out: dict[tuple[str, str, float | None], Cell] = {}
    for r in runs:
        c = out.setdefault((r.size, r.schedule, r.lr_key), Cell([], []))
        c.runs.append(r)
        if r.final_val_loss is not None:
            c.losses.append(r.final_val_loss)
    return out


def best_cells(runs: list[RunResult]) -> dict[tuple[str, str], tuple[float | None, Cell]]:
    """(size, schedule) -> (lr, cell) at the LR with the lowest mean final loss (the sweep's best)."""
    best: dict[tuple[str, str], tuple[float | None, Cell]] = {}
    for (size, sched, lr), c in cells(runs).items():
        cur = best.get((size, sched))
        if cur is None or (c.mean is not None and (cur[1].mean is None or c.mean < cur[1].mean)):
            best[(size, sched)] = (lr, c)
    return best


def fmt_loss(c: Cell | None, ref: Cell | None = None) -> str:
    if c is None:
        return "—"
    if c.mean is None:
        return "no result"
    s = f"{c.mean:.4f}"
    if c.std is not None:
        s += f" ± {c.std:.4f}"
    if c.n != len(c.runs) or c.n > 1:
        s += f" (n={c.n})"
    if ref is not None and ref is not c and ref.mean:
        s += f" [{100.0 * (c.mean - ref.mean) / ref.mean:+.2f}%]"
    return s


def loss_table(runs: list[RunResult]) -> tuple[list[str], list[list[str]]]:
    best = best_cells(runs)
    scheds = _sched_sort(r.schedule for r in runs)
    header = ["size", "params"] + scheds
    rows = []
    for size in size_order(runs):
        params = next((r.parameters for r in runs if r.size == size and r.parameters), None)
        ref = best.get((size, BASELINE), (None, None))[1]
        row = [size, _fmt_params(params)]
        for s in scheds:
            row.append(fmt_loss(best.get((size, s), (None, None))[1], ref))
        rows.append(row)
    return header, rows


def _fmt_params(n: int | None) -> str:
    if not n:
        return "?"
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.1f}K"


def _fmt_num(x, digits=4) -> str:
    if x is None:
        return "?"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


_IGNORED_FOR_FAIRNESS = ("schedule", "output_dir", "train.learning_rate")


def _strip(config: dict) -> dict:
    d = json.loads(json.dumps(config, default=str))
    for key in _IGNORED_FOR_FAIRNESS:
        parts = key.split(".")
        cur = d
        for p in parts[:-1]:
            cur = cur.get(p, {}) if isinstance(cur, dict) else {}
        if isinstance(cur, dict):
            cur.pop(parts[-1], None)
    return d


def fairness_rows(runs: list[RunResult]) -> tuple[list[str], list[list[str]]]:
    """Per size × schedule at its best LR: peak LR, seeds, steps, tokens, warm-up, and whether
    everything but the schedule and LR is identical to the linear run with the same seed."""
    best = best_cells(runs)
    header = ["size", "schedule", "peak LR (best)", "LR multiplier", "seeds", "steps", "tokens", "warm-up", "same data/model/optimizer as linear"]
    rows = []
    by_seed_linear = {(r.size, r.seed): r for r in runs if r.schedule == BASELINE}
    for size in size_order(runs):
        for sched in _sched_sort(r.schedule for r in runs if r.size == size):
            lr, c = best[(size, sched)]
            rs = c.runs
            seeds = sorted({r.seed for r in rs if r.seed is not None})
            same = []
            for r in rs:
                lin = by_seed_linear.get((r.size, r.seed))
                if lin is None or not r.config or not lin.config:
                    same.append(None)
                else:
                    same.append(_strip(r.config) == _strip(lin.config))
            same_s = "yes" if same and all(x is True for x in same) else ("unknown" if any(x is None for x in same) else "NO")
            wu = rs[0].schedule_config.get("warmup_steps") or rs[0].schedule_config.get("warmup_ratio")
            if rs[0].schedule_name == REFINED:
                # The refined multipliers carry their own warm-up (from the norms); say so.
                f = rs[0].refined_file
                art = _read_json(f) if f is not None else None
                own = _get(art, "diagnostics.warmup_steps") if isinstance(art, dict) else None
                extra = f"{_fmt_num(wu)} added" if wu else "none added"
                wu = f"{extra}; schedule's own: {own} steps" if own is not None else extra
            rows.append([
                size, sched,
                ", ".join(sorted({_fmt_num(r.peak_lr) for r in rs})),
                _fmt_num(rs[0].lr_multiplier) if rs[0].lr_multiplier is not None else "—",
                ", ".join(map(str, seeds)) or "?",
                ", ".join(sorted({_fmt_num(r.max_steps) for r in rs})),
                ", ".join(sorted({_fmt_num(r.tokens_seen) for r in rs})),
                wu if isinstance(wu, str) else (_fmt_num(wu) if wu else "0"),
                same_s,
            ])
    return header, rows


def sweep_table(runs: list[RunResult]) -> tuple[list[str], list[list[str]]] | None:
    allc = cells(runs)
    lrs = sorted({lr for (_, _, lr) in allc if lr is not None})
    if len(lrs) < 2:
        return None
    header = ["size", "schedule"] + [f"lr×{lr:g}" if any(r.lr_multiplier is not None for r in runs) else f"lr {lr:g}" for lr in lrs]
    rows = []
    for size in size_order(runs):
        for sched in _sched_sort(r.schedule for r in runs if r.size == size):
            rows.append([size, sched] + [fmt_loss(allc.get((size, sched, lr))) for lr in lrs])
    return header, rows


def refined_schedules(runs: list[RunResult]) -> dict[str, tuple[Path, dict]]:
    """size -> (path, artifact) of the refined schedule its refined runs used."""
    out: dict[str, tuple[Path, dict]] = {}
    for r in runs:
        if r.schedule_name != REFINED or r.size in out:
            continue
        f = r.refined_file
        if f is not None and f.exists():
            art = _read_json(f)
            if isinstance(art, dict) and "multipliers" in art:
                out[r.size] = (f, art)
    return out


def _flat_scalars(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flat_scalars(v, key + ".")
        elif isinstance(v, (str, int, float, bool)) or v is None:
            out.append((key, v))
        elif isinstance(v, list) and len(v) <= 6 and all(isinstance(x, (str, int, float)) for x in v):
            out.append((key, ", ".join(map(str, v))))
    return out


def is_degenerate(art: dict) -> bool:
    diag = art.get("diagnostics") or {}
    return bool(diag.get("degenerate"))


# ---------------------------------------------------------------------------------------------
# Plots


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_figure(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _tau_of(entry) -> float:
    """The τ a size's refinement used (from its schedule file's provenance), else the default 0.1."""
    art = entry[1] if entry else None
    tau = _num(((art or {}).get("provenance") or {}).get("tau"))
    return float(tau) if tau is not None else 0.1


def _baseline_for(runs: list[RunResult], size: str) -> RunResult | None:
    cand = [r for r in runs if r.size == size and r.schedule == BASELINE and r.history.exists()]
    if not cand:
        return None
    # The run the refinement read (lr multiplier 1, lowest seed) when there is one.
    cand.sort(key=lambda r: (abs((r.lr_multiplier or 1.0) - 1.0), r.seed if r.seed is not None else 0))
    return cand[0]


def plot_gradnorms(run: RunResult, path: Path, tau: float = 0.1) -> Path | None:
    """Raw norms of the baseline and the median-filtered norms the refinement used (same τ)."""
    import warnings

    from ..history import read_jsonl
    from ..refine import median_width, prepare_norms, smooth_norms

    try:
        _, records = read_jsonl(run.history)
    except Exception:
        return None
    records = [r for r in records if not r.get("skipped")]
    if not records:
        return None
    plt = _plt()
    keys = [k for k in ("l1", "l2") if any(k in r for r in records)]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.6), squeeze=False)
    for ax, k in zip(axes[0], keys):
        rows = [(int(r["step"]), r[k]) for r in records if _num(r.get(k)) is not None]
        steps = [s for s, _ in rows]
        vals = [v for _, v in rows]
        ax.plot(steps, vals, lw=0.6, alpha=0.45, color="C0", label="raw")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                full_steps, full_vals, _ = prepare_norms(steps, vals, source=str(run.history))
            w = median_width(full_vals.size, tau)
            ax.plot(full_steps, smooth_norms(full_vals, tau), lw=1.8, color="C3", label=f"median filter (width {w}, tau {tau:g})")
        except UserError:
            pass  # too few or non-positive values: the raw curve alone
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"gradient {k} norm")
        ax.set_title(f"{run.size}: {k} gradient norm (linear baseline)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save_figure(plt, fig, path)


def _schedule_curve(r: RunResult):
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
                    raise FileNotFoundError
                cfg["file"] = str(f)
            sc = ScheduleConfig.from_dict(cfg)
            fn = make_schedule(sc, T)
            return np.arange(T), np.array([fn(s, T) for s in range(T)])
        except Exception:
            pass
    steps, lrs = r.lr_curve()
    if steps and r.peak_lr:
        return np.asarray(steps), np.asarray(lrs) / r.peak_lr
    return None


def plot_schedules(runs: list[RunResult], size: str, path: Path, artifact: dict | None) -> Path | None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    drawn = 0
    best = best_cells(runs)
    for i, sched in enumerate(_sched_sort(r.schedule for r in runs if r.size == size)):
        _, c = best[(size, sched)]
        curve = _schedule_curve(c.runs[0])
        if curve is None:
            continue
        ax.plot(curve[0], curve[1], lw=2.0 if sched == REFINED else 1.3, color=f"C{i}", label=f"{sched} (as trained)")
        drawn += 1
    if artifact is not None:
        m = artifact.get("multipliers") or []
        ax.plot(range(len(m)), m, lw=0.8, ls="--", color="k", alpha=0.6, label="refined multipliers (raw artifact)")
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("LR / peak LR")
    ax.set_title(f"{size}: learning-rate schedules")
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_figure(plt, fig, path)


def plot_val_curves(runs: list[RunResult], size: str, path: Path) -> Path | None:
    """Two panels: the whole validation-loss curves, and the second half of training zoomed in,
    where the schedules differ (the curves of seeds beyond the first are drawn lighter)."""
    plt = _plt()
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(11, 3.8))
    best = best_cells(runs)
    drawn = 0
    late: list[float] = []
    last_step = 0
    sweep = len({x.lr_key for x in runs}) > 1
    for i, sched in enumerate(_sched_sort(r.schedule for r in runs if r.size == size)):
        lr, c = best[(size, sched)]
        for j, r in enumerate(sorted(c.runs, key=lambda r: r.seed or 0)):
            steps, vals = r.val_curve()
            if not steps:
                continue
            lab = sched + (f" (lr×{lr:g})" if r.lr_multiplier is not None and sweep else "")
            for ax in (full, zoom):
                ax.plot(steps, vals, marker="o", ms=2.5, lw=1.4, color=f"C{i}", alpha=1.0 if j == 0 else 0.45,
                        label=lab if j == 0 else None)
            half = max(steps) / 2
            late += [v for s, v in zip(steps, vals) if s >= half]
            last_step = max(last_step, max(steps))
            drawn += 1
    if not drawn:
        plt.close(fig)
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
    return _save_figure(plt, fig, path)


def plot_loss_vs_size(runs: list[RunResult], path: Path) -> Path | None:
    plt = _plt()
    best = best_cells(runs)
    sizes = size_order(runs)
    params = {r.size: r.parameters for r in runs if r.parameters}
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    drawn = 0
    use_params = all(s in params for s in sizes)
    for i, sched in enumerate(_sched_sort(r.schedule for r in runs)):
        xs, ys, es = [], [], []
        for k, size in enumerate(sizes):
            c = best.get((size, sched), (None, None))[1]
            if c is None or c.mean is None:
                continue
            xs.append(params[size] if use_params else k)
            ys.append(c.mean)
            es.append(c.std or 0.0)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, lw=1.4, color=f"C{i}", label=sched)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    if use_params:
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks([params[s] for s in sizes], [f"{s}\n{_fmt_params(params[s])}" for s in sizes])
        ax.set_xlabel("model size (parameters, log scale)")
    else:
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set_xlabel("model size")
    ax.set_ylabel("final validation loss")
    ax.set_title("final validation loss vs model size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_figure(plt, fig, path)


# ---------------------------------------------------------------------------------------------
# Document: blocks rendered to Markdown and HTML


def _md_table(header, rows) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(header, rows) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f2f2f2}img{max-width:100%;border:1px solid #eee}pre{background:#f7f7f7;padding:8px;overflow:auto}
.warn{color:#a00;font-weight:bold}"""


def render(blocks: list[tuple], out: Path) -> tuple[str, str]:
    md: list[str] = []
    hb: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            level = int(kind[1])
            md.append("#" * level + " " + b[1])
            hb.append(f"<{kind}>{html.escape(b[1])}</{kind}>")
        elif kind == "p":
            md.append(b[1])
            hb.append(f"<p>{html.escape(b[1])}</p>")
        elif kind == "warn":
            md.append(f"**{b[1]}**")
            hb.append(f'<p class="warn">{html.escape(b[1])}</p>')
        elif kind == "list":
            md.append("\n".join(f"- {x}" for x in b[1]))
            hb.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in b[1]) + "</ul>")
        elif kind == "table":
            md.append(_md_table(b[1], b[2]))
            hb.append(_html_table(b[1], b[2]))
        elif kind == "img":
            path: Path = b[1]
            rel = os.path.relpath(path, out)
            md.append(f"![{b[2]}]({rel})")
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            hb.append(f'<figure><img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}">'
                      f"<figcaption>{html.escape(b[2])} ({html.escape(rel)})</figcaption></figure>")
        elif kind == "pre":
            md.append("```\n" + b[1] + "\n```")
            hb.append(f"<pre>{html.escape(b[1])}</pre>")
    title = next((b[1] for b in blocks if b[0] == "h1"), "llm-refine report")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(hb) + "\n</body></html>\n")
    return "\n\n".join(md) + "\n", page


def build_report(runs: list[RunResult], out: str | os.PathLike, *, title: str = "llm-refine report", recipe=None) -> dict:
    """Write report.md, report.html and plots/*.png under ``out``; returns their paths."""
    out = Path(out)
    if not runs:
        raise UserError(f"{out}: no finished runs (no summary.json) to report on; run the pipeline first")
    plots = out / "plots"
    blocks: list[tuple] = [("h1", title)]
    if recipe is not None and getattr(recipe, "description", ""):
        blocks.append(("p", recipe.description))
    sizes = size_order(runs)
    scheds = _sched_sort(r.schedule for r in runs)
    seeds = sorted({r.seed for r in runs if r.seed is not None})
    blocks.append(("p", f"{len(runs)} finished runs: sizes {', '.join(sizes)}; schedules {', '.join(scheds)}; "
                        f"seeds {', '.join(map(str, seeds)) or '?'}."))

    blocks.append(("h2", "Final validation loss"))
    h, rows = loss_table(runs)
    blocks.append(("table", h, rows))
    srcs = sorted({r.loss_source for r in runs})
    blocks.append(("p", "Mean ± standard deviation over seeds (n = number of seeds) of the final validation loss "
                        "(lower is better); [±x%] is the relative change vs linear at the same size. Each schedule is "
                        f"shown at its best peak LR. Loss source: {', '.join(srcs)} "
                        "(eval.json = the final checkpoint evaluated on the held-out validation set)."))
    missing = [r for r in runs if r.final_val_loss is None]
    if missing:
        blocks.append(("warn", f"{len(missing)} run(s) finished without a final loss: " + ", ".join(str(r.run_dir) for r in missing)))

    sw = sweep_table(runs)
    if sw is not None:
        blocks.append(("h2", "Peak-LR sweep"))
        blocks.append(("table", *sw))

    blocks.append(("h2", "Fairness settings"))
    fh, frows = fairness_rows(runs)
    blocks.append(("table", fh, frows))
    data_cfg = next((r.config.get("data") for r in runs if isinstance(r.config.get("data"), dict)), None)
    notes = ["Same seed ⇒ same initialization and data order for every schedule: runs differ only in the schedule "
             "(and the peak LR where a sweep picks it); the last column checks this from each run's config.json."]
    if data_cfg:
        notes.append("data: " + ", ".join(f"{k}={v}" for k, v in _flat_scalars(data_cfg)))
    blocks.append(("list", notes))

    arts = refined_schedules(runs)
    if arts:
        blocks.append(("h2", "Refinement"))
        for size in sizes:
            if size not in arts:
                continue
            f, art = arts[size]
            prov = art.get("provenance") or {}
            if is_degenerate(art):
                blocks.append(("warn", f"{size}: the refinement is DEGENERATE — see the diagnostics below; "
                                       "the refined runs used it as it is."))
            items = [f"schedule file: {f}", f"refined from: {prov.get('source', '?')} (sha256 {str(prov.get('source_sha256', '?'))[:12]}…)",
                     f"norm {prov.get('norm', '?')}, tau {prov.get('tau', '?')}, {len(art.get('multipliers', []))} steps"]
            items += [f"{k}: {_fmt_num(v)}" for k, v in _flat_scalars(art.get("diagnostics") or {}) if v not in ("", None)][:20]
            items += [f"fit {k}: {_fmt_num(v)}" for k, v in _flat_scalars(art.get("fit") or {})][:8]
            blocks.append(("h3", size))
            blocks.append(("list", items))

    blocks.append(("h2", "Plots"))
    made: list[Path] = []
    p = plot_loss_vs_size(runs, plots / "final_loss_vs_size.png")
    if p:
        blocks.append(("img", p, "final validation loss vs model size"))
        made.append(p)
    for size in sizes:
        for fn, name, cap in (
            (lambda s, path: plot_schedules(runs, s, path, arts.get(s, (None, None))[1]), "schedules", "LR schedules: refined beside linear and cosine"),
            (lambda s, path: plot_val_curves(runs, s, path), "val_loss", "validation loss curves"),
            (lambda s, path: plot_gradnorms(_baseline_for(runs, s), path, _tau_of(arts.get(s))) if _baseline_for(runs, s) else None,
             "gradnorms", "raw and smoothed gradient norms of the linear baseline"),
        ):
            p = fn(size, plots / f"{name}-{_safe(size)}.png")
            if p:
                blocks.append(("img", p, f"{size}: {cap}"))
                made.append(p)

    blocks.append(("h2", "Runs"))
    blocks.append(("table", ["run dir", "size", "schedule", "seed", "peak LR", "final val loss", "perplexity", "steps", "wall time (s)"],
                   [[os.path.relpath(r.run_dir, out) if _is_under(r.run_dir, out) else str(r.run_dir), r.size, r.schedule,
                     _fmt_num(r.seed), _fmt_num(r.peak_lr), _fmt_num(r.final_val_loss, 5), _fmt_num(r.perplexity, 5),
                     _fmt_num(r.max_steps), _fmt_num(r.wall_time_s, 3)]
                    for r in sorted(runs, key=lambda r: (sizes.index(r.size), scheds.index(r.schedule), r.lr_key or 0, r.seed or 0))]))

    md, page = render(blocks, out)
    md_path = atomic_write_text(out / "report.md", md)
    html_path = atomic_write_text(out / "report.html", page)
    return {"markdown": md_path, "html": html_path, "plots": made}


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in s)


def _is_under(p: Path, root: Path) -> bool:
    try:
        Path(p).resolve().relative_to(Path(root).resolve())
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# CLI: llm-refine compare


def add_compare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="pipeline outputs or run directories (searched for summary.json)")
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
    print(f"{len(runs)} runs -> {paths['markdown']}, {paths['html']}, {len(paths['plots'])} plots in {out / 'plots'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python eval/compare.py ...`` = ``llm-refine compare ...`` (same errors, same exit codes)."""
    import sys

    from ..cli import main as cli_main

    return cli_main(["compare", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
