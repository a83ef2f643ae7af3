"""Aggregation: runs grouped by size × schedule × LR, the best LR per schedule, and the tables.

Numbers are never filtered: every finished run is counted, and a schedule that lost is reported
as losing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Iterable, Mapping

from ..labels import BASELINE, REFINED, SCHEDULE_ORDER
from .collect import RunResult, get, num, read_artifact

Table = tuple[list[str], list[list[str]]]

logger = logging.getLogger(__name__)


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
    """Schedule labels in SCHEDULE_ORDER (refinement variants ``refined-*`` right after
    ``refined``, rounds in order), then any others alphabetically."""

    def key(s):
        if s.startswith(REFINED + "-"):
            rest = s[len(REFINED) + 1:]
            # the variants in the pipeline's order: refined-agg, refined-r2, refined-r3, ..., refined-xfer
            if rest == "agg":
                sub = (0, 0, "")
            elif rest[:1] == "r" and rest[1:].isdigit():
                sub = (1, int(rest[1:]), "")
            else:
                sub = (2 if rest == "xfer" else 3, 0, rest)
            return (SCHEDULE_ORDER.index(REFINED), 1, sub)
        return (SCHEDULE_ORDER.index(s) if s in SCHEDULE_ORDER else len(SCHEDULE_ORDER), 0, (0, 0, s))

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


def tuned_table(runs: list[RunResult]) -> Table | None:
    """The paper's tuned protocol: per size each schedule at its own best peak LR against linear at
    linear's own best, paired by seed (same seed = same initialization and data order); None without
    an LR sweep."""
    allc = cells(runs)
    if len({lr for (_, _, lr) in allc if lr is not None}) < 2:
        return None
    best = best_cells(runs)
    header = ["size", "schedule", "its best LR", "linear's best LR", "loss", "linear's loss", "Δ (paired by seed)"]
    rows = []
    for size in size_order(runs):
        blr, bc = best.get((size, BASELINE), (None, None))
        for sched in sched_sort(r.schedule for r in runs if r.size == size):
            if sched == BASELINE or (size, sched) not in best:
                continue
            lr, c = best[(size, sched)]
            d = paired_difference(seed_losses(c), seed_losses(bc)) if bc is not None else None
            rows.append([size, sched, fmt_lr(lr, runs), fmt_lr(blr, runs), fmt_loss(c), fmt_loss(bc),
                         fmt_diff(d) if d is not None else NO_PAIRS])
    return header, rows


def lr_edge_warnings(runs: list[RunResult]) -> list[str]:
    """One line per size × schedule whose best peak LR is the smallest or largest of the LRs it ran
    at (a grid of at least two): the optimum may lie outside, and which way to extend the grid."""
    allc = cells(runs)
    out = []
    for (size, sched), (lr, c) in sorted(best_cells(runs).items(), key=lambda kv: (size_order(runs).index(kv[0][0]), sched_sort([kv[0][1]]))):
        lrs = sorted(x for (sz, sc, x) in allc if sz == size and sc == sched and x is not None and allc[(sz, sc, x)].mean is not None)
        if len(lrs) < 2 or lr is None or c.mean is None:
            continue
        mult = any(r.lr_multiplier is not None for r in c.runs)
        unit = (lambda x: f"×{x:g}") if mult else (lambda x: f"{x:g}")  # noqa: E731
        grid = ", ".join(unit(x) for x in lrs)
        if lr == lrs[-1]:
            out.append(f"{size} / {sched}: the best peak LR {unit(lr)} is the largest in the grid [{grid}]; the optimum may be "
                       f"higher: extend lr_multipliers upward (e.g. add {unit(lr * 2)}).")
        elif lr == lrs[0]:
            out.append(f"{size} / {sched}: the best peak LR {unit(lr)} is the smallest in the grid [{grid}]; the optimum may be "
                       f"lower: extend lr_multipliers downward (e.g. add {unit(lr / 2)}).")
    return out


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


def fmt_loss(c: Cell | None, diff: "PairedDiff | None" = None) -> str:
    """``mean ± sd (n=k)`` of a cell; with ``diff``, then its paired difference to the baseline
    (`fmt_diff`: ``; Δ -0.1000 [-0.1635, -0.0365] better``)."""
    if c is None:
        return "—"
    if c.mean is None:
        return "no result"
    s = f"{c.mean:.4f}"
    if c.std is not None:
        s += f" ± {c.std:.4f}"
    if c.n != len(c.runs) or c.n > 1:
        s += f" (n={c.n})"
    if diff is not None:
        s += "; " + fmt_diff(diff)
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
    """Per size: each schedule at its best LR, mean ± sd over seeds, and for every schedule but the
    baseline its paired difference to the baseline with the 95% interval and the verdict."""
    best = best_cells(runs)
    heads = headline(runs)
    scheds = sched_sort(r.schedule for r in runs)
    header = ["size", "params"] + scheds
    rows = []
    for size in size_order(runs):
        params = next((r.parameters for r in runs if r.size == size and r.parameters), None)
        row = [size, fmt_params(params)]
        for s in scheds:
            cmp = heads.get((size, s))
            row.append(fmt_loss(best.get((size, s), (None, None))[1], cmp.diff if cmp and cmp.baseline else None))
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
    header = ["run dir", "size", "schedule", "seed", "peak LR", "final val loss", "validation SE", "perplexity", "steps",
              "wall time (s)"]
    ordered = sorted(runs, key=lambda r: (sizes.index(r.size), scheds.index(r.schedule), r.lr_key or 0, r.seed or 0))
    return header, [
        [rel_path(r.run_dir, out), r.size, r.schedule, fmt_num(r.seed), fmt_num(r.peak_lr),
         f"{r.final_val_loss:.4f}" if r.final_val_loss is not None else "?",
         f"{r.val_se:.5f}" if r.val_se is not None else "—",
         fmt_num(r.perplexity, 5), fmt_num(r.max_steps), fmt_num(r.wall_time_s, 3)]
        for r in ordered
    ]


def rel_path(p: str | os.PathLike, root: str | os.PathLike) -> str:
    """``p`` relative to ``root`` (with ``..`` where it lies outside), '/'-separated: the report never
    shows an absolute path, so its folder can be moved or zipped."""
    try:
        return Path(os.path.relpath(os.path.abspath(p), os.path.abspath(root))).as_posix()
    except ValueError:  # another drive (Windows): the name alone
        return Path(p).name


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


# ---------------------------------------------------------------------------------------------
# Paired differences to the baseline: mean, 95% interval, verdict

BETTER, WORSE, WITHIN_NOISE = "better", "worse", "within noise"
ONE_SEED = "one seed: no interval"
NO_PAIRS = "no paired seeds"
LEVEL = 0.95
NOISE_RATIO = 1.0 / 3.0  # the validation SE should be at most this share of the seed-to-seed sd

VERDICT_RULE = (
    f"Verdict rule: Δ = final validation loss of the schedule − that of {BASELINE} at the same size, seed "
    "(same seed ⇒ same initialization and data order) and peak LR, so lower is better. With n ≥ 2 paired "
    "seeds the 95% interval is mean Δ ± t(0.975, n − 1) · sd(Δ) / √n (Student t); the schedule is *better* "
    "when the whole interval is below 0, *worse* when it is above 0, and otherwise *within noise*. With one "
    f"seed there is no interval and no verdict (\"{ONE_SEED}\")."
)


@dataclass(frozen=True)
class PairedDiff:
    """Candidate − baseline, paired by key (the seed): per-pair differences, their mean, sd, interval
    and the verdict of `VERDICT_RULE`."""

    keys: tuple  # the paired keys, sorted
    diffs: tuple[float, ...]  # candidate − baseline for each key
    mean: float | None
    sd: float | None  # sample sd of the differences (n ≥ 2)
    ci: tuple[float, float] | None  # Student-t interval at `level` (n ≥ 2)
    level: float
    unpaired: tuple  # keys present on one side only (not used)

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def verdict(self) -> str:
        if self.n == 0:
            return NO_PAIRS
        if self.ci is None:
            return ONE_SEED
        lo, hi = self.ci
        return BETTER if hi < 0 else WORSE if lo > 0 else WITHIN_NOISE


def _key_order(k):
    return (k is None, str(type(k)), k if k is not None else 0)


def paired_difference(candidate: Mapping[Hashable, float], baseline: Mapping[Hashable, float], *,
                      level: float = LEVEL) -> PairedDiff:
    """Paired difference ``candidate[k] − baseline[k]`` over the keys (seeds) both have.

    Returns the differences, their mean, and with n ≥ 2 pairs the sample sd and the Student-t
    interval mean ± t((1 + level) / 2, n − 1) · sd / √n (`scipy.stats.t`); the verdict follows
    `VERDICT_RULE`: "better" / "worse" when the whole interval is below / above 0, else "within
    noise"; one pair: "one seed: no interval"; none: "no paired seeds".
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    keys = tuple(sorted(set(candidate) & set(baseline), key=_key_order))
    unpaired = tuple(sorted(set(candidate) ^ set(baseline), key=_key_order))
    diffs = tuple(float(candidate[k]) - float(baseline[k]) for k in keys)
    n = len(diffs)
    mean = statistics.fmean(diffs) if n else None
    sd = ci = None
    if n >= 2:
        from scipy import stats as sps

        sd = statistics.stdev(diffs)
        half = float(sps.t.ppf(0.5 + level / 2.0, n - 1)) * sd / math.sqrt(n)
        ci = (mean - half, mean + half)
    return PairedDiff(keys=keys, diffs=diffs, mean=mean, sd=sd, ci=ci, level=level, unpaired=unpaired)


