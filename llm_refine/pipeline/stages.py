"""One class per stage kind: what it is (its fields), whether it is done (`state`), how it runs
(`execute`), what its line says (`detail`), and how it asks for a cluster job.

A new stage kind is one subclass of `PipelineStage` with a ``kind`` (it registers itself with
`plan.Stage`), created in `plan.plan`. The runner and the SLURM emitter only call the methods below.

The state of a stage is read from what it wrote: a training run's ``summary.json`` and its
``pipeline_stage.json`` marker (written before launch: the spec hash, and the refined schedule's
sha256), a refined schedule's provenance, an evaluation's ``summary_sha256``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol

from ..errors import UserError
from ..fileio import atomic_write_json, read_json, sha256_file
from ..train.config import PretrainConfig
from ..train.rundir import EVAL_FILE, GRADNORMS, REFINED_FILE, RUN_CONFIG, STAGE_MARKER, SUMMARY, final_checkpoint, latest_checkpoint
from .plan import Stage, TrainArgs, train_args
from .recipe import REFINED, Recipe

logger = logging.getLogger(__name__)

# Stage states, as printed and stored.
SKIPPED, RESUMED, RUNNING, DONE, FAILED, BLOCKED, INTERRUPTED, EMITTED = (
    "skipped", "resumed", "running", "done", "failed", "blocked", "interrupted", "emitted",
)
NOT_RUN = "not run"  # reconciled after a SLURM chain: no trace on disk, nothing it needs failed


def schedule_digest(path: Path) -> str:
    """sha256 of what in a schedule file determines training: its multipliers. Not of the file,
    whose provenance carries a creation time: re-refining the same history gives the same digest,
    so a refined run is not refused as stale for a schedule that did not change."""
    import hashlib
    import json

    from ..artifact import read_schedule

    mult = [float(x) for x in read_schedule(path)["multipliers"]]
    return hashlib.sha256(json.dumps(mult).encode()).hexdigest()


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class StageContext(Protocol):
    """What a stage needs from the pipeline that runs it (`runner.Pipeline` is one)."""

    recipe: Recipe
    out: Path
    launcher: Any  # a `launchers.Launcher`
    refine_fn: Callable[..., dict]
    evaluate_fn: Callable[[Path], dict]


@dataclass(kw_only=True)
class PipelineStage(Stage):
    """The behaviour every stage kind has; the defaults fit a short stage run in this process."""

    parallel: ClassVar[bool] = False  # may run as a background process beside others (--jobs N)
    blocked_by_failures: ClassVar[bool] = True  # a failed dependency blocks it

    def state(self) -> str:
        """SKIPPED, RESUMED or RUNNING, from what is on disk. A UserError for a conflict."""
        raise NotImplementedError

    def check(self) -> None:
        """Refuse (UserError) before anything runs when the disk conflicts with the recipe."""

    def execute(self, ctx: StageContext) -> str:
        """Run the stage here; return its detail for the ``done`` line."""
        raise NotImplementedError

    def detail(self) -> str:
        """The text after ``skipped`` / ``done`` on the stage's line."""
        return ""

    # -- parallel kinds only: start in the background, then settle when the process ended

    def start(self, ctx: StageContext, prefix: str | None):
        raise NotImplementedError(f"{self.kind} stages run in the pipeline's process")

    def finish(self) -> str:
        return self.detail()

    # -- SLURM

    def launch_args(self) -> TrainArgs | None:
        """A training entry point's arguments, or None: the stage runs as ``llm-refine pipeline --stage ID``."""
        return None

    def needs_job(self) -> bool:
        """Whether `--emit slurm` writes a job for it (finished trainings get none)."""
        return True

    def slurm_resources(self, nodes: int, gpus_per_node: int) -> tuple[int, int]:
        """(nodes, GPUs per node) of its job, given the recipe's; default one node, no GPU."""
        return 1, 0


