"""Launchers: how one training stage runs — in this process, in a ``python`` subprocess, or through
``accelerate launch``. Each takes its arguments from `plan.train_args` (via
``stage.launch_args``) and only formats them for its entry point's command line.

A launcher has ``train(stage)`` (run to the end) and, for ``--jobs N``,
``start(stage, prefix=...)`` returning a handle with ``poll()``,
``check()`` and ``terminate()`` (`ChildRun`).
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, Protocol

from ..errors import UserError
from .recipe import LAUNCHERS, Recipe
from .stages import TrainStage

logger = logging.getLogger(__name__)


def child_env() -> dict[str, str]:
    """The environment of a training subprocess: this one, with the HF hub's per-checkpoint
    progress bars off unless the caller set the variable (they only bury the stage lines)."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return env


class Launcher(Protocol):
    def train(self, stage: TrainStage) -> None: ...


class InProcessLauncher:
    """Trains in this process with `llm_refine.train.pretrain.run_pretrain` (which resumes from its latest checkpoint).

    ``callbacks_for(stage)``: extra ``TrainerCallback``s for a stage (monitoring; tests use one to
    interrupt a run mid-stage).
    """

    def __init__(self, callbacks_for: Callable[[TrainStage], list] | None = None,
                 before_run: Callable[[TrainStage], None] | None = None):
        self.callbacks_for = callbacks_for
        self.before_run = before_run  # the CLI sets the thread count here (entry points own it)

    def train(self, stage: TrainStage) -> None:
        from ..train.config import load_pretrain_config
        from ..train.pretrain import run_pretrain

        # The file the stage wrote: what every launcher runs, so in-process runs are no different.
        config = load_pretrain_config(stage.launch_args().config)
        if self.before_run is not None:
            self.before_run(stage)
        callbacks = list(self.callbacks_for(stage)) if self.callbacks_for else []
        run_pretrain(config, callbacks=callbacks)


ENTRY_MODULE = "llm_refine.train"  # the packaged training entry point (python -m / accelerate launch -m)


def entry_point(script: str | None) -> list[str]:
    """How a launcher names the training entry point: ``-m llm_refine.train`` (works from any
    directory with the package installed), or the recipe's own ``launch.script``."""
    return ["-m", ENTRY_MODULE] if script is None else [script]