def seed_runs(c: Cell | None) -> dict:
    """seed -> the cell's run with that seed (runs without a loss are left out; of two runs with the
    same seed the first by run dir counts, and a warning says so)."""
    out: dict = {}
    for r in sorted(c.runs if c else [], key=lambda r: str(r.run_dir)):
        if r.final_val_loss is None:
            continue
        if r.seed in out:
            logger.warning("%s: a second run with seed %s in %s/%s; the first (%s) is compared",
                           r.run_dir, r.seed, r.size, r.schedule, out[r.seed].run_dir)
            continue
        out[r.seed] = r
    return out


def seed_losses(c: Cell | None) -> dict:
    """seed -> final validation loss of a cell's runs (the runs of `seed_runs`)."""
    return {k: r.final_val_loss for k, r in seed_runs(c).items()}


def heldout_se_of_difference(a: list[float] | None, b: list[float] | None) -> float | None:
    """The held-out set's share of the noise in one run-pair difference: both runs scored on the same
    sequences, sd(a_i − b_i) / √sequences; None without two equal-length per-sequence lists."""
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return None
    return statistics.stdev([x - y for x, y in zip(a, b)]) / math.sqrt(len(a))


@dataclass(frozen=True)
class Comparison:
    """One cell (size, schedule, LR) against the baseline cell it is paired with."""

    size: str
    schedule: str
    lr: float | None
    baseline_lr: float | None
    cell: Cell
    baseline: Cell | None
    diff: PairedDiff

    def heldout_se(self) -> float | None:
        """Median over the paired seeds of `heldout_se_of_difference` (None where not recorded)."""
        mine, base = seed_runs(self.cell), seed_runs(self.baseline)
        ses = [se for k in self.diff.keys
               if (se := heldout_se_of_difference(mine[k].val_sequence_losses, base[k].val_sequence_losses)) is not None]
        return statistics.median(ses) if ses else None


