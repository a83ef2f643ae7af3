"""Schedule refinement from a run's gradient-norm history (arXiv 2310.07831, Sec. 3).

Given per-step gradient norms n_t of a finished run, the refined schedule is

    η_t ∝ w_t · Σ_{p>t} w_p,     w_t = n̂_t^(-power),

with n̂ the norms smoothed by a median filter of odd width ≈ τ·T, power 1 for Adam-type optimizers
with ℓ1 norms and 2 for SGD with ℓ2 norms, normalized to a maximum of 1 (the last step gets 0).
Constant norms give exactly linear decay (T−1−t)/(T−1); real norms give a warm-up and a fast final
anneal by themselves.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage

from .errors import UserError
from .history import NormTrace, load_trace

MIN_POINTS = 5
# The most steps gap filling may produce (one float64 per step, a few arrays of it): a step column
# that jumps 0 -> 10^12 is a corrupted file, not a run, and must not try to allocate terabytes.
MAX_STEPS = 100_000_000
NORM_POWERS = {"l1": 1.0, "l2": 2.0}


class RefinementWarning(UserWarning):
    """Something about the input or the result the user should know (filled gaps, degenerate shape)."""


# ---------------------------------------------------------------------------------------------
# Input hygiene


def prepare_norms(steps, values, *, source: str = "norms") -> tuple[np.ndarray, np.ndarray, dict]:
    """Turn logged (step, norm) pairs into one norm per optimizer step, first to last logged step.

    - duplicated steps (a resumed run that re-logged some steps): the last record wins (warned);
    - steps out of order without duplicates: error (the file is not a training log in step order);
    - non-finite norms (fp16 overflow steps): dropped, counted, warned, then filled like gaps;
    - zero or negative norms, fewer than MIN_POINTS usable points: error;
    - gaps (logged every k steps, missing rows): filled by linear interpolation over the step index.
    """
    steps = np.asarray(steps)
    values = np.asarray(values, dtype=np.float64)
    if steps.ndim != 1 or values.ndim != 1 or steps.shape != values.shape:
        raise UserError(f"{source}: steps and norms must be 1-D arrays of equal length")
    # Integer steps need no check (the common case; the float check costs a sort's worth on 1M steps).
    if steps.size and steps.dtype.kind not in "iu":
        as_float = np.asarray(steps, dtype=np.float64)
        if not np.all(as_float == np.round(as_float)):
            raise UserError(f"{source}: steps must be whole numbers")
    steps = steps.astype(np.int64)
    report: dict[str, Any] = {"logged": int(steps.size), "duplicates": 0, "dropped_nonfinite": 0, "filled": 0}

    if steps.size > 1:
        diffs = np.diff(steps)
        if np.any(diffs <= 0):
            uniq, first_in_reversed = np.unique(steps[::-1], return_index=True)
            n_dup = steps.size - uniq.size
            if n_dup == 0:
                i = int(np.argmax(diffs <= 0))
                raise UserError(
                    f"{source}: steps are not in increasing order (step {steps[i + 1]} follows step {steps[i]} "
                    f"at record {i + 2}); sort the records by step"
                )
            keep = steps.size - 1 - first_in_reversed  # index of the last record of each step
            warnings.warn(
                f"{source}: {n_dup} duplicated step(s) (e.g. a resumed run re-logged them); keeping the last record of each",
                RefinementWarning,
                stacklevel=2,
            )
            report["duplicates"] = int(n_dup)
            steps, values = uniq, values[keep]

    finite = np.isfinite(values)
    if not finite.all():
        n_bad = int((~finite).sum())
        warnings.warn(
            f"{source}: dropped {n_bad} non-finite norm(s) (fp16 overflow steps?); they are filled by interpolation",
            RefinementWarning,
            stacklevel=2,
        )
        report["dropped_nonfinite"] = n_bad
        steps, values = steps[finite], values[finite]

    if steps.size < MIN_POINTS:
        raise UserError(
            f"{source}: only {steps.size} usable norm(s); refinement needs at least {MIN_POINTS} (record a longer run)"
        )
    if np.any(values <= 0):
        i = int(np.argmax(values <= 0))
        raise UserError(
            f"{source}: norm {float(values[i])!r} at step {int(steps[i])} is not positive; gradient norms must be > 0 "
            "(was the history recorded after zero_grad?)"
        )

    span = int(steps[-1]) - int(steps[0]) + 1
    if span > MAX_STEPS:
        raise UserError(
            f"{source}: the steps run from {int(steps[0])} to {int(steps[-1])} ({span:,} steps with {steps.size:,} logged); "
            f"filling the gaps would exceed the limit of {MAX_STEPS:,} steps; check the step column for a corrupted value"
        )
    if span != steps.size:
        full = np.arange(steps[0], steps[-1] + 1, dtype=np.int64)
        values = np.interp(full, steps, values)
        report["filled"] = int(span - steps.size)
        steps = full
    report.update(first_step=int(steps[0]), last_step=int(steps[-1]), T=int(steps.size))
    return steps, values, report


# ---------------------------------------------------------------------------------------------
# Smoothing and the refinement formula


def median_width(T: int, tau: float) -> int:
    """Odd filter width 2·⌊⌊τ·T⌋/2⌋ + 1 (1 means no smoothing)."""
    if tau < 0 or not math.isfinite(tau):
        raise UserError(f"tau must be a finite number >= 0, got {tau}")
    return 2 * (int(math.floor(tau * T)) // 2) + 1


def smooth_norms(norms, tau: float = 0.1) -> np.ndarray:
    """Median-filter ``norms`` with width `median_width(T, tau)`; tau=0 returns a copy.

    The start is edge-repeated; the end is reflect-padded. The paper's code pads the end by 2·width
    and cuts it off again; a centered filter only ever reads width//2 past the last step, so padding
    by that much gives the same output with less work (tests check the equivalence).
    """
    x = np.asarray(norms, dtype=np.float64)
    T = x.size
    width = median_width(T, tau)
    if width <= 1 or T < 2:
        return x.copy()
    half = width // 2
    padded = np.pad(x, (0, half), mode="reflect")
    out = scipy.ndimage.median_filter(padded, size=width, mode="nearest")
    return out[:T].copy()


def _scale_by_power_of_two(x: np.ndarray, ref: float) -> None:
    """Divide ``x`` in place by the power of two nearest below ``ref`` (> 0): exact in floating
    point (only the exponents change), so every later ratio is bit-for-bit what it would be
    unscaled, while values near ``ref`` land in [1, 2) — far from overflow and underflow."""
    if ref > 0 and math.isfinite(ref):
        _, e = math.frexp(ref)
        if e != 1:
            np.ldexp(x, -(e - 1), out=x)


_SAFE_EXP = 200  # weights within [2^-200, 2^200]: products and tail sums stay far from over/underflow


def weights_from_norms(norms: np.ndarray, power: float, *, out: np.ndarray | None = None) -> np.ndarray:
    """w = n^-power, scale-free: when the weights would leave [2^-200, 2^200] (norms like 1e308,
    or 1e-300), the norms are first divided exactly by a power of two near their minimum, so the
    weights lie in (0, 1]. The refined schedule is invariant to a common factor of the weights, so
    this changes only the range; norms of ordinary size are used as they are (bit-for-bit)."""
    n = np.array(norms, dtype=np.float64) if out is None else out
    if out is not None and norms is not out:
        np.copyto(n, norms)
    if n.size:
        lo, hi = float(n.min()), float(n.max())
        limit = 2.0 ** (_SAFE_EXP / power) if power * 1024 > _SAFE_EXP else math.inf
        if not (1.0 / limit <= lo and hi <= limit):
            _scale_by_power_of_two(n, lo)
    np.power(n, -power, out=n)
    return n


def schedule_from_weights(weights: np.ndarray, *, source: str = "norms") -> np.ndarray:
    """η_t = w_t · Σ_{p>t} w_p, divided by its maximum; the last step gets 0.

    The weights are first scaled (exactly, by a power of two) so the largest lies in [1, 2): the
    tail sums cannot overflow and the result does not depend on the weights' magnitude.
    """
    w = np.asarray(weights, dtype=np.float64)
    T = w.size
    out = np.empty(T, dtype=np.float64)
    if T == 0:
        return out
    top = float(w.max())
    if top > 0 and math.isfinite(top) and not (2.0**-_SAFE_EXP <= top <= 2.0**_SAFE_EXP):
        w = w.copy()
        _scale_by_power_of_two(w, top)
    # Σ_{p>t} w_p as a reversed cumulative sum: exact to rounding near the end, where the
    # alternative (total − cumsum) cancels catastrophically.
    tail = np.cumsum(w[::-1])[::-1]  # Σ_{p>=t}
    np.multiply(w[:-1], tail[1:], out=out[:-1])
    out[-1] = 0.0
    peak = out.max()
    if not peak > 0 or not math.isfinite(peak):
        raise UserError(
            f"{source}: refinement produced no positive learning rate (the weights n^-power are all zero or infinite); "
            "check the norms for extreme values"
        )
    out /= peak
    return out


def _power_for(norm: str, power: float | None) -> float:
    if power is not None:
        if not (power > 0 and math.isfinite(power)):
            raise UserError(f"power must be a positive number, got {power}")
        return float(power)
    if norm not in NORM_POWERS:
        raise UserError(f"norm must be 'l1' (Adam-type, w=1/n) or 'l2' (SGD, w=1/n^2), got {norm!r}")
    return NORM_POWERS[norm]


def refine_schedule(norms, *, norm: str = "l1", tau: float = 0.1, power: float | None = None, steps=None) -> np.ndarray:
    """The refined per-step multipliers (length T, max 1, last 0) for a run's gradient norms.

    ``norms``: one norm per consecutive optimizer step, or per logged step when ``steps`` is given
    (gaps are then filled by interpolation). ``norm`` picks the weights: "l1" → w = 1/n (Adam-type
    optimizers, ℓ1 norms), "l2" → w = n^-2 (SGD, ℓ2 norms); ``power`` overrides it (w = n^-power).
    ``tau`` is the median-filter width as a fraction of the run (0 disables smoothing).
    """
    p = _power_for(norm, power)
    values = np.asarray(norms, dtype=np.float64)
    if steps is None:
        steps = np.arange(values.size)
    _, values, _ = prepare_norms(steps, values)
    smoothed = smooth_norms(values, tau)
    del values
    # w = n^-p, in place to keep peak memory low on long runs.
    weights_from_norms(smoothed, p, out=smoothed)
    return schedule_from_weights(smoothed)


# ---------------------------------------------------------------------------------------------
# Diagnostics and fit


def describe_schedule(m, *, norms: np.ndarray | None = None) -> dict:
    """Shape summary of a schedule (multipliers with max 1), plus a degenerate-refinement check.

    warmup_steps: steps before the schedule first reaches 90% of its peak; peak_step/peak_fraction:
    where the maximum is; above_half_fraction: share of steps above half the peak; final_anneal_steps:
    steps after the last one at or above half the peak.

    Degenerate: the paper's stated limitation — when a model over-fits, its gradient norms collapse
    late in training, the weights 1/n explode there, and the "refined" schedule keeps the LR low for
    most of the run and spikes near the end. Flagged when the peak lies in the last quarter of the run
    or fewer than 10% of the steps are above half the peak.
    """
    m = np.asarray(m, dtype=np.float64)
    T = m.size
    peak = float(m.max())
    peak_step = int(np.argmax(m))
    above = m >= 0.5 * peak
    last_above = int(T - 1 - np.argmax(above[::-1]))
    d: dict[str, Any] = {
        "T": T,
        "warmup_steps": int(np.argmax(m >= 0.9 * peak)),
        "peak_step": peak_step,
        "peak_fraction": peak_step / max(T - 1, 1),
        "start_multiplier": float(m[0]),
        "above_half_fraction": float(above.mean()),
        "final_anneal_steps": T - 1 - last_above,
        "final_anneal_fraction": (T - 1 - last_above) / max(T - 1, 1),
    }
    reasons = []
    if d["peak_fraction"] > 0.75:
        reasons.append(f"its peak is at {d['peak_fraction']:.0%} of the run")
    if d["above_half_fraction"] < 0.10:
        reasons.append(f"only {d['above_half_fraction']:.1%} of steps are above half the peak")
    # LR area relative to linear decay over the same steps (whose mean multiplier is 1/2): below 1
    # the refined run trains at lower LR overall; well below 1 it anneals early.
    d["lr_area_vs_linear"] = float(m.mean() / 0.5) if peak > 0 else 0.0
    if norms is not None and len(norms) >= 2:
        d.update(norm_trend(norms))
    d["degenerate"] = bool(reasons)
    d["degenerate_reason"] = "; ".join(reasons)
    d["anneals_early"] = anneals_early(d)
    return d


def anneals_early(diag: dict) -> bool:
    """Whether a schedule anneals early because the norms it was refined from rise."""
    rise = diag.get("norm_rise_after_min")
    return bool(isinstance(rise, (int, float)) and rise >= EARLY_ANNEAL_RISE
                and diag.get("lr_area_vs_linear", 1.0) < EARLY_ANNEAL_AREA)


# A refinement "anneals early because norms rise" when the smoothed norms end at least this much
# above their early minimum and the schedule's LR area is below this share of linear decay's.
EARLY_ANNEAL_RISE = 1.25
EARLY_ANNEAL_AREA = 0.9


def norm_trend(smoothed) -> dict:
    """The norms' trend after the initial transient: where the (smoothed) norms reach their minimum
    in the first half of the run, and how far the last 5% of the run sits above it. Rising norms
    make w = 1/n fall, so the refined schedule anneals early."""
    n = np.asarray(smoothed, dtype=np.float64)
    T = n.size
    i_min = int(np.argmin(n[: max(1, T // 2)]))
    # Ratios before the mean: a trace of 1e308s must not overflow a sum.
    rise = float(np.mean(n[-max(1, T // 20):] / n[i_min]))
    return {
        "norm_ratio_end_to_start": float(n[-1] / n[0]),
        "norm_min_step": i_min,
        "norm_min_fraction": i_min / max(T - 1, 1),
        "norm_rise_after_min": rise,
    }


def early_anneal_message(diag: dict) -> str:
    """What to tell a user whose refinement anneals early because the norms rise, with what this
    project measured for such a case (numbers, not a guess)."""
    return (
        f"gradient norms rise {diag['norm_rise_after_min']:.2f}x after their minimum at "
        f"{diag['norm_min_fraction']:.0%} of the run, so w = 1/n falls and this schedule anneals early: "
        f"its LR area is {diag['lr_area_vs_linear']:.2f} of linear decay's. Measured in this project "
        "(docs/study: cpu-0.5m, 1000 steps, 3 seeds, paired by seed, 95% CIs): at the tuned peak LR the "
        "baseline's norms rose 1.40x (LR area 0.93) and refined lost to linear by +0.11 (+0.02 to +0.20); "
        "at an untuned LR (rise 2.0x, area 0.64-0.67) by +0.10 (+0.02 to +0.18); a second round, refined "
        "from the refined run's own norms, rose 1.69x (area 0.80) and lost by +0.15 (+0.07 to +0.23); "
        "the seeds' median norms (+0.11) and AdamC for the baseline (+0.11) did not help; linear's warm-up "
        "on top (refine.warmup: true) cut the loss to +0.04 (+0.02 to +0.06); WSD beat linear at LR x1 and x2 "
        "(-0.06, -0.02). Before spending compute on it: check that the baseline's peak LR is tuned "
        "(the refined shape depends on it), try refine.warmup: true, or keep linear decay or WSD."
    )


def degenerate_message(diag: dict) -> str:
    return (
        f"degenerate refinement: {diag['degenerate_reason']}. This is the paper's known limitation: "
        "when the model over-fits, gradient norms collapse late in training and the refined schedule "
        "keeps the LR low for most of the run. Train on more (non-repeated) data, use a larger tau, "
        "or keep the linear-decay schedule for this setting."
    )


def _warmup_poly(x: np.ndarray, a: float, p: float, s: float) -> np.ndarray:
    up = s + (1.0 - s) * x / a if a > 0 else np.ones_like(x)
    down = np.clip((1.0 - x) / (1.0 - a), 0.0, None) ** p
    return np.where(x < a, up, down)


def fit_warmup_poly(m, *, max_points: int = 4000) -> dict:
    """Least-squares fit of ``m`` to a warm-up then polynomial decay over normalized time x ∈ [0, 1]:

        f(x) = s + (1 − s)·x/a          for x < a   (linear warm-up from the start value s = m[0])
        f(x) = ((1 − x)/(1 − a))^power  for x ≥ a

    Returns warmup_fraction a, power, start s, and R². Long schedules are fit on ``max_points``
    evenly spaced samples (the shape is smooth; this keeps the fit cheap for million-step runs).
    Carry the result into any framework as warm-up for a·T steps then (1 − progress)^power.
    """
    from scipy.optimize import minimize_scalar

    m = np.asarray(m, dtype=np.float64)
    T = m.size
    x = np.linspace(0.0, 1.0, T)
    if T > max_points:
        idx = np.linspace(0, T - 1, max_points).round().astype(np.int64)
        x, y = x[idx], m[idx]
    else:
        y = m
    s = float(m[0])
    peak_x = float(np.argmax(m)) / max(T - 1, 1)

    def sse_for(a: float) -> tuple[float, float]:
        res = minimize_scalar(
            lambda logp: float(np.sum((_warmup_poly(x, a, math.exp(logp), s) - y) ** 2)),
            bounds=(math.log(0.05), math.log(20.0)),
            method="bounded",
            options={"xatol": 1e-4},
        )
        return float(res.fun), math.exp(float(res.x))

    cands = np.unique(np.clip(np.concatenate([np.linspace(0.0, 0.5, 26), [peak_x]]), 0.0, 0.9))
    scored = [(sse_for(float(a)), float(a)) for a in cands]
    (best_sse, best_p), best_a = min(scored, key=lambda t: t[0][0])
    # refine a locally around the best grid point
    lo, hi = max(0.0, best_a - 0.02), min(0.9, best_a + 0.02)
    res = minimize_scalar(lambda a: sse_for(a)[0], bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
    if res.fun < best_sse:
        best_a = float(res.x)
        best_sse, best_p = sse_for(best_a)
    sst = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - best_sse / sst if sst > 0 else 1.0
    return {"warmup_fraction": best_a, "power": best_p, "start": s, "r2": r2, "points": int(y.size)}


def fitted_multiplier(step: int, total: int, fit: dict) -> float:
    """The fitted shape as a schedule function (step, total) -> multiplier."""
    x = np.array([min(step, total - 1) / max(total - 1, 1)])
    return float(_warmup_poly(x, fit["warmup_fraction"], fit["power"], fit["start"])[0])


# ---------------------------------------------------------------------------------------------
# Whole-file refinement (what the CLI and the pipeline call)


def refine_trace(trace: NormTrace, *, norm: str = "l1", tau: float = 0.1, power: float | None = None) -> tuple[np.ndarray, dict]:
    """Refine a loaded trace; returns (multipliers, info) with the hygiene report, smoothed norms,
    diagnostics and fit. Warns (RefinementWarning) when the refinement is degenerate."""
    p = _power_for(norm, power)
    n_logged = int(np.isfinite(trace.values).sum())
    if trace.skipped_steps and n_logged < MIN_POINTS:
        raise UserError(
            f"{trace.source}: {trace.skipped_steps} step(s) were skipped by the engine (fp16 overflow) and only {n_logged} "
            f"have a usable norm; refinement needs at least {MIN_POINTS}: fix the overflow (e.g. a lower initial loss "
            "scale, or bf16) and record the run again"
        )
    steps, values, prep = prepare_norms(trace.steps, trace.values, source=trace.source)
    prep["skipped_steps"] = trace.skipped_steps
    smoothed = smooth_norms(values, tau)
    m = schedule_from_weights(weights_from_norms(smoothed, p), source=trace.source)
    diag = describe_schedule(m, norms=smoothed)
    if diag["degenerate"]:
        warnings.warn(f"{trace.source}: {degenerate_message(diag)}", RefinementWarning, stacklevel=2)
    info = {
        "steps": steps,
        "norms": values,
        "smoothed": smoothed,
        "width": median_width(values.size, tau),
        "power": p,
        "prep": prep,
        "diagnostics": diag,
        "fit": fit_warmup_poly(m),
    }
    return m, info


def refine_file(
    history: str | os.PathLike,
    out: str | os.PathLike,
    *,
    norm: str = "l1",
    tau: float = 0.1,
    power: float | None = None,
    column: str | None = None,
    plot: str | os.PathLike | None = None,
) -> dict:
    """Read a history file, refine it, write the schedule artifact (and ``plot``) atomically;
    returns the artifact.

    The outputs are all-or-nothing: their paths are checked before the history is read (not a
    regular file, the history itself, or each other: refused), and both files are renamed into
    place together only after everything has been computed and encoded.
    """
    from .artifact import make_schedule_artifact, write_schedule
    from .fileio import check_outputs, output_transaction, sha256_file

    check_outputs({"-o": out, "--plot": plot}, {"history": history})
    trace = load_trace(history, norm=norm, column=column)
    m, info = refine_trace(trace, norm=norm, tau=tau, power=power)
    prov = {
        "source": str(Path(trace.source).resolve()),
        "source_sha256": sha256_file(trace.source),
        "column": trace.column,
        "norm": norm,
        "power": info["power"],
        "tau": tau,
        "median_width": info["width"],
        "T": int(m.size),
        "first_step": info["prep"]["first_step"],
        "last_step": info["prep"]["last_step"],
        "input": {k: v for k, v in info["prep"].items() if k not in ("first_step", "last_step", "T")},
        "run_meta": trace.meta,
    }
    artifact = make_schedule_artifact(m, provenance=prov, diagnostics=info["diagnostics"], fit=info["fit"])
    with output_transaction():
        write_schedule(out, artifact)
        if plot is not None:
            from .plotting import plot_refinement

            plot_refinement(info, m, plot, title=Path(trace.source).name)
    return artifact