class ChildRun:
    """A training subprocess whose output is echoed line by line, prefixed with the stage id when
    several runs share the terminal (``--jobs`` > 1)."""

    def __init__(self, cmd: list[str], prefix: str | None, env: dict[str, str] | None = None):
        import threading

        self.cmd = cmd
        if prefix is None:
            # Alone on the terminal: the child writes to it directly (progress bars intact).
            self.proc = subprocess.Popen(cmd, env=env)
            self.thread = None
            return
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)

        def pump():
            # Text mode splits on "\r" too, so each progress-bar refresh arrives as its own line.
            for line in self.proc.stdout:
                if line.strip():
                    sys.stdout.write(f"{prefix} {line.rstrip()}\n")
                    sys.stdout.flush()

        self.thread = threading.Thread(target=pump, daemon=True)
        self.thread.start()

    def poll(self) -> int | None:
        rc = self.proc.poll()
        if rc is not None and self.thread is not None:
            self.thread.join(timeout=5)
        return rc

    def wait(self) -> int:
        self.proc.wait()
        return self.poll()

    def terminate(self) -> None:
        """SIGTERM, then SIGKILL after 30 s: the run keeps its last checkpoint and resumes from it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def check(self) -> None:
        rc = self.poll()
        if rc:
            raise RuntimeError(f"`{shlex.join(self.cmd)}` exited with status {rc}")


class _SubprocessLauncher:
    def command(self, stage: TrainStage) -> list[str]:
        raise NotImplementedError

    def start(self, stage: TrainStage, prefix: str | None = None) -> ChildRun:
        cmd = self.command(stage)
        logger.debug("%s: %s", stage.id, shlex.join(cmd))
        return ChildRun(cmd, prefix, env=child_env())

    def train(self, stage: TrainStage) -> None:
        run = self.start(stage)
        try:
            run.wait()
        except KeyboardInterrupt:
            run.terminate()
            raise
        run.check()


class PythonLauncher(_SubprocessLauncher):
    """Each training in a fresh ``python -m llm_refine.train <run_dir>/run_config.json`` (what
    ``--jobs N`` uses for the in-process launcher: runs in parallel need processes of their own)."""

    def command(self, stage: TrainStage) -> list[str]:
        return [sys.executable, "-m", ENTRY_MODULE, str(stage.launch_args().config)]


class AccelerateLauncher(_SubprocessLauncher):
    """``accelerate launch --config_file CONFIG -m llm_refine.train <run_dir>/run_config.json``
    (or ``launch.script`` instead of ``-m llm_refine.train`` when the recipe names a script)."""

    def __init__(self, config: str | None, script: str | None = None, extra_args: list[str] | None = None):
        self.config = config
        self.script = script
        self.extra_args = list(extra_args or [])

    def command(self, stage: TrainStage) -> list[str]:
        cmd = [sys.executable, "-m", "accelerate.commands.launch"]
        if self.config:
            cmd += ["--config_file", self.config]
        return cmd + [*self.extra_args, *entry_point(self.script), str(stage.launch_args().config)]


def make_launcher(
    recipe: Recipe, launcher: str | None = None, launch_config: str | None = None, *, jobs: int = 1
) -> Launcher:
    name = launcher or recipe.launch.launcher
    if name not in LAUNCHERS:
        raise UserError(f"launcher {name!r} is not one of {', '.join(LAUNCHERS)}")
    if name == "inprocess":
        return PythonLauncher() if jobs > 1 else InProcessLauncher()
    cfg = launch_config or recipe.launch.config
    if cfg is not None and not Path(cfg).exists():
        raise UserError(f"{cfg}: no such accelerate config; pass one of the launch/*.yaml files with --launch-config")
    if recipe.launch.script is not None and not Path(recipe.launch.script).exists():
        raise UserError(f"{recipe.launch.script}: training script not found; fix launch.script or remove it "
                        f"(the default runs the installed `-m {ENTRY_MODULE}`)")
    if jobs > 1:
        _check_parallel_accelerate(cfg, recipe.launch.extra_args, jobs)
    return AccelerateLauncher(cfg, recipe.launch.script, recipe.launch.extra_args)


def _accelerate_world(config: str | None, extra_args: list[str]) -> tuple[int, int]:
    """(num_processes, num_machines) that ``accelerate launch`` will use: the command-line flags
    win over the config file; (1, 1) when neither says (accelerate's default config is not read)."""
    world = {"num_processes": 1, "num_machines": 1}
    if config is not None:
        import yaml

        try:
            raw = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"{config}: cannot read this accelerate config ({e}); fix the YAML or pass another --launch-config") from e
        if isinstance(raw, dict):
            for key in world:
                if isinstance(raw.get(key), int):
                    world[key] = raw[key]
    for i, arg in enumerate(extra_args):
        for key in world:
            flag = "--" + key
            if arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
            elif arg == flag and i + 1 < len(extra_args):
                value = extra_args[i + 1]
            else:
                continue
            if value.isdigit():
                world[key] = int(value)
    return world["num_processes"], world["num_machines"]


def _check_parallel_accelerate(config: str | None, extra_args: list[str], jobs: int) -> None:
    """Refuse ``--jobs N`` with multi-process accelerate runs: every launch would claim the same
    rendezvous port (29500 unless set) and the same devices or cores, so the second one fails to
    bind or oversubscribes the machine. One multi-process run at a time is what such configs mean."""
    procs, machines = _accelerate_world(config, extra_args)
    if procs > 1 or machines > 1:
        where = config or "launch.extra_args"
        raise UserError(
            f"--jobs {jobs} with {where} ({procs} processes on {machines} machine(s)): parallel multi-process "
            "trainings would share one rendezvous port and the same devices; use --jobs 1 (each training "
            "already uses every process), or a single-process config such as launch/single_cpu.yaml"
        )


__all__ = ["ENTRY_MODULE", "entry_point", "Launcher", "InProcessLauncher", "ChildRun", "PythonLauncher", "AccelerateLauncher", "make_launcher", "child_env"]