def baseline_cell(allc: dict, size: str, lr: float | None) -> tuple[float | None, Cell | None]:
    """The baseline cell to pair with a cell at ``lr``: the baseline at the same LR; when the baseline
    ran at one LR only (no sweep), that one."""
    if (size, BASELINE, lr) in allc:
        return lr, allc[(size, BASELINE, lr)]
    own = [(k[2], c) for k, c in allc.items() if k[0] == size and k[1] == BASELINE]
    return own[0] if len(own) == 1 else (None, None)


def compare_cell(allc: dict, size: str, sched: str, lr: float | None) -> Comparison:
    c = allc[(size, sched, lr)]
    blr, base = baseline_cell(allc, size, lr)
    return Comparison(size, sched, lr, blr, c, base, paired_difference(seed_losses(c), seed_losses(base)))


def comparisons(runs: list[RunResult]) -> list[Comparison]:
    """Every non-baseline cell (size, schedule, LR) against the baseline, paired by seed (and LR)."""
    allc = cells(runs)
    out = []
    for size in size_order(runs):
        for sched in sched_sort(r.schedule for r in runs if r.size == size):
            if sched == BASELINE:
                continue
            for lr in sorted((k[2] for k in allc if k[:2] == (size, sched)), key=lambda x: (x is None, x or 0)):
                out.append(compare_cell(allc, size, sched, lr))
    return out


