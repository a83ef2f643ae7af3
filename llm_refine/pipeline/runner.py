"""`llm-refine pipeline RECIPE`: baseline → refine → rerun → controls → evaluation → report.

For every model size in the recipe the pipeline plans these stages (ids in brackets):

1. ``[<size>/linear…]``   warm-up + linear decay runs that record gradient norms (the baseline);
2. ``[<size>/refine]``    refinement of one baseline's history into ``<size>/refined_schedule.json``;
3. ``[<size>/refined…]``  reruns with the refined schedule, same peak LR, data order and seed;
4. ``[<size>/cosine…]``   control runs with the recipe's other schedules;
5. ``[<size>/evaluate]``  evaluation of each run's final checkpoint (``eval.json`` in the run dir);
6. ``[report]``           ``report.md``, ``report.html`` and ``plots/*.png`` for the whole sweep.

This module is the scheduler (`Pipeline`): it starts every stage whose dependencies are settled,
skips the finished ones, blocks the dependents of a failed one, prints one line per stage and keeps
``<out>/pipeline_state.json``. What a stage is and does: `stages.py`; its configuration: `plan.py`;
how a training runs: `launchers.py`; the state file and lock: `state.py`; ``--emit slurm``:
`slurm.py`; the command line: `cli.py`.

Output layout::

    <out>/pipeline_state.json  recipe.yaml  pretrain_base.yaml  report.md  report.html  plots/*.png
    <out>/<size>/refined_schedule.json
    <out>/<size>/<schedule>[-lr<m>][-seed<n>]/   run dirs (run_config.json, gradnorms.jsonl, summary.json, eval.json, ...)
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from .launchers import AccelerateLauncher, ChildRun, InProcessLauncher, Launcher, PythonLauncher, make_launcher  # noqa: F401
from .plan import Stage, plan
from .recipe import Recipe
from .stages import (
    BLOCKED, DONE, FAILED, INTERRUPTED, NOT_RUN, RESUMED, RUNNING, SKIPPED, PipelineStage, evaluate_run, now,
    refine_baseline,
)
from .state import PREPARE_JOB, OutLock, StateFile, read_job_status, write_inputs

logger = logging.getLogger(__name__)


def _stdout_line(line: str) -> None:
    print(line, flush=True)


@dataclass
class _Running:
    """A stage training in the background (``--jobs`` > 1)."""

    index: int
    stage: PipelineStage
    handle: Any  # ChildRun-like: poll(), check(), terminate()
    t0: float


class Pipeline:
    """Runs (or skips, or resumes) the stages of a recipe into ``out``.

    ``print_fn`` gets the one line per stage (default: stdout). ``evaluate_fn`` / ``refine_fn``
    replace the evaluation and refinement bodies (tests).
    """

    def __init__(
        self,
        recipe: Recipe,
        out: str | os.PathLike,
        launcher: Launcher | None = None,
        *,
        print_fn: Callable[[str], None] | None = None,
        evaluate_fn: Callable[[Path], dict] = evaluate_run,
        refine_fn: Callable[..., dict] = refine_baseline,
    ):
        self.recipe = recipe
        self.out = Path(out).resolve()
        self.stages: list[PipelineStage] = plan(recipe, self.out)
        self.by_id = {s.id: s for s in self.stages}
        self.launcher = launcher
        self.print = print_fn or _stdout_line
        self.evaluate_fn = evaluate_fn
        self.refine_fn = refine_fn
        self.state = StateFile(self.out, recipe, self.by_id)

    def write_inputs(self) -> None:
        write_inputs(self.out, self.recipe)

    def current_state(self, stage: Stage) -> str:
        return stage.state()

    def line(self, i: int, stage: Stage, state: str, detail: str = "") -> None:
        """The stage's one line: ``[ i/n] <id> <state>  <detail>``."""
        n = len(self.stages)
        self.print(f"[{i:>{len(str(n))}}/{n}] {stage.id:<28} {state}{('  ' + detail) if detail else ''}")

    _line = line  # older name

    # -- running

    def run(self, only: list[str] | None = None, jobs: int = 1) -> int:
        """Run (or skip/resume) every stage; returns 0 when all are done, 1 otherwise.

        ``jobs`` > 1 trains up to that many runs at once, as subprocesses, in dependency order.
        """
        if jobs < 1:
            raise UserError(f"--jobs must be at least 1, got {jobs}")
        if only:
            unknown = [s for s in only if s not in self.by_id]
            if unknown:
                raise UserError(f"unknown stage(s) {unknown}; stages are: {', '.join(self.by_id)}")
        self.out.mkdir(parents=True, exist_ok=True)
        with OutLock(self.out, shared=only is not None):
            return self._run(only, jobs)

    def _run(self, only: list[str] | None, jobs: int) -> int:
        self.write_inputs()
        self.state.load()
        for st in self.stages:  # every finished/partial run dir checked against the recipe first
            if only is None or st.id in only:
                st.check()
        self.print(f"llm-refine pipeline: {self.recipe.name} -> {self.out} ({len(self.stages)} stages)")
        if jobs > 1 and not hasattr(self.launcher, "start"):
            raise UserError("--jobs > 1 needs a launcher that starts subprocesses (the default ones do)")
        todo = [(i, st) for i, st in enumerate(self.stages, 1) if only is None or st.id in only]
        # A single-stage report (the last job of a SLURM chain, submitted `afterany`) first settles
        # every other stage from what is on disk, so the report and the state say what failed.
        reconciled = only is not None and any(st.kind == "report" for _, st in todo)
        if reconciled:
            self.reconcile(exclude=set(only))
        failed = self._schedule(todo, only, jobs)
        report = self.out / "report.md"
        counts = self.state.counts(None if reconciled else only)
        self.print("pipeline: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
                   + (f"; report: {report}" if report.exists() else ""))
        return 1 if failed else 0

    def _schedule(self, todo: list[tuple[int, PipelineStage]], only: list[str] | None, jobs: int) -> set[str]:
        """Start stages as their dependencies settle until none is left; returns the failed ids."""
        waiting = {st.id for _, st in todo}
        running: dict[str, _Running] = {}
        failed: set[str] = set()
        try:
            while todo or running:
                started = self._start_ready(todo, waiting, running, failed, only, jobs)
                finished = self._reap(running, failed)
                if not started and not finished:
                    # Stages are in dependency order, so with nothing running one is always startable.
                    assert running, f"pipeline scheduler stuck on {[st.id for _, st in todo]}"
                    time.sleep(0.2)
        except KeyboardInterrupt:
            for r in running.values():
                r.handle.terminate()
                self._interrupted(r.index, r.stage, r.t0)
            raise
        return failed

    def _start_ready(self, todo, waiting, running, failed, only, jobs) -> bool:
        """Settle the first stage in plan order whose dependencies are settled (and, for a
        background stage, while fewer than ``jobs`` run). Parallel kinds (trainings) run in the
        background when ``jobs`` > 1; everything else (seconds) runs here, in order."""
        for pos, (i, stage) in enumerate(todo):
            if any(d in waiting or d in running for d in stage.deps):
                continue
            background = stage.parallel and jobs > 1
            if background and len(running) >= jobs:
                continue
            del todo[pos]
            waiting.discard(stage.id)
            self._settle(i, stage, running, failed, only, background)
            return True
        return False

    def _blockers(self, stage: PipelineStage, failed: set[str], only: list[str] | None) -> list[str]:
        bad = [d for d in stage.deps if d in failed]
        if only is not None:
            bad += [d for d in stage.deps if d not in only and self.by_id[d].state() != SKIPPED]
        return bad

    def _settle(self, i, stage: PipelineStage, running, failed, only, background: bool) -> None:
        """Block, skip, start in the background, or run one stage."""
        bad = self._blockers(stage, failed, only)
        if bad and stage.blocked_by_failures:
            failed.add(stage.id)
            self.state.set(stage, BLOCKED, blocked_by=bad)
            self.line(i, stage, BLOCKED, f"(needs {', '.join(bad)})")
            return
        state = stage.state()
        if state == SKIPPED:
            self.state.set(stage, SKIPPED)
            self.line(i, stage, SKIPPED, stage.detail())
            return
        self.state.set(stage, state, started=now(), **_job_info())
        self.line(i, stage, state)
        t0 = time.time()
        try:
            if background:
                running[stage.id] = _Running(i, stage, stage.start(self, prefix=f"[{stage.id}]"), t0)
                return
            detail = stage.execute(self)
            if stage.kind == "report":
                self._report_unfinished(stage)
        except KeyboardInterrupt:
            self._interrupted(i, stage, t0)
            raise
        except Exception as e:  # a failed stage blocks its dependents, not the other sizes
            self._fail(i, stage, e, t0, failed)
            return
        self._done(i, stage, t0, detail)

    def _reap(self, running: dict[str, _Running], failed: set[str]) -> bool:
        """Settle the background runs that have exited."""
        any_done = False
        for sid in list(running):
            r = running[sid]
            if r.handle.poll() is None:
                continue
            del running[sid]
            any_done = True
            try:
                r.handle.check()
                detail = r.stage.finish()
            except Exception as e:
                self._fail(r.index, r.stage, e, r.t0, failed, trace=False)
                continue
            self._done(r.index, r.stage, r.t0, detail)
        return any_done

    # -- SLURM: what a job records, and what the report job settles from disk

    def _on_disk(self, stage: PipelineStage) -> tuple[str, str]:
        """What the stage's files say: (DONE, detail) for a finished result (a run dir with
        summary.json and a marker of the same config; a current schedule / evaluation),
        (INTERRUPTED, why) for a checkpoint without summary.json, (FAILED, why) for files that
        conflict with the recipe, ("", "") for nothing."""
        try:
            st = stage.state()
        except UserError as e:
            return FAILED, str(e)
        if st == SKIPPED:
            return DONE, stage.detail()
        if st == RESUMED:
            return INTERRUPTED, "a checkpoint but no summary.json: resubmit (or rerun) to resume"
        return "", ""

    def record_job(self, stage_id: str, *, exit_code: int | None = None, job: str | None = None) -> str:
        """A SLURM job's own record of its stage: at its start (``exit_code`` None) RUNNING or
        RESUMED; at its end (the job script's EXIT trap) DONE when the result is on disk, else
        FAILED (or INTERRUPTED: killed by a signal with a checkpoint to resume from). A stage whose
        job ran ``--stage ID`` already recorded its end: that record is kept. Returns the state."""
        if stage_id not in self.by_id:
            raise UserError(f"unknown stage {stage_id!r}; stages are: {', '.join(self.by_id)}")
        stage = self.by_id[stage_id]
        job = job or os.environ.get("SLURM_JOB_ID") or ""
        if exit_code is None:
            try:
                state = RESUMED if stage.state() == RESUMED else RUNNING
            except UserError as e:
                state = FAILED
                self.state.set(stage, FAILED, started=now(), error=str(e), slurm_job=job)
                return state
            self.state.set(stage, state, started=now(), slurm_job=job)
            return state
        entry = self.state.entry(stage_id)
        if entry.get("slurm_job") == job and entry.get("state") in (DONE, FAILED, BLOCKED, SKIPPED, INTERRUPTED):
            self.state.update(stage_id, lambda e: e.update(exit_code=exit_code))
            return entry["state"]
        disk, why = self._on_disk(stage)
        info: dict = {"exit_code": exit_code, "slurm_job": job, "finished": now()}
        wall = _seconds_since(entry.get("started"))
        if wall is not None:
            info["wall_s"] = wall
        log = _job_log(self.out)
        if disk == DONE:
            state = DONE
        elif disk == INTERRUPTED and exit_code >= 128:
            state, info["error"] = INTERRUPTED, f"slurm job {job} was stopped (exit code {exit_code}); {why}{log}"
        elif exit_code != 0:
            state, info["error"] = FAILED, f"slurm job {job} exited with code {exit_code}{log}"
        else:
            state, info["error"] = FAILED, f"slurm job {job} exited 0 but left no finished result{log}"
        self.state.set(stage, state, new_attempt=False, **info)
        return state

    def reconcile(self, exclude: set[str] | frozenset = frozenset()) -> dict[str, str]:
        """Settle every stage's state (but ``exclude``'s) from disk and the jobs' records, in plan
        order: DONE / SKIPPED when its result is on disk; FAILED as its job recorded (or its exit
        file says); INTERRUPTED for a checkpoint without summary; BLOCKED when a stage it needs
        (or the chain's data preparation) did not finish — Slurm cancelled its ``afterok`` job;
        NOT_RUN otherwise. Prints a line for each stage that is not done; returns id -> state."""
        settled: dict[str, str] = {}
        prep = read_job_status(self.out, PREPARE_JOB)
        prep_failed = prep is not None and prep["exit_code"] != 0
        for i, stage in enumerate(self.stages, 1):
            if stage.id in exclude:
                continue
            entry = self.state.entry(stage.id)
            old = entry.get("state")
            disk, why = self._on_disk(stage)
            status = read_job_status(self.out, stage.id)
            info: dict = {}
            if disk == DONE:
                state = old if old in (DONE, SKIPPED) else DONE
            elif old == FAILED:
                state = FAILED
            elif disk == FAILED:
                state, info["error"] = FAILED, why
            elif status is not None and status["exit_code"] != 0 and entry.get("slurm_job") in (None, "", status["slurm_job"]):
                state = INTERRUPTED if disk == INTERRUPTED and status["exit_code"] >= 128 else FAILED
                info.update(exit_code=status["exit_code"], slurm_job=status["slurm_job"],
                            error=f"slurm job {status['slurm_job']} exited with code {status['exit_code']}")
            elif disk == INTERRUPTED:
                state, info["error"] = INTERRUPTED, why
            elif old in (RUNNING, RESUMED) and entry.get("slurm_job"):
                state, info["error"] = FAILED, f"slurm job {entry['slurm_job']} started but recorded no end (killed?)"
            else:
                bad = [d for d in stage.deps if settled.get(d, self._entry_state(d)) not in (DONE, SKIPPED)]
                if prep_failed and stage.kind == "train":
                    bad.insert(0, PREPARE_JOB)
                if bad:
                    state, info["blocked_by"] = BLOCKED, bad
                else:
                    state = NOT_RUN
            settled[stage.id] = state
            if state != old or info:
                entry = self.state.set(stage, state, new_attempt=state in (BLOCKED, NOT_RUN), **info)
            if state not in (DONE, SKIPPED):
                self.line(i, stage, state, _why(entry))
        return settled

    def _entry_state(self, stage_id: str) -> str | None:
        return self.state.data.get("stages", {}).get(stage_id, {}).get("state")

    def _report_unfinished(self, report_stage: PipelineStage) -> None:
        """Append to report.md the stages that did not finish (state and why), when there are any."""
        path = self.out / "report.md"
        rows = []
        for st in self.stages:
            if st.id == report_stage.id:
                continue
            e = self.state.data.get("stages", {}).get(st.id, {})
            state = e.get("state", NOT_RUN)
            if state in (DONE, SKIPPED):
                continue
            rows.append(f"| `{st.id}` | {state} | {_why(e).replace('|', '/')} |")
        if not rows or not path.is_file():
            return
        from ..fileio import atomic_write_text

        text = path.read_text(encoding="utf-8").rstrip("\n")
        text += ("\n\n## Stages that did not finish\n\nThe report covers the runs that finished; these did not "
                 "(`pipeline_state.json` has the details):\n\n| stage | state | why |\n|---|---|---|\n"
                 + "\n".join(rows) + "\n")
        atomic_write_text(path, text)

    # -- the end of a stage

    def _interrupted(self, i, stage, t0) -> None:
        self.state.set(stage, INTERRUPTED, wall_s=round(time.time() - t0, 2))
        self.line(i, stage, INTERRUPTED, "rerun the same command to resume")

    def _fail(self, i, stage, e, t0, failed, trace: bool = True) -> None:
        failed.add(stage.id)
        if trace and not isinstance(e, UserError):  # a bug or a crash: keep the traceback visible
            logger.error("%s: %s", stage.id, type(e).__name__, exc_info=e)
        msg = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        self.state.set(stage, FAILED, error=msg, wall_s=round(time.time() - t0, 2))
        self.line(i, stage, FAILED, msg.splitlines()[0] if msg else "")

    def _done(self, i, stage, t0, detail: str) -> None:
        self.state.set(stage, DONE, wall_s=round(time.time() - t0, 2), finished=now())
        self.line(i, stage, DONE, f"{time.time() - t0:.1f}s" + (f"  {detail}" if detail else ""))


def _why(entry: dict) -> str:
    """A stage entry's reason, on one line: ``(needs a, b)`` or its error's first line."""
    if entry.get("blocked_by"):
        return f"(needs {', '.join(entry['blocked_by'])})"
    return (entry.get("error") or "").split("\n")[0]


def _job_info() -> dict:
    """The SLURM job this process runs in, for the stage's entry (none outside SLURM)."""
    job = os.environ.get("SLURM_JOB_ID")
    return {"slurm_job": job} if job else {}


def _job_log(out: Path) -> str:
    """``; log: <out>/slurm/logs/<job name>-<job id>.out`` inside a SLURM job, else ''."""
    name, job = os.environ.get("SLURM_JOB_NAME"), os.environ.get("SLURM_JOB_ID")
    return f"; log: {out / 'slurm' / 'logs' / f'{name}-{job}.out'}" if name and job else ""


def _seconds_since(iso: str | None) -> float | None:
    try:
        t0 = _dt.datetime.fromisoformat(iso)
    except (TypeError, ValueError):
        return None
    return round((_dt.datetime.now(_dt.timezone.utc) - t0).total_seconds(), 2)


__all__ = ["Pipeline"]