# ---------------------------------------------------------------------------------------------
# Training runs


@dataclass(kw_only=True)
class TrainStage(PipelineStage):
    kind: ClassVar[str] = "train"
    parallel: ClassVar[bool] = True

    schedule: str | None = None  # schedule label
    schedule_name: str | None = None
    seed: int | None = None
    lr_multiplier: float | None = None
    config: PretrainConfig | None = None  # the run's resolved config (built by plan.py only)
    schedule_file: Path | None = None  # refined-type runs: the schedule file it trains from

    def launch_args(self) -> TrainArgs:
        return train_args(self)

    def write_config(self) -> Path:
        """``<run_dir>/run_config.json``: the resolved config the run is launched with (and can be
        re-run from by hand with ``python -m llm_refine.train <that file>``)."""
        args = self.launch_args()
        args.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.config, self.config.to_dict())
        return args.config

    # -- the marker: what the pipeline launched in the run dir

    def marker(self, extra: dict | None = None) -> dict:
        return {
            "stage": self.id, "size": self.size, "schedule": self.schedule, "schedule_name": self.schedule_name,
            "seed": self.seed, "lr_multiplier": self.lr_multiplier, "spec_hash": self.spec_hash,
            "config_file": RUN_CONFIG, **(extra or {}),
        }

    def write_marker(self, extra: dict | None = None) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.run_dir / STAGE_MARKER, self.marker(extra))

    @property
    def refined_file(self) -> Path | None:
        if self.schedule_name != REFINED:
            return None
        return Path(self.schedule_file) if self.schedule_file is not None else self.run_dir.parent / REFINED_FILE

    # -- state

    def state(self) -> str:
        """SKIPPED (finished, same config), RESUMED (a checkpoint the Trainer resumes from) or
        RUNNING (fresh start). A run dir made with a different config is never reused or
        overwritten: that is a UserError."""
        rd = self.run_dir
        marker = read_json(rd / STAGE_MARKER)
        has_summary = (rd / SUMMARY).exists()
        if marker is not None and marker.get("spec_hash") != self.spec_hash:
            raise UserError(
                f"{rd}: was run with a different config than the recipe now gives stage {self.id}; "
                f"delete that directory or pass a new --out"
            )
        if marker is None and (has_summary or latest_checkpoint(rd) is not None):
            raise UserError(f"{rd}: holds a run the pipeline did not start; delete it or pass a new --out")
        f = self.refined_file
        if f is not None and marker is not None and marker.get("schedule_sha256"):
            if f.exists() and schedule_digest(f) != marker["schedule_sha256"]:
                raise UserError(f"{rd}: was trained with an older {f.name}; delete the run dir to rerun it with the new one")
        if has_summary:
            return SKIPPED
        if latest_checkpoint(rd) is not None:
            return RESUMED
        return RUNNING

    def check(self) -> None:
        self.state()

    def needs_job(self) -> bool:
        return self.state() != SKIPPED

    def slurm_resources(self, nodes: int, gpus_per_node: int) -> tuple[int, int]:
        return nodes, gpus_per_node

    def detail(self) -> str:
        v = (read_json(self.run_dir / SUMMARY) or {}).get("final_val_loss")
        return f"val_loss {v:.4f}" if isinstance(v, (int, float)) else ""

    # -- running

    def _prepare(self, ctx: StageContext) -> None:
        """Write the marker (what is launched, and the refined schedule's hash) first."""
        if ctx.launcher is None:
            raise UserError("no launcher configured")
        f = self.refined_file
        extra = {"schedule_sha256": schedule_digest(f)} if f is not None and f.exists() else {}
        self.write_marker({**extra, "launched": now()})
        self.write_config()

    def execute(self, ctx: StageContext) -> str:
        self._prepare(ctx)
        ctx.launcher.train(self)
        return self.finish()

    def start(self, ctx: StageContext, prefix: str | None):
        self._prepare(ctx)
        return ctx.launcher.start(self, prefix=prefix)

    def finish(self) -> str:
        if not (self.run_dir / SUMMARY).exists():
            raise RuntimeError(f"{self.run_dir}: training returned without writing {SUMMARY}")
        return self.detail()