def headline(runs: list[RunResult]) -> dict[tuple[str, str], Comparison]:
    """(size, schedule) -> the comparison at the schedule's best LR (paired with the baseline at that LR)."""
    allc = cells(runs)
    return {(size, sched): compare_cell(allc, size, sched, lr)
            for (size, sched), (lr, _) in best_cells(runs).items() if sched != BASELINE}


def fmt_diff(d: PairedDiff, digits: int = 4) -> str:
    """``Δ -0.1000 [-0.1635, -0.0365] better`` (n ≥ 2), ``Δ +0.1399 (one seed: no interval)``."""
    if d.mean is None:
        return NO_PAIRS
    s = f"Δ {d.mean:+.{digits}f}"
    if d.ci is None:
        return f"{s} ({ONE_SEED})"
    return f"{s} [{d.ci[0]:+.{digits}f}, {d.ci[1]:+.{digits}f}] {d.verdict}"


def fmt_lr(lr: float | None, runs: list[RunResult]) -> str:
    """``lr×2`` where the runs at this LR key have an LR multiplier, else the peak LR ``lr 0.003``."""
    if lr is None:
        return "—"
    mult = any(r.lr_multiplier is not None for r in runs if r.lr_key == lr)
    return f"lr×{lr:g}" if mult else f"lr {lr:g}"


def comparison_table(runs: list[RunResult]) -> Table:
    """Every (size, schedule, LR) vs the baseline: paired seeds, per-seed Δ, mean Δ, 95% CI, verdict."""
    header = ["size", "schedule", "peak LR", "vs linear at", "paired seeds", "per-seed Δ", "mean Δ", "sd(Δ)",
              "95% interval", "verdict", "held-out SE of Δ"]
    rows = []
    for cmp in comparisons(runs):
        d = cmp.diff
        rows.append([
            cmp.size, cmp.schedule, fmt_lr(cmp.lr, runs),
            fmt_lr(cmp.baseline_lr, runs) if cmp.baseline is not None else "no baseline",
            ", ".join(map(str, d.keys)) if d.keys else "none",
            ", ".join(f"{x:+.4f}" for x in d.diffs) or "—",
            f"{d.mean:+.4f}" if d.mean is not None else "—",
            f"{d.sd:.4f}" if d.sd is not None else "—",
            f"[{d.ci[0]:+.4f}, {d.ci[1]:+.4f}]" if d.ci else "—",
            d.verdict,
            f"{se:.5f}" if (se := cmp.heldout_se()) is not None else "not recorded",
        ])
    return header, rows


def per_seed_table(runs: list[RunResult], size: str) -> Table:
    """Rows: seeds; columns: each schedule's final loss at its best LR, then Δ to the baseline."""
    heads = headline(runs)
    best = best_cells(runs)
    scheds = sched_sort(r.schedule for r in runs if r.size == size)
    losses = {s: seed_losses(best[(size, s)][1]) for s in scheds}
    others = [s for s in scheds if s != BASELINE]
    seeds = sorted({k for v in losses.values() for k in v}, key=_key_order)
    sweep = len({r.lr_key for r in runs if r.size == size}) > 1
    at = (lambda lr: f" ({fmt_lr(lr, runs)})" if sweep else "")  # noqa: E731
    header = (["seed"] + [s + at(best[(size, s)][0]) for s in scheds]
              + [f"Δ {s}" + (f" vs {BASELINE}{at(heads[(size, s)].baseline_lr)}" if sweep else "") for s in others])
    rows = []
    for k in seeds:
        row = [fmt_num(k)] + [f"{losses[s][k]:.4f}" if k in losses[s] else "—" for s in scheds]
        for s in others:
            d = heads[(size, s)].diff
            row.append(f"{d.diffs[d.keys.index(k)]:+.4f}" if k in d.keys else "—")
        rows.append(row)
    return header, rows


