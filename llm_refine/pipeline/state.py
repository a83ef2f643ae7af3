"""The pipeline's state on disk: ``<out>/pipeline_state.json`` (every stage's state, start/end,
wall time, error), the copy of the recipe (each run's own resolved config is its
``run_config.json``), and the ``<out>/.pipeline.lock`` flock.

Several processes write the state file at once under ``--emit slurm`` (one job per stage, several
running at a time, on different nodes): every write is a read-modify-write of *one* stage's entry
under an exclusive flock on ``<out>/.pipeline_state.lock``, then an atomic rewrite, so no job's
update is lost and no reader sees a torn file. (flock works across nodes on NFSv4 and on Lustre
mounted with ``-o flock``.)

Each training stage's own marker (``pipeline_stage.json`` in its run dir) is written and read by
`stages.TrainStage`, whose `state` decides skip / resume / refuse from it.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path
from typing import Callable, Iterator

from ..errors import UserError
from ..fileio import atomic_write_json, atomic_write_text, read_json
from ..train.rundir import LOCK_FILE, RECIPE_COPY, STATE_FILE
from .plan import Stage
from .recipe import Recipe
from .stages import BLOCKED, EMITTED, now

STATE_LOCK = ".pipeline_state.lock"
LOCK_TIMEOUT_S = 120.0  # a writer holds the lock for milliseconds; this long means a hung filesystem

# Keys that describe one attempt at a stage: dropped when the stage starts again.
_ATTEMPT_KEYS = ("error", "blocked_by", "finished", "wall_s", "exit_code", "slurm_job", "started", "note")


def write_inputs(out: Path, recipe: Recipe) -> None:
    """``<out>/recipe.yaml``: a copy of the recipe the output was made with."""
    out.mkdir(parents=True, exist_ok=True)
    if recipe.path:
        atomic_write_text(out / RECIPE_COPY, Path(recipe.path).read_text(encoding="utf-8"))


@contextlib.contextmanager
def state_lock(out: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """An exclusive flock on ``<out>/.pipeline_state.lock`` for one read-modify-write of the state."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / STATE_LOCK, "a+") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise UserError(f"{out / STATE_LOCK}: still locked after {timeout:.0f}s; is the filesystem hung?") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# SLURM jobs' exit files: ``<out>/slurm/status/<job>``, "<exit code> <job id>", written by the job
# script's EXIT trap in plain bash (so also when a setup line fails before `llm-refine` is on PATH).

PREPARE_JOB = "prepare"  # the data-preparation job of an emitted chain (not a stage)


def job_slug(name: str) -> str:
    """A stage id (or job name) as a file-name part: ``cpu-0.5m/linear`` -> ``cpu-0.5m-linear``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")


def job_status_path(out: Path, name: str) -> Path:
    return Path(out) / "slurm" / "status" / f"{job_slug(name)}.exit"


def read_job_status(out: Path, name: str) -> dict | None:
    """{"exit_code": int, "slurm_job": str} of the job's exit file, or None when it has none."""
    try:
        parts = job_status_path(out, name).read_text(encoding="utf-8").split()
        return {"exit_code": int(parts[0]), "slurm_job": parts[1] if len(parts) > 1 else ""}
    except (OSError, ValueError, IndexError):
        return None


class StateFile:
    """``<out>/pipeline_state.json``: one entry per stage of the current recipe.

    `data` is this process's view: the file as of its last read or write. Writes (`set`,
    `update`) change only the named stage's entry of what is on disk at that moment.
    """

    def __init__(self, out: Path, recipe: Recipe, stage_ids):
        self.path = out / STATE_FILE
        self.out = out
        self.recipe = recipe
        self.ids = list(stage_ids)
        self.data: dict = {}

    def _fresh(self) -> dict:
        old = read_json(self.path) or {}
        stages = old.get("stages") if isinstance(old.get("stages"), dict) else {}
        return {
            "recipe": self.recipe.path, "name": self.recipe.name, "out": str(self.out),
            "started": old.get("started") or now(), "updated": now(),
            # Drop stages the current recipe no longer has (their files stay on disk).
            "stages": {k: v for k, v in stages.items() if k in self.ids and isinstance(v, dict)},
        }

    def load(self) -> None:
        self.data = self._fresh()

    def entry(self, stage_id: str) -> dict:
        """The stage's entry as it is on disk now (empty when it has none)."""
        self.data = self._fresh()
        return dict(self.data["stages"].get(stage_id, {}))

    def update(self, stage_id: str, change: Callable[[dict], None]) -> dict:
        """Apply ``change`` to the stage's entry, under the lock, on what is on disk now; returns it."""
        with state_lock(self.out):
            data = self._fresh()
            entry = data["stages"].setdefault(stage_id, {})
            change(entry)
            entry["updated"] = now()
            # Keep the recipe's stage order in the file, whatever order the jobs wrote in.
            data["stages"] = {k: data["stages"][k] for k in self.ids if k in data["stages"]}
            atomic_write_json(self.path, data)
            self.data = data
        return dict(entry)

    def set(self, stage: Stage, state: str, *, new_attempt: bool | None = None, **info) -> dict:
        """Set the stage's state (and ``info``). A new attempt (a start, a block, an emitted job; or
        ``new_attempt``) first drops what described the last one: its error, exit code, job id."""
        if new_attempt is None:
            new_attempt = "started" in info or state in (BLOCKED, EMITTED)

        def change(entry: dict) -> None:
            if new_attempt:
                for k in _ATTEMPT_KEYS:
                    entry.pop(k, None)
            entry.update(kind=stage.kind, state=state, **info)
            if stage.run_dir is not None:
                entry["dir"] = str(stage.run_dir)

        return self.update(stage.id, change)

    def counts(self, only: list[str] | None = None) -> dict[str, int]:
        """state -> number of stages in it (of ``only`` when given)."""
        counts: dict[str, int] = {}
        for sid, entry in self.data.get("stages", {}).items():
            if only is None or sid in only:
                counts[entry["state"]] = counts.get(entry["state"], 0) + 1
        return counts


class OutLock:
    """An flock on ``<out>/.pipeline.lock``: a whole-pipeline run holds it exclusively, single-stage
    runs (``--stage``, the SLURM jobs) share it. The OS drops it when the process dies, even on
    SIGKILL, so a crash never leaves a stale lock behind."""

    def __init__(self, out: Path, *, shared: bool):
        self.path = out / LOCK_FILE
        self.shared = shared
        self.fh = None

    def __enter__(self):
        import fcntl

        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.seek(0)
            holder = self.fh.read().strip() or "?"
            self.fh.close()
            raise UserError(
                f"{self.path.parent}: another `llm-refine pipeline` is running on this directory (pid {holder}); "
                "wait for it to finish or pass a different --out"
            ) from None
        if not self.shared:
            self.fh.seek(0)
            self.fh.truncate()
            self.fh.write(str(os.getpid()))
            self.fh.flush()
        return self

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


_OutLock = OutLock  # the name tests and older callers use

__all__ = ["write_inputs", "state_lock", "StateFile", "OutLock", "STATE_LOCK", "PREPARE_JOB", "job_slug",
           "job_status_path", "read_job_status"]