# ---------------------------------------------------------------------------------------------
# Refinement


def refine_baseline(history: Path, out_file: Path, *, norm: str, tau: float) -> dict:
    """Refine ``history`` into ``out_file`` (and a PNG beside it) with `llm_refine.refine.refine_file`."""
    import warnings

    from ..refine import refine_file

    with warnings.catch_warnings():
        # A degenerate refinement is reported by the stage line and the report, not as a warning.
        warnings.simplefilter("ignore")
        return refine_file(history, out_file, norm=norm, tau=tau, plot=out_file.with_suffix(".png"))


def refine_detail(art: dict) -> str:
    diag = art.get("diagnostics") or {}
    bits = []
    for key in ("warmup_steps", "peak_step", "above_half_fraction", "final_anneal_steps"):
        v = diag.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            bits.append(f"{key}={v:.3g}" if isinstance(v, float) else f"{key}={v}")
    if diag.get("degenerate"):
        bits.insert(0, f"DEGENERATE ({diag.get('degenerate_reason') or 'see diagnostics'})")
    return "  ".join(bits)


def final_loss(run_dir: Path) -> float | None:
    """A finished run's final validation loss: eval.json's val_loss if present, else summary.json's."""
    for name, key in ((EVAL_FILE, "val_loss"), (SUMMARY, "final_val_loss")):
        v = (read_json(run_dir / name) or {}).get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


def best_lr(candidates: dict[float, dict[int, Path]]) -> tuple[float, dict] | None:
    """(lr multiplier, info) with the lowest mean final loss over seeds; None while a run has no
    loss yet. One LR needs no loss. ``info`` has every LR's mean and whether the best is on the
    grid's edge (and which way to extend it)."""
    lrs = sorted(candidates)
    if len(lrs) == 1:
        return lrs[0], {"lr_multiplier": lrs[0], "by": "fixed"}
    means = {}
    for m in lrs:
        losses = [final_loss(rd) for rd in candidates[m].values()]
        if any(v is None for v in losses):
            return None
        means[m] = sum(losses) / len(losses)
    best = min(lrs, key=lambda m: means[m])
    edge = "upper" if best == lrs[-1] else ("lower" if best == lrs[0] else None)
    info = {"lr_multiplier": best, "by": "lowest mean final loss over seeds",
            "mean_loss": {f"{m:g}": round(v, 6) for m, v in means.items()}, "edge": edge}
    return best, info


def _sha_or_none(p: Path) -> str | None:
    return sha256_file(p) if p.exists() else None