def _verdict_phrase(d: PairedDiff) -> str:
    word = {BETTER: f"better than {BASELINE}", WORSE: f"worse than {BASELINE}", WITHIN_NOISE: "within noise"}[d.verdict]
    return f"{word} (Δ {d.mean:+.4f}, 95% CI [{d.ci[0]:+.4f}, {d.ci[1]:+.4f}], {d.n} seeds)"


def verdict_sentence(runs: list[RunResult], size: str) -> str:
    """One sentence for a size: each schedule at its best LR against the baseline. With an LR sweep
    where the two best LRs differ, the tuned comparison leads (each at its own best, the paper's
    protocol: what a user would train), followed by the same-LR comparison."""
    heads = headline(runs)
    scheds = [s for s in sched_sort(r.schedule for r in runs if r.size == size) if s != BASELINE]
    if not any(r.size == size and r.schedule == BASELINE for r in runs):
        return f"{size}: no {BASELINE} run, so nothing is compared."
    if not scheds:
        return f"{size}: only {BASELINE} ran."
    sweep = len({r.lr_key for r in runs if r.size == size}) > 1
    base_lr, base_best = best_cells(runs).get((size, BASELINE), (None, None))
    parts, single = [], []
    for s in scheds:
        cmp = heads[(size, s)]
        d = cmp.diff
        at = f" at {fmt_lr(cmp.lr, runs)}" if sweep and cmp.lr is not None else ""
        tuned = None
        if sweep and base_best is not None and cmp.lr != base_lr and cmp.baseline_lr == cmp.lr and cmp.cell.mean is not None:
            tuned = paired_difference(seed_losses(cmp.cell), seed_losses(base_best))
        if sweep and cmp.baseline is not None and cmp.baseline_lr != cmp.lr:
            at += f" (vs {BASELINE} at {fmt_lr(cmp.baseline_lr, runs)})"
        if cmp.cell.mean is None:
            parts.append(f"{s}{at} has no final loss")
        elif d.n == 0:
            parts.append(f"{s}{at} has no seed in common with {BASELINE}")
        elif d.ci is None:
            single.append((s, f"{s}{at} {d.mean:+.4f}"))
        elif tuned is not None and tuned.ci is not None:
            parts.append(f"{s} at its best {fmt_lr(cmp.lr, runs)} vs {BASELINE} at its best {fmt_lr(base_lr, runs)} is "
                         f"{_verdict_phrase(tuned)}; at the same {fmt_lr(cmp.lr, runs)} it is {_verdict_phrase(d)}")
        else:
            parts.append(f"{s}{at} is {_verdict_phrase(d)}")
    if single:
        parts.append(f"one seed, so no interval and no verdict for {', '.join(s for s, _ in single)} "
                     f"(observed Δ vs {BASELINE}: {', '.join(t for _, t in single)})")
    return f"{size}: " + "; ".join(parts) + "."


# ---------------------------------------------------------------------------------------------
# Noise: the validation estimate's own standard error vs the seed-to-seed spread


