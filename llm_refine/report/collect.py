"""Reading run directories: what each finished run recorded, as a `RunResult`.

`collect_runs(dirs)` finds finished runs (a ``summary.json``) under any directories — a pipeline
output, a folder of run dirs, or run dirs themselves. File names come from `llm_refine.train.rundir`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..artifact import read_schedule
from ..errors import UserError
from ..fileio import read_json, read_jsonl
from ..labels import REFINED
from ..train.rundir import (
    EVAL_FILE,
    EVAL_LOG,
    GRADNORMS,
    REFINED_FILE,
    STAGE_MARKER,
    SUMMARY,
    TRAIN_LOG,
    is_finished,
    read_run_config,
    read_summary,
)


def get(d: Any, dotted: str, default=None):
    """``d["a"]["b"]`` for ``"a.b"``, or ``default`` where a level is missing or not a dict."""
    cur = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur


def num(x) -> float | None:
    """``x`` as a finite float, or None (bools, strings, NaN and inf are not numbers here)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def read_dict(path: Path) -> dict:
    """The JSON object in ``path``; {} when it is missing, unreadable or not an object."""
    d = read_json(path, {})
    return d if isinstance(d, dict) else {}


def _int_or_none(x) -> int | None:
    return x if isinstance(x, int) else None


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
    loss_source: str  # EVAL_FILE (final checkpoint evaluated) or SUMMARY
    max_steps: int | None
    tokens_seen: int | None
    parameters: int | None
    wall_time_s: float | None
    schedule_config: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    # The validation estimate's own noise (eval.json of `evaluate_checkpoint`; None when not recorded):
    val_se: float | None = None  # standard error over held-out sequences
    val_se_tokens: float | None = None  # standard error over predicted tokens (as if independent)
    val_sequences: int | None = None
    val_tokens: int | None = None
    val_sequence_losses: list[float] | None = None  # per held-out sequence, when eval.json has them

    @property
    def lr_key(self) -> float | None:
        return self.lr_multiplier if self.lr_multiplier is not None else self.peak_lr

    def val_curve(self) -> tuple[list[int], list[float]]:
        rows = [r for r in read_jsonl(self.run_dir / EVAL_LOG) if num(r.get("val_loss")) is not None]
        return [int(r["step"]) for r in rows], [float(r["val_loss"]) for r in rows]

    def lr_curve(self) -> tuple[list[int], list[float]]:
        rows = [r for r in read_jsonl(self.run_dir / TRAIN_LOG) if num(r.get("lr")) is not None and "step" in r]
        return [int(r["step"]) for r in rows], [float(r["lr"]) for r in rows]

    @property
    def history(self) -> Path:
        return self.run_dir / GRADNORMS

    @property
    def refined_file(self) -> Path | None:
        f = self.schedule_config.get("file")
        if f:
            p = Path(f)
            return p if p.is_absolute() else (self.run_dir / p if (self.run_dir / p).exists() else p)
        p = self.run_dir.parent / REFINED_FILE
        return p if self.schedule_name == REFINED and p.exists() else None


def _schedule_names(marker: dict, config: dict, summary: dict) -> tuple[str, str]:
    """(label, schedule name): the pipeline's marker first, then the run config, then the summary."""
    sched_cfg = get(config, "schedule") if isinstance(get(config, "schedule"), dict) else {}
    name = marker.get("schedule_name") or sched_cfg.get("name") or summary.get("schedule") or "run"
    if isinstance(summary.get("schedule"), dict):
        name = marker.get("schedule_name") or summary["schedule"].get("name", name)
    label = marker.get("schedule") or (name if isinstance(name, str) else "run")
    return str(label), str(name)


def _final_loss(ev: dict, summary: dict) -> tuple[float | None, float | None, str]:
    """(loss, perplexity, source): the final checkpoint's evaluation when there is one."""
    if num(ev.get("val_loss")) is not None:
        return float(ev["val_loss"]), num(ev.get("perplexity")), EVAL_FILE
    return num(summary.get("final_val_loss")), num(summary.get("perplexity")), SUMMARY