@dataclass(kw_only=True)
class RefineStage(PipelineStage):
    """Writes one refined schedule. The plain case (one fixed baseline, ``baseline_dir``) is
    `refine_fn(history, output, norm, tau)`; the others record what they used under the
    provenance's ``pipeline`` key (the source runs and their sha256, the chosen LR, the variant's
    settings), and are skipped only when that matches what they would use now:

    - ``candidates`` (LR -> seed -> run dir): refine.from: best, aggregation, rounds — the LR with
      the lowest mean final loss over seeds is picked when the stage runs (its deps are all of them);
      then the run of ``seed``, or with ``aggregate`` the per-step median/mean over every seed's norms;
    - ``transfer_file``: another size's refined schedule resampled to ``target_steps``.
    """

    kind: ClassVar[str] = "refine"

    baseline_dir: Path | None = None  # the run whose history is refined (the plain case)
    candidates: dict[float, dict[int, Path]] | None = None
    seed: int | None = None
    aggregate: str = "none"
    variant: str = REFINED
    output_name: str = REFINED_FILE
    transfer_file: Path | None = None
    target_steps: int | None = None

    @property
    def output(self) -> Path:
        return self.run_dir / self.output_name

    # -- what the schedule is (to be) made from

    def resolve(self) -> dict | None:
        """{"sources": [run dirs or files], "chosen": {...}}, or None while an input is missing."""
        if self.transfer_file is not None:
            return {"sources": [self.transfer_file], "chosen": {"transfer_from": self.spec.get("transfer_from")}} \
                if self.transfer_file.exists() else None
        if self.candidates is None:
            return {"sources": [self.baseline_dir], "chosen": {}}
        picked = best_lr(self.candidates)
        if picked is None:
            return None
        m, info = picked
        runs = self.candidates[m]
        dirs = list(runs.values()) if self.aggregate != "none" else [runs[self.seed]]
        return {"sources": dirs, "chosen": info}

    def settings(self) -> dict:
        """The variant's settings as recorded in (and compared with) the provenance."""
        return {k: v for k, v in self.spec.items() if k not in ("norm", "tau")}

    def _expected(self, res: dict) -> dict | None:
        files = [Path(p) if self.transfer_file is not None else Path(p) / GRADNORMS for p in res["sources"]]
        if any(not f.exists() for f in files):
            return None
        digests = [schedule_digest(f) for f in files] if self.transfer_file is not None else [sha256_file(f) for f in files]
        return {"sources": [{"path": str(f), "sha256": d} for f, d in zip(files, digests)],
                "settings": self.settings(), "chosen": res["chosen"]}

    def state(self) -> str:
        """SKIPPED when the schedule's provenance names the same norm, tau and sources (their
        current sha256) — and for a variant the same settings and chosen LR; else RUNNING."""
        art = read_json(self.output)
        if art is None:
            return RUNNING
        prov = art.get("provenance", {})
        if self.transfer_file is None:
            same_refine = (prov.get("norm") == self.spec["norm"] and prov.get("tau") is not None
                           and math.isclose(float(prov["tau"]), float(self.spec["tau"])))
            if not same_refine:
                return RUNNING
        if self.candidates is None and self.transfer_file is None:
            hist = self.baseline_dir / GRADNORMS
            return SKIPPED if hist.exists() and prov.get("source_sha256") == sha256_file(hist) else RUNNING
        res = self.resolve()
        exp = self._expected(res) if res is not None else None
        # The chosen LR shows in the sources (its run dirs); the means themselves may move (eval.json
        # written after the refinement) without the schedule's inputs changing.
        got = prov.get("pipeline") or {}
        same = exp is not None and all(got.get(k) == exp[k] for k in ("sources", "settings"))
        return SKIPPED if same else RUNNING

    def detail(self) -> str:
        art = read_json(self.output) or {}
        d = refine_detail(art)
        pipe = (art.get("provenance") or {}).get("pipeline") or {}
        chosen = pipe.get("chosen") or {}
        bits = []
        if pipe.get("sources"):
            names = [Path(x["path"]).parent.name if x["path"].endswith(GRADNORMS) else Path(x["path"]).parent.name + "/" + Path(x["path"]).name
                     for x in pipe["sources"]]
            bits.append("from " + ",".join(names))
        if chosen.get("by", "fixed") != "fixed":
            bits.append(f"best lr x{chosen['lr_multiplier']:g}" + (f" (on the grid's {chosen['edge']} edge)" if chosen.get("edge") else ""))
        return "  ".join(bits + ([d] if d else []))

    def execute(self, ctx: StageContext) -> str:
        if self.candidates is None and self.transfer_file is None:
            hist = self.baseline_dir / GRADNORMS
            if not hist.exists():
                raise RuntimeError(f"{hist}: the baseline run recorded no gradient-norm history")
            ctx.refine_fn(hist, self.output, norm=ctx.recipe.refine.norm, tau=ctx.recipe.refine.tau)
            return self.detail()
        res = self.resolve()
        if res is None:
            what = self.transfer_file if self.transfer_file is not None else "a source run's final loss"
            raise RuntimeError(f"{self.id}: {what} is missing; its source runs must finish first")
        exp = self._expected(res)
        if exp is None:
            raise RuntimeError(f"{self.id}: a source run recorded no gradient-norm history ({GRADNORMS})")
        if self.transfer_file is not None:
            art = transfer_schedule(self.transfer_file, self.output, steps=self.target_steps, pipeline=exp)
        elif len(res["sources"]) == 1 and self.aggregate == "none":
            ctx.refine_fn(Path(res["sources"][0]) / GRADNORMS, self.output, norm=self.spec["norm"], tau=self.spec["tau"])
            art = _add_pipeline_provenance(self.output, exp)
        else:
            art = refine_aggregate([Path(p) / GRADNORMS for p in res["sources"]], self.output, how=self.aggregate,
                                   norm=self.spec["norm"], tau=self.spec["tau"], pipeline=exp)
        del art
        return self.detail()