@dataclass(frozen=True)
class Noise:
    """The validation estimate's own noise at one size, against the seed-to-seed noise.

    Two yardsticks. Levels: the SE of one run's loss over its held-out sequences vs the sd of the
    final loss over seeds. Paired Δs (what the verdicts rest on): both runs of a pair are scored on
    the same sequences, so the held-out share of a Δ's noise is sd(per-sequence differences) / √S,
    to set against the sd of Δ over seeds. Where per-sequence losses are recorded the held-out set is
    judged by the paired yardstick, since a set far too small for levels can be ample for Δs."""

    size: str
    val_se: float | None  # median over the size's runs of the SE over held-out sequences
    val_se_max: float | None
    val_se_tokens: float | None  # median SE over tokens (treats tokens as independent)
    val_sequences: int | None
    val_tokens: int | None
    seed_sd: float | None  # pooled within-cell sd of the final loss over seeds
    seed_df: int  # its degrees of freedom (Σ (n_cell − 1))
    paired_se: float | None = None  # median over the size's comparisons of the held-out SE of Δ
    paired_sd: float | None = None  # pooled sd of Δ over seeds (comparisons with n ≥ 2)
    paired_df: int = 0

    @property
    def ratio(self) -> float | None:
        """Levels: validation SE / seed sd."""
        return self.val_se / self.seed_sd if self.val_se is not None and self.seed_sd else None

    @property
    def paired_ratio(self) -> float | None:
        """Paired Δs: held-out SE of Δ / sd of Δ over seeds."""
        return self.paired_se / self.paired_sd if self.paired_se is not None and self.paired_sd else None

    @property
    def judged_by(self) -> str | None:
        """"paired" where per-sequence losses give the paired yardstick, else "levels" (None: neither)."""
        return "paired" if self.paired_ratio is not None else "levels" if self.ratio is not None else None

    @property
    def deciding_ratio(self) -> float | None:
        return self.paired_ratio if self.judged_by == "paired" else self.ratio

    @property
    def too_noisy(self) -> bool:
        r = self.deciding_ratio
        return r is not None and r > NOISE_RATIO

    @property
    def sequences_needed(self) -> int | None:
        """Held-out sequences for the deciding SE ≤ NOISE_RATIO × its seed sd (SE shrinks as 1/√sequences)."""
        if not self.too_noisy or not self.val_sequences:
            return None
        return math.ceil(self.val_sequences * (self.deciding_ratio / NOISE_RATIO) ** 2)


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _pooled_sd(groups: Iterable[tuple[int, float]]) -> tuple[float | None, int]:
    """(pooled sd, degrees of freedom) of groups given as (n, sample variance); groups with n < 2 skipped."""
    num, df = 0.0, 0
    for n, var in groups:
        if n >= 2:
            num += (n - 1) * var
            df += n - 1
    return (math.sqrt(num / df) if df else None), df


def noise(runs: list[RunResult], size: str) -> Noise:
    rs = [r for r in runs if r.size == size]
    seed_sd, seed_df = _pooled_sd((c.n, statistics.variance(c.losses)) for c in cells(rs).values() if c.n >= 2)
    ses = [r.val_se for r in rs if r.val_se is not None]
    seqs = sorted({r.val_sequences for r in rs if r.val_sequences})
    toks = sorted({r.val_tokens for r in rs if r.val_tokens})
    cmps = comparisons(rs)  # comparisons are within a size: this size's runs are enough
    pse = [se for c in cmps if (se := c.heldout_se()) is not None]
    paired_sd, paired_df = _pooled_sd((c.diff.n, c.diff.sd ** 2) for c in cmps if c.diff.sd is not None)
    return Noise(
        size=size, val_se=_median(ses), val_se_max=max(ses) if ses else None,
        val_se_tokens=_median([r.val_se_tokens for r in rs if r.val_se_tokens is not None]),
        val_sequences=seqs[0] if len(seqs) == 1 else None, val_tokens=toks[0] if len(toks) == 1 else None,
        seed_sd=seed_sd, seed_df=seed_df, paired_se=_median(pse), paired_sd=paired_sd, paired_df=paired_df,
    )


