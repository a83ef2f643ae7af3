"""The pipeline's state on disk: ``<out>/pipeline_state.json`` (every stage's state, start/end,
wall time, error; merged with what other processes wrote, rewritten atomically), the copy of the
recipe (each run's own resolved config is its ``run_config.json``), and the ``<out>/.pipeline.lock`` flock.

Each training stage's own marker (``pipeline_stage.json`` in its run dir) is written and read by
`stages.TrainStage`, whose `state` decides skip / resume / refuse from it.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from ..fileio import atomic_write_json, atomic_write_text, read_json
from ..train.rundir import LOCK_FILE, RECIPE_COPY, STATE_FILE
from .plan import Stage
from .recipe import Recipe
from .stages import now


def write_inputs(out: Path, recipe: Recipe) -> None:
    """``<out>/recipe.yaml``: a copy of the recipe the output was made with."""
    out.mkdir(parents=True, exist_ok=True)
    if recipe.path:
        atomic_write_text(out / RECIPE_COPY, Path(recipe.path).read_text(encoding="utf-8"))


class StateFile:
    """``<out>/pipeline_state.json``: one entry per stage of the current recipe."""

    def __init__(self, out: Path, recipe: Recipe, stage_ids):
        self.path = out / STATE_FILE
        self.out = out
        self.recipe = recipe
        self.ids = set(stage_ids)
        self.data: dict = {}

    def load(self) -> None:
        old = read_json(self.path) or {}
        self.data = {
            "recipe": self.recipe.path, "name": self.recipe.name, "out": str(self.out),
            "started": old.get("started") or now(), "updated": now(),
            # Drop stages the current recipe no longer has (their files stay on disk).
            "stages": {k: v for k, v in old.get("stages", {}).items() if k in self.ids},
        }

    def set(self, stage: Stage, state: str, **info) -> None:
        # Merge with the file first: SLURM jobs of other stages (`--stage`) may have updated it.
        on_disk = (read_json(self.path) or {}).get("stages", {})
        for sid, entry in on_disk.items():
            if sid in self.ids and sid != stage.id:
                self.data["stages"][sid] = entry
        entry = self.data["stages"].setdefault(stage.id, {})
        entry.update(kind=stage.kind, state=state, updated=now(), **info)
        if stage.run_dir is not None:
            entry["dir"] = str(stage.run_dir)
        self.data["updated"] = now()
        atomic_write_json(self.path, self.data)

    def counts(self, only: list[str] | None = None) -> dict[str, int]:
        """state -> number of stages in it (of ``only`` when given)."""
        counts: dict[str, int] = {}
        for sid, entry in self.data["stages"].items():
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

__all__ = ["write_inputs", "StateFile", "OutLock"]