def _add_pipeline_provenance(path: Path, pipeline: dict) -> dict:
    """Record under provenance.pipeline what the pipeline refined (sources, chosen LR, settings)."""
    from ..artifact import read_schedule, write_schedule

    art = read_schedule(path)
    art["provenance"]["pipeline"] = pipeline
    write_schedule(path, art)
    return art


def refine_aggregate(histories: list[Path], out_file: Path, *, how: str, norm: str, tau: float, pipeline: dict) -> dict:
    """Refine the per-step ``how`` (median or mean) of the norms of several histories (one per
    seed; same steps required) into ``out_file``; the provenance lists every source and sha256."""
    import warnings

    import numpy as np

    from ..artifact import make_schedule_artifact, write_schedule
    from ..history import NormTrace, load_trace
    from ..refine import refine_trace

    traces = [load_trace(h, norm=norm) for h in histories]
    first = traces[0]
    for t in traces[1:]:
        if t.steps.shape != first.steps.shape or not np.array_equal(t.steps, first.steps):
            raise UserError(f"{t.source}: logs {t.steps.size} steps, {first.source} {first.steps.size} (or other steps); "
                            f"refine.aggregate needs histories of the same steps (same max_steps and logging)")
    stack = np.vstack([t.values for t in traces])
    values = np.median(stack, axis=0) if how == "median" else np.mean(stack, axis=0)
    trace = NormTrace(first.steps.copy(), values, f"{how} of {len(traces)} histories", first.column, dict(first.meta),
                      max(t.skipped_steps for t in traces))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m, info = refine_trace(trace, norm=norm, tau=tau)
    prov = {
        "source": pipeline["sources"][0]["path"], "source_sha256": pipeline["sources"][0]["sha256"],
        "sources": [dict(s) for s in pipeline["sources"]], "aggregate": how,
        "column": first.column, "norm": norm, "power": info["power"], "tau": tau, "median_width": info["width"],
        "T": int(m.size), "first_step": info["prep"]["first_step"], "last_step": info["prep"]["last_step"],
        "pipeline": pipeline,
    }
    art = make_schedule_artifact(m, provenance=prov, diagnostics=info["diagnostics"], fit=info["fit"])
    from ..fileio import output_transaction
    from ..plotting import plot_refinement

    with output_transaction():  # the schedule and its plot (aggregated norms, smoothed, schedule) together
        write_schedule(out_file, art)
        plot_refinement(info, m, out_file.with_suffix(".png"), title=trace.source)
    return art


