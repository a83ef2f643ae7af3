"""The pipeline's command line: ``llm-refine pipeline RECIPE [--out DIR] ...`` (wired by
`llm_refine.cli`) and ``python -m llm_refine.pipeline ...``.

This is an entry point: it is the one place of the pipeline that changes process-wide state (it
turns off the Hugging Face progress bars, which only bury the stage lines).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import UserError, run_reporting_errors
from .launchers import InProcessLauncher, make_launcher
from .recipe import LAUNCHERS, load_recipe
from .runner import Pipeline
from .slurm import emit_slurm
from .stages import RESUMED, RUNNING, SKIPPED


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("recipe", help="pipeline recipe YAML, e.g. recipes/tiny.yaml")
    parser.add_argument("--out", default=None, help="output directory (default: runs/<recipe name>)")
    parser.add_argument("--emit", choices=["slurm"], default=None,
                        help="write one sbatch script per stage and <out>/slurm/submit.sh instead of running")
    parser.add_argument("--launcher", choices=list(LAUNCHERS), default=None,
                        help="run each training in this process or as an `accelerate launch` subprocess (default: the recipe's)")
    parser.add_argument("--launch-config", default=None, help="accelerate config for --launcher accelerate, e.g. launch/ddp.yaml")
    parser.add_argument("--stage", action="append", default=None, metavar="ID",
                        help="run only this stage (repeatable; used by the emitted SLURM scripts)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="train up to N runs at once, each in its own process (default 1: one after another)")
    parser.add_argument("--dry-run", action="store_true", help="print the stages and their state, run nothing")
    # What an emitted SLURM job records of its own stage in pipeline_state.json (with one --stage).
    parser.add_argument("--job-start", action="store_true",
                        help="record that this SLURM job starts the --stage (used by the emitted training jobs)")
    parser.add_argument("--job-exit", type=int, default=None, metavar="CODE",
                        help="record how this SLURM job of the --stage ended, from its exit code and the files "
                             "on disk (used by the emitted jobs' exit trap)")
    return parser


def _dry_run(pipe: Pipeline) -> int:
    for i, st in enumerate(pipe.stages, 1):
        try:
            state = st.state()
        except UserError as e:
            state = f"conflict: {e}"
        verb = {SKIPPED: "would skip", RESUMED: "would resume", RUNNING: "would run"}.get(state, state)
        pipe.line(i, st, verb)
    return 0


def _quiet_progress_bars() -> None:
    """The pipeline prints one line per stage and the runs print their own progress lines; the
    per-checkpoint "Writing model shards" / "Loading weights" bars of transformers only bury them.
    (Subprocess launches get the variable in their own environment: `launchers.child_env`.)"""
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    hf_logging.disable_progress_bar()


def main_pipeline(args: argparse.Namespace) -> int:
    from ..logsetup import stdout_logging

    recipe = load_recipe(args.recipe)
    out = Path(args.out) if getattr(args, "out", None) else Path("runs") / recipe.name
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory; pass a directory (new or a previous pipeline output)")
    with stdout_logging():
        return _run(args, recipe, out)


def _set_threads(stage) -> None:
    """In-process runs: the thread count each run's config asks for (entry points own it)."""
    from ..train.pretrain import set_threads

    set_threads(stage.config.train)


def _run(args: argparse.Namespace, recipe, out: Path) -> int:
    launcher_name = getattr(args, "launcher", None)
    launch_config = getattr(args, "launch_config", None)
    if launch_config and (launcher_name or recipe.launch.launcher) != "accelerate":
        launcher_name = "accelerate"
    if getattr(args, "emit", None) == "slurm":
        submit = emit_slurm(Pipeline(recipe, out), launcher=launcher_name, launch_config=launch_config, recipe_arg=args.recipe)
        print(f"wrote {len(list(submit.parent.glob('*.sbatch')))} sbatch scripts; submit them with: bash {submit}")
        return 0
    pipe = Pipeline(recipe, out, None)
    job_start, job_exit = getattr(args, "job_start", False), getattr(args, "job_exit", None)
    if job_start or job_exit is not None:
        stages = getattr(args, "stage", None) or []
        if len(stages) != 1 or (job_start and job_exit is not None):
            raise UserError("--job-start / --job-exit record one job: pass exactly one --stage ID and one of the two")
        state = pipe.record_job(stages[0], exit_code=job_exit)
        print(f"{stages[0]}: {state} (pipeline_state.json)")
        return 0
    if getattr(args, "dry_run", False):
        return _dry_run(pipe)
    jobs = int(getattr(args, "jobs", 1) or 1)
    _quiet_progress_bars()
    pipe.launcher = make_launcher(recipe, launcher_name, launch_config, jobs=jobs)
    if isinstance(pipe.launcher, InProcessLauncher):
        pipe.launcher.before_run = _set_threads
    return pipe.run(only=getattr(args, "stage", None), jobs=jobs)


def main(argv: list[str] | None = None) -> int:
    """``python -m llm_refine.pipeline ...`` = ``llm-refine pipeline ...``: the same arguments, the
    same one-line errors on stderr and the same exit codes (2 for a bad input, 130 for Ctrl-C).
    (Standalone: the pipeline layer does not import the top-level CLI above it.)"""
    parser = add_pipeline_arguments(argparse.ArgumentParser(prog="llm-refine pipeline"))
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    return run_reporting_errors("llm-refine pipeline", lambda: main_pipeline(args))


if __name__ == "__main__":
    sys.exit(main())
