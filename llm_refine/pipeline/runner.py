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
    BLOCKED, DONE, FAILED, INTERRUPTED, SKIPPED, PipelineStage, evaluate_run, now, refine_baseline,
)
from .state import OutLock, StateFile, write_inputs

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
        failed = self._schedule(todo, only, jobs)
        report = self.out / "report.md"
        self.print("pipeline: " + ", ".join(f"{n} {k}" for k, n in sorted(self.state.counts(only).items()))
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
        self.state.set(stage, state, started=now())
        self.line(i, stage, state)
        t0 = time.time()
        try:
            if background:
                running[stage.id] = _Running(i, stage, stage.start(self, prefix=f"[{stage.id}]"), t0)
                return
            detail = stage.execute(self)
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


__all__ = ["Pipeline"]