def transfer_schedule(source: Path, out_file: Path, *, steps: int, pipeline: dict) -> dict:
    """Another run's refined schedule resampled (linearly, over normalized time) to ``steps``."""
    import numpy as np

    from ..artifact import make_schedule_artifact, read_schedule, write_schedule
    from ..refine import describe_schedule, fit_warmup_poly

    src = read_schedule(source)
    m0 = np.asarray(src["multipliers"], dtype=np.float64)
    m = np.interp(np.linspace(0.0, 1.0, steps), np.linspace(0.0, 1.0, m0.size), m0)
    m = m / m.max()
    sp = src.get("provenance") or {}
    prov = {
        "source": str(source), "source_sha256": sha256_file(source), "transferred_from": pipeline["settings"].get("transfer_from"),
        "source_T": int(m0.size), "T": int(m.size), "resampled": "linear over normalized time",
        "norm": sp.get("norm"), "tau": sp.get("tau"), "refined_from": sp.get("source"),
        "refined_from_sha256": sp.get("source_sha256"), "pipeline": pipeline,
    }
    art = make_schedule_artifact(m, provenance=prov, diagnostics=describe_schedule(m), fit=fit_warmup_poly(m))
    write_schedule(out_file, art)
    return art


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate_run(run_dir: Path) -> dict:
    """Evaluate a finished run's final checkpoint with `llm_refine.train.evaluate.evaluate_checkpoint`; write eval.json."""
    from ..train.evaluate import evaluate_checkpoint

    ckpt = final_checkpoint(run_dir)
    if ckpt is None:
        raise UserError(f"{run_dir}: no checkpoint-N directory to evaluate; the run must save its final checkpoint")
    t0 = time.time()
    # The run's own config (next to the checkpoint) defines the validation set.
    res = dict(evaluate_checkpoint(ckpt, sequence_losses=True))  # the report derives the held-out SE of paired differences
    res.update(
        checkpoint=str(ckpt), summary_sha256=sha256_file(run_dir / SUMMARY),
        eval_time_s=round(time.time() - t0, 3), evaluated=now(),
    )
    atomic_write_json(run_dir / EVAL_FILE, res)
    return res


def _eval_is_current(run_dir: Path) -> bool:
    """eval.json exists and was made from the run's current summary.json."""
    ev = read_json(run_dir / EVAL_FILE)
    summary = run_dir / SUMMARY
    return ev is not None and summary.exists() and ev.get("summary_sha256") == sha256_file(summary)


@dataclass(kw_only=True)
class EvaluateStage(PipelineStage):
    kind: ClassVar[str] = "evaluate"

    run_dirs: list[Path] = field(default_factory=list)  # the size's training runs

    def state(self) -> str:
        return SKIPPED if all(_eval_is_current(rd) for rd in self.run_dirs) else RUNNING

    def execute(self, ctx: StageContext) -> str:
        n = 0
        for rd in self.run_dirs:
            if not _eval_is_current(rd):
                ctx.evaluate_fn(rd)
                n += 1
        return f"{n} run(s) evaluated"

    def slurm_resources(self, nodes: int, gpus_per_node: int) -> tuple[int, int]:
        return 1, min(1, gpus_per_node)  # one accelerator at most


# ---------------------------------------------------------------------------------------------
# The report


@dataclass(kw_only=True)
class ReportStage(PipelineStage):
    kind: ClassVar[str] = "report"
    blocked_by_failures: ClassVar[bool] = False  # it covers what finished

    def state(self) -> str:
        return RUNNING  # cheap, always rebuilt

    def execute(self, ctx: StageContext) -> str:
        from ..report import build_report, collect_runs

        runs = collect_runs([ctx.out])
        paths = build_report(runs, ctx.out, title=f"llm-refine: {ctx.recipe.name}", recipe=ctx.recipe)
        return str(paths["markdown"])


__all__ = [
    "SKIPPED", "RESUMED", "RUNNING", "DONE", "FAILED", "BLOCKED", "INTERRUPTED", "EMITTED", "NOT_RUN", "now", "StageContext",
    "PipelineStage", "TrainStage", "RefineStage", "EvaluateStage", "ReportStage", "refine_baseline", "refine_detail",
    "evaluate_run", "final_loss", "best_lr", "refine_aggregate", "transfer_schedule",
]
