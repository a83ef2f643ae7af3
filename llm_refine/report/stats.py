"""Aggregation: runs grouped by size × schedule × LR, the best LR per schedule, and the tables.

Numbers are never filtered: every finished run is counted, and a schedule that lost is reported
as losing.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..labels import BASELINE, REFINED, SCHEDULE_ORDER
from .collect import RunResult, get, num, read_artifact

Table = tuple[list[str], list[list[str]]]


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


# ---------------------------------------------------------------------------------------------
# Ordering and grouping


def sched_sort(labels: Iterable[str]) -> list[str]:
    """Schedule labels in SCHEDULE_ORDER, then any others alphabetically."""

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


def baseline_for(runs: list[RunResult], size: str) -> RunResult | None:
    """The linear run of ``size`` with a gradient-norm history the refinement would have read."""
    cand = [r for r in runs if r.size == size and r.schedule == BASELINE and r.history.exists()]
    if not cand:
        return None
    # The run the refinement read (lr multiplier 1, lowest seed) when there is one.
    cand.sort(key=lambda r: (abs((r.lr_multiplier or 1.0) - 1.0), r.seed if r.seed is not None else 0))
    return cand[0]


# ---------------------------------------------------------------------------------------------
# Formatting


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


def fmt_params(n: int | None) -> str:
    if not n:
        return "?"
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.1f}K"


def fmt_num(x, digits=4) -> str:
    if x is None:
        return "?"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def flat_scalars(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """``("a.b", value)`` for every scalar (or short list) of a nested dict."""
    out = []
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += flat_scalars(v, key + ".")
        elif isinstance(v, (str, int, float, bool)) or v is None:
            out.append((key, v))
        elif isinstance(v, list) and len(v) <= 6 and all(isinstance(x, (str, int, float)) for x in v):
            out.append((key, ", ".join(map(str, v))))
    return out


# ---------------------------------------------------------------------------------------------
# Tables


def loss_table(runs: list[RunResult]) -> Table:
    best = best_cells(runs)
    scheds = sched_sort(r.schedule for r in runs)
    header = ["size", "params"] + scheds
    rows = []
    for size in size_order(runs):
        params = next((r.parameters for r in runs if r.size == size and r.parameters), None)
        ref = best.get((size, BASELINE), (None, None))[1]
        row = [size, fmt_params(params)]
        for s in scheds:
            row.append(fmt_loss(best.get((size, s), (None, None))[1], ref))
        rows.append(row)
    return header, rows


def sweep_table(runs: list[RunResult]) -> Table | None:
    allc = cells(runs)
    lrs = sorted({lr for (_, _, lr) in allc if lr is not None})
    if len(lrs) < 2:
        return None
    header = ["size", "schedule"] + [f"lr×{lr:g}" if any(r.lr_multiplier is not None for r in runs) else f"lr {lr:g}" for lr in lrs]
    rows = []
    for size in size_order(runs):
        for sched in sched_sort(r.schedule for r in runs if r.size == size):
            rows.append([size, sched] + [fmt_loss(allc.get((size, sched, lr))) for lr in lrs])
    return header, rows


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


def _same_as_linear(rs: list[RunResult], linear: dict[tuple[str, int | None], RunResult]) -> str:
    """"yes" when every run's config equals its same-seed linear run's but for schedule and LR."""
    same = []
    for r in rs:
        lin = linear.get((r.size, r.seed))
        if lin is None or not r.config or not lin.config:
            same.append(None)
        else:
            same.append(_strip(r.config) == _strip(lin.config))
    if same and all(x is True for x in same):
        return "yes"
    return "unknown" if any(x is None for x in same) else "NO"


def _warmup(r: RunResult) -> str:
    wu = r.schedule_config.get("warmup_steps") or r.schedule_config.get("warmup_ratio")
    if r.schedule_name == REFINED:
        # The refined multipliers carry their own warm-up (from the norms); say so.
        own = get(read_artifact(r.refined_file), "diagnostics.warmup_steps")
        extra = f"{fmt_num(wu)} added" if wu else "none added"
        wu = f"{extra}; schedule's own: {own} steps" if own is not None else extra
    return wu if isinstance(wu, str) else (fmt_num(wu) if wu else "0")


def fairness_rows(runs: list[RunResult]) -> Table:
    """Per size × schedule at its best LR: peak LR, seeds, steps, tokens, warm-up, and whether
    everything but the schedule and LR is identical to the linear run with the same seed."""
    best = best_cells(runs)
    header = ["size", "schedule", "peak LR (best)", "LR multiplier", "seeds", "steps", "tokens", "warm-up", "same data/model/optimizer as linear"]
    rows = []
    linear = {(r.size, r.seed): r for r in runs if r.schedule == BASELINE}
    for size in size_order(runs):
        for sched in sched_sort(r.schedule for r in runs if r.size == size):
            rs = best[(size, sched)][1].runs
            seeds = sorted({r.seed for r in rs if r.seed is not None})
            rows.append([
                size, sched,
                ", ".join(sorted({fmt_num(r.peak_lr) for r in rs})),
                fmt_num(rs[0].lr_multiplier) if rs[0].lr_multiplier is not None else "—",
                ", ".join(map(str, seeds)) or "?",
                ", ".join(sorted({fmt_num(r.max_steps) for r in rs})),
                ", ".join(sorted({fmt_num(r.tokens_seen) for r in rs})),
                _warmup(rs[0]),
                _same_as_linear(rs, linear),
            ])
    return header, rows


def runs_table(runs: list[RunResult], out: Path) -> Table:
    """One row per run, ordered by size, schedule, LR and seed; run dirs relative to ``out``."""
    sizes, scheds = size_order(runs), sched_sort(r.schedule for r in runs)
    header = ["run dir", "size", "schedule", "seed", "peak LR", "final val loss", "perplexity", "steps", "wall time (s)"]
    ordered = sorted(runs, key=lambda r: (sizes.index(r.size), scheds.index(r.schedule), r.lr_key or 0, r.seed or 0))
    return header, [
        [_shown_path(r.run_dir, out), r.size, r.schedule, fmt_num(r.seed), fmt_num(r.peak_lr),
         fmt_num(r.final_val_loss, 5), fmt_num(r.perplexity, 5), fmt_num(r.max_steps), fmt_num(r.wall_time_s, 3)]
        for r in ordered
    ]


def _shown_path(p: Path, root: Path) -> str:
    try:
        Path(p).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return str(p)
    return os.path.relpath(p, root)


# ---------------------------------------------------------------------------------------------
# Refinement artifacts


def is_degenerate(art: dict) -> bool:
    diag = art.get("diagnostics") or {}
    return bool(diag.get("degenerate"))


def tau_of(entry: tuple[Path, dict] | None) -> float:
    """The τ a size's refinement used (from its schedule file's provenance), else the default 0.1."""
    art = entry[1] if entry else None
    tau = num(((art or {}).get("provenance") or {}).get("tau"))
    return float(tau) if tau is not None else 0.1