def noise_table(runs: list[RunResult]) -> Table:
    header = ["size", "held-out set", "validation SE (over sequences)", "validation SE (over tokens)",
              "seed-to-seed sd", "SE / seed sd", "held-out SE of Δ", "sd of Δ over seeds", "SE of Δ / sd of Δ",
              "validation set large enough?"]
    rows = []
    for size in size_order(runs):
        nz = noise(runs, size)
        if nz.val_sequences:
            held = f"{nz.val_sequences} sequences" + (f", {nz.val_tokens} predicted tokens" if nz.val_tokens else "")
        else:
            held = "?"
        se = "not recorded" if nz.val_se is None else (
            f"{nz.val_se:.5f}" + (f" (max {nz.val_se_max:.5f})" if nz.val_se_max and nz.val_se_max > nz.val_se * 1.05 else ""))
        sd = f"{nz.seed_sd:.4f} (df {nz.seed_df})" if nz.seed_sd is not None else "one seed: not measured"
        psd = f"{nz.paired_sd:.4f} (df {nz.paired_df})" if nz.paired_sd is not None else "not measured"
        what = "for the paired Δs" if nz.judged_by == "paired" else "for levels (no per-sequence losses)"
        if nz.judged_by is None:
            ok = "unknown"
        elif nz.too_noisy:
            need = f"enlarge data.val_sequences to ≥ {nz.sequences_needed}" if nz.sequences_needed else "enlarge data.val_sequences"
            ok = f"NO {what}: {need}"
        else:
            ok = f"yes, {what}"
        rows.append([size, held, se, f"{nz.val_se_tokens:.5f}" if nz.val_se_tokens is not None else "not recorded",
                     sd, f"{nz.ratio:.2f}" if nz.ratio is not None else "—",
                     f"{nz.paired_se:.5f}" if nz.paired_se is not None else "not recorded", psd,
                     f"{nz.paired_ratio:.2f}" if nz.paired_ratio is not None else "—", ok])
    return header, rows


# ---------------------------------------------------------------------------------------------
# Refinement variants: where each schedule came from, how far it moved, what it cost


def schedule_source_dirs(art: dict) -> list[Path]:
    """The run dirs whose histories a schedule file was refined from (a transferred schedule:
    the other size's baseline its source schedule was refined from)."""
    prov = art.get("provenance") or {}
    pipe = prov.get("pipeline") or {}
    if prov.get("refined_from"):
        return [Path(prov["refined_from"]).parent]
    paths = [s.get("path") for s in (prov.get("sources") or pipe.get("sources") or []) if isinstance(s, dict)]
    paths = [p for p in paths if isinstance(p, str)] or ([prov["source"]] if isinstance(prov.get("source"), str) else [])
    return [Path(p).parent for p in paths]


def run_compute(r: RunResult) -> tuple[float | None, float | None]:
    """(≈ training FLOPs 6·parameters·tokens, wall seconds) of one run, when recorded."""
    flops = 6.0 * r.parameters * r.tokens_seen if r.parameters and r.tokens_seen else None
    return flops, r.wall_time_s


def schedule_compute(art: dict, runs: list[RunResult]) -> tuple[float | None, float | None, list[RunResult]]:
    """The training compute that produced a schedule's source histories: (FLOPs, wall s, runs). A
    source run that itself trained on a refined schedule (iterated refinement) adds that schedule's
    sources, down to the linear baseline: round k costs its whole chain."""
    by_dir = {Path(r.run_dir).resolve(): r for r in runs}
    src: list[RunResult] = []
    seen: set[Path] = set()
    todo = [d.resolve() for d in schedule_source_dirs(art)]
    while todo:
        d = todo.pop(0)
        r = by_dir.get(d)
        if r is None or d in seen:
            continue
        seen.add(d)
        src.append(r)
        f = r.refined_file if r.schedule_name == REFINED else None
        sub = read_artifact(f) if f is not None and f.exists() else None
        if sub is not None:
            todo += [x.resolve() for x in schedule_source_dirs(sub)]
    comp = [run_compute(r) for r in src]
    flops = sum(f for f, _ in comp) if src and all(f is not None for f, _ in comp) else None
    wall = sum(w for _, w in comp) if src and all(w is not None for _, w in comp) else None
    return flops, wall, src


def schedule_distance(a: dict, b: dict) -> float | None:
    """Mean |m_a − m_b| over normalized time (both resampled to the longer one): how far a schedule
    moved from another (a previous round, the plain refinement)."""
    import numpy as np

    ma, mb = (np.asarray(x.get("multipliers") or [], dtype=float) for x in (a, b))
    if ma.size < 2 or mb.size < 2:
        return None
    n = max(ma.size, mb.size)
    t = np.linspace(0.0, 1.0, n)
    ra = np.interp(t, np.linspace(0.0, 1.0, ma.size), ma)
    rb = np.interp(t, np.linspace(0.0, 1.0, mb.size), mb)
    return float(np.mean(np.abs(ra - rb)))


def fmt_flops(x: float | None) -> str:
    return "?" if x is None else f"{x:.3g}"