def load_run(run_dir: Path) -> RunResult | None:
    """A RunResult for a finished run dir, or None when it has no summary.json."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    if summary is None:
        return None
    marker = read_dict(run_dir / STAGE_MARKER)
    config = read_run_config(run_dir) or {}
    label, schedule_name = _schedule_names(marker, config, summary)
    size = marker.get("size") or summary.get("size") or get(config, "model.size") or run_dir.parent.name
    seed = marker.get("seed", get(config, "train.seed", summary.get("seed")))
    ev = read_dict(run_dir / EVAL_FILE)
    loss, ppl, src = _final_loss(ev, summary)
    if src != EVAL_FILE:
        ev = {}
    sched_cfg = get(config, "schedule")
    return RunResult(
        run_dir=run_dir, size=str(size), schedule=label, schedule_name=schedule_name,
        seed=int(seed) if isinstance(seed, int) else None,
        lr_multiplier=num(marker.get("lr_multiplier")),
        peak_lr=num(get(config, "train.learning_rate", summary.get("learning_rate", summary.get("peak_lr")))),
        final_val_loss=loss, perplexity=ppl, loss_source=src,
        max_steps=summary["max_steps"] if isinstance(summary.get("max_steps"), int) else get(config, "train.max_steps"),
        tokens_seen=_int_or_none(summary.get("tokens_seen")),
        parameters=_int_or_none(summary.get("parameters")),
        wall_time_s=num(summary.get("wall_time_s")),
        schedule_config=dict(sched_cfg) if isinstance(sched_cfg, dict) else {},
        config=config, summary=summary,
        val_se=num(ev.get("val_loss_se")), val_se_tokens=num(ev.get("val_loss_se_tokens")),
        val_sequences=_int_or_none(ev.get("sequences")) or _int_or_none(get(config, "data.val_sequences")),
        val_tokens=_int_or_none(ev.get("tokens")),
        val_sequence_losses=_sequence_losses(ev),
    )


def _sequence_losses(ev: dict) -> list[float] | None:
    """eval.json's per-sequence losses, when present, complete and all finite numbers."""
    xs = ev.get("sequence_losses")
    if not isinstance(xs, list) or len(xs) < 2 or (isinstance(ev.get("sequences"), int) and len(xs) != ev["sequences"]):
        return None
    vals = [num(x) for x in xs]
    return None if any(v is None for v in vals) else vals


def collect_runs(dirs: Iterable[str | os.PathLike], *, tag_sources: bool = False) -> list[RunResult]:
    """Every finished run at or below ``dirs`` (checkpoint folders are not searched).

    ``tag_sources``: prefix each run's size with the name of the DIR it was found under
    (``a/cpu-2m``), so runs of separate sweeps are compared side by side instead of being pooled as
    if they were extra seeds.
    """
    runs: list[RunResult] = []
    seen: set[Path] = set()
    for d in map(Path, dirs):
        if not d.exists():
            raise UserError(f"{d}: no such directory; pass a pipeline output or run directories")
        candidates = [d] if is_finished(d) else sorted(p.parent for p in d.rglob(SUMMARY))
        for rd in (c.resolve() for c in candidates):
            if rd in seen or any(part.startswith("checkpoint-") for part in rd.parts):
                continue
            r = load_run(rd)
            if r is not None:
                seen.add(rd)
                if tag_sources:
                    r.size = f"{d.resolve().name}/{r.size}"
                runs.append(r)
    return runs


def read_artifact(path: Path | None) -> dict | None:
    """A schedule file's JSON object with its multipliers as a list (a compact long schedule
    decoded), or None when there is none. A file that does not validate is returned as it is (the
    report shows what it holds rather than failing)."""
    if path is None:
        return None
    try:
        art = read_schedule(path)
    except UserError:
        art = read_json(path)
        return art if isinstance(art, dict) else None
    art["multipliers"] = np.asarray(art["multipliers"], dtype=float).tolist()
    return art


@dataclass
class ScheduleFile:
    """One refined-type schedule file the runs trained with (a size's `refined`, a variant, one LR)."""

    size: str
    label: str  # the schedule column whose runs used it
    path: Path
    artifact: dict
    lr_multipliers: list[float] = field(default_factory=list)  # the LRs whose runs used it


def schedule_files(runs: list[RunResult]) -> list[ScheduleFile]:
    """Every refined-type schedule file used by the runs, once each, in the order first seen."""
    out: dict[Path, ScheduleFile] = {}
    for r in runs:
        if r.schedule_name != REFINED:
            continue
        f = r.refined_file
        if f is None or not f.exists():
            continue
        key = Path(f).resolve()
        if key not in out:
            art = read_artifact(f)
            if art is None or "multipliers" not in art:
                continue
            out[key] = ScheduleFile(r.size, r.schedule, Path(f), art)
        if r.lr_multiplier is not None and r.lr_multiplier not in out[key].lr_multipliers:
            out[key].lr_multipliers.append(r.lr_multiplier)
    return list(out.values())


def refined_schedules(runs: list[RunResult]) -> dict[str, tuple[Path, dict]]:
    """size -> (path, artifact) of the refined schedule its refined runs used (the `refined`
    column's when there is one; refinement variants are in `schedule_files`)."""
    out: dict[str, tuple[Path, dict]] = {}
    for r in sorted(runs, key=lambda r: r.schedule != REFINED):
        if r.schedule_name != REFINED or r.size in out:
            continue
        f = r.refined_file
        art = read_artifact(f) if f is not None and f.exists() else None
        if art is not None and "multipliers" in art:
            out[r.size] = (f, art)
    return out
