"""``llm-refine pipeline --emit slurm``: one sbatch script per unfinished stage (plus one that
prepares the data), chained in ``<out>/slurm/submit.sh``.

The chain: ``prepare`` (one node: ``python -m llm_refine.train <run_config.json> --prepare-only``
for each distinct data setting — tokenizer training, tokenizing and packing into the cache, once,
before any training job) → the training jobs (``afterok`` on ``prepare`` and on their stage's
dependencies) → refine / evaluate (``afterok``) → ``report``, submitted ``afterany`` on every job,
so it runs when some failed. Every script sets ``--kill-on-invalid-dep=yes``: a job whose
``afterok`` dependency failed is cancelled (``DependencyNeverSatisfied``) instead of pending for
ever.

A training stage's job runs its entry point with the arguments of `plan.train_args` (one
``accelerate launch`` per node through ``srun`` for multi-node runs; ``MASTER_ADDR`` /
``MASTER_PORT`` default to the allocation's first node and ``slurm.port``, and a value set where
the job is submitted wins); every other stage's job runs ``llm-refine pipeline RECIPE --out OUT
--stage ID`` on one node. Resources per job come from the stage (`PipelineStage.slurm_resources`).

State: each job records its stage in ``pipeline_state.json`` (`state.StateFile`, under its flock):
a training job with ``--job-start`` before it trains; every job through its EXIT trap, which
first writes ``<out>/slurm/status/<stage>.exit`` in plain bash (so a job that fails before
``llm-refine`` is on PATH still leaves its exit code) and then runs ``--job-exit CODE``. The
report job settles every stage from disk first (`runner.Pipeline.reconcile`): failed, blocked
(its job was cancelled), interrupted, not run.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from ..errors import UserError
from ..fileio import atomic_write_text
from ..train.rundir import RECIPE_COPY
from .launchers import entry_point
from .plan import TrainArgs
from .recipe import Recipe
from .runner import Pipeline
from .stages import EMITTED, PipelineStage, now
from .state import PREPARE_JOB, job_slug, job_status_path

PREPARE_CMD = "python -m llm_refine.train"  # the packaged entry point's --prepare-only fills the shared cache


def _sbatch_header(recipe: Recipe, job: str, log_dir: Path, *, nodes: int, gpus: int) -> list[str]:
    s = recipe.slurm
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job}", f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=1"]
    if gpus:
        lines.append(f"#SBATCH --gpus-per-node={gpus}")
    if s.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={s.cpus_per_task}")
    if s.time:
        lines.append(f"#SBATCH --time={s.time}")
    if s.partition:
        lines.append(f"#SBATCH --partition={s.partition}")
    if s.account:
        lines.append(f"#SBATCH --account={s.account}")
    # A job whose afterok dependency failed is cancelled, not left pending (DependencyNeverSatisfied).
    lines.append("#SBATCH --kill-on-invalid-dep=yes")
    lines += [f"#SBATCH {x}" for x in s.extra]
    lines.append(f"#SBATCH --output={log_dir}/%x-%j.out")
    return lines


def _train_lines(recipe: Recipe, args: TrainArgs, use_accel: bool, cfg: str | None) -> list[str]:
    """The body of a training job: the training script with the stage's launch arguments."""
    s = recipe.slurm
    tail = " ".join(shlex.quote(a) for a in [*entry_point(recipe.launch.script), str(args.config)])
    if not use_accel:
        return [f"python {tail}"]
    inner = "accelerate launch"
    if cfg:
        inner += f" --config_file {shlex.quote(str(Path(cfg).resolve()))}"
    inner += ' --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID"'
    inner += ' --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"'
    if s.gpus_per_node:
        inner += f' --num_processes "$((SLURM_NNODES * {int(s.gpus_per_node)}))"'
    inner += " " + " ".join(shlex.quote(a) for a in recipe.launch.extra_args) if recipe.launch.extra_args else ""
    inner += " " + tail
    return [
        # The rendezvous: the allocation's first node and the recipe's port, unless set where the
        # job was submitted (sbatch passes the environment on), e.g. where node names do not resolve.
        'export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"',
        f'export MASTER_PORT="${{MASTER_PORT:-{int(s.port)}}}"',
        # One accelerate launcher per node; the inner shell expands SLURM_NODEID per node.
        f"srun --ntasks-per-node=1 bash -c {shlex.quote(inner)}",
    ]


class _Emitter:
    def __init__(self, pipeline: Pipeline, launcher: str | None, launch_config: str | None, recipe_arg: str | None):
        self.pipeline = pipeline
        self.recipe = recipe = pipeline.recipe
        self.out = pipeline.out
        self.sdir = self.out / "slurm"
        self.log_dir = self.sdir / "logs"
        self.use_accel = (launcher or recipe.launch.launcher) == "accelerate"
        self.cfg = launch_config or recipe.launch.config
        self.recipe_path = str(Path(recipe_arg or recipe.path or self.out / RECIPE_COPY).resolve())
        self.cwd = str(Path.cwd().resolve())

    def pipeline_cmd(self, stage_id: str, *extra: str) -> str:
        return " ".join(["llm-refine pipeline", shlex.quote(self.recipe_path), "--out", shlex.quote(str(self.out)),
                         "--stage", shlex.quote(stage_id), *extra])

    def preamble(self, name: str, stage_id: str | None, *, trains: bool = False) -> list[str]:
        """``set -euo pipefail``, the working directory, the EXIT trap that records how the job
        ended (before the setup lines: a failing setup line is recorded too), the setup lines.
        A ``--stage`` job that exits 0 recorded its own end: its trap skips the second record."""
        status = job_status_path(self.out, name)
        q = shlex.quote(str(status))
        record = [] if stage_id is None else [
            "  " + ("" if trains else '[ "$rc" -eq 0 ] || ') + self.pipeline_cmd(stage_id, '--job-exit "$rc"')
            + " || echo \"could not record the job's end in "
            f"pipeline_state.json (the report job reads {status})\" >&2"]
        return [
            "", "set -euo pipefail", f"cd {shlex.quote(self.cwd)}",
            "# How this job ended: its exit code in a file (plain bash), then its stage in pipeline_state.json.",
            "_llm_refine_exit() {",
            "  rc=$?",
            "  trap - EXIT",
            f'  {{ mkdir -p {shlex.quote(str(status.parent))} && echo "$rc ${{SLURM_JOB_ID:-}}" > {q}; }} || true',
            *record,
            '  exit "$rc"',
            "}",
            "trap _llm_refine_exit EXIT",
            *self.recipe.slurm.setup,
        ]

    def job_name(self, name: str) -> str:
        return f"llm-refine-{job_slug(self.recipe.name)}-{job_slug(name)}"[:120]

    def stage_script(self, stage: PipelineStage) -> str:
        s = self.recipe.slurm
        nodes, gpus = stage.slurm_resources(s.nodes, s.gpus_per_node)
        lines = _sbatch_header(self.recipe, self.job_name(stage.id), self.log_dir, nodes=nodes, gpus=gpus)
        args = stage.launch_args()
        lines += self.preamble(stage.id, stage.id, trains=args is not None)
        if args is not None:
            # The marker lets a later in-process `llm-refine pipeline` on this --out recognise the run;
            # the job trains from the resolved config written here.
            stage.write_marker({"emitted": now()})
            stage.write_config()
            lines.append(self.pipeline_cmd(stage.id, "--job-start")
                         + " || echo 'could not record the job start in pipeline_state.json' >&2")
            lines += _train_lines(self.recipe, args, self.use_accel, self.cfg)
        else:
            lines.append(self.pipeline_cmd(stage.id))
        return "\n".join(lines) + "\n"

    def prepare_script(self, configs: list[Path]) -> str:
        """One node: the data of every distinct data setting tokenized and packed into the cache
        (and the tokenizer trained), so N-node training jobs start from a filled cache."""
        lines = _sbatch_header(self.recipe, self.job_name(PREPARE_JOB), self.log_dir, nodes=1, gpus=0)
        lines += self.preamble(PREPARE_JOB, None)
        lines.append("# Set LLM_REFINE_CACHE to a shared filesystem path: the training jobs read this cache.")
        lines += [f"{PREPARE_CMD} {shlex.quote(str(c))} --prepare-only" for c in configs]
        return "\n".join(lines) + "\n"

    def write(self, name: str, text: str) -> str:
        path = self.sdir / name
        atomic_write_text(path, text)
        path.chmod(0o755)
        return name

    def emit(self) -> Path:
        self.pipeline.write_inputs()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.recipe.slurm.nodes > 1 and not self.use_accel:
            raise UserError("slurm.nodes > 1 needs launch.launcher: accelerate (and a multi-node launch/ config)")
        shutil.rmtree(self.sdir / "status", ignore_errors=True)  # exit codes of an earlier chain
        for old in self.sdir.glob("*.sbatch"):
            old.unlink()
        stages = [st for st in self.pipeline.stages if st.needs_job()]
        jobs: list[tuple[str, str, list[str], str]] = []  # (name, script, deps, afterok|afterany)
        data_configs: dict[str, Path] = {}
        after_prep: set[str] = set()  # jobs that already wait (directly or not) for the preparation
        emitted = {st.id for st in stages}
        for n, stage in enumerate(stages, 1):
            script = self.write(f"{n:02d}-{job_slug(stage.id)}.sbatch", self.stage_script(stage))
            deps = [d for d in stage.deps if d in emitted]
            if stage.launch_args() is not None:
                key = json.dumps(stage.config.to_dict()["data"], sort_keys=True, default=str)
                data_configs.setdefault(key, stage.launch_args().config)
                if not any(d in after_prep for d in deps):
                    deps = [PREPARE_JOB, *deps]
            if PREPARE_JOB in deps or any(d in after_prep for d in deps):
                after_prep.add(stage.id)
            jobs.append((stage.id, script, deps, "afterok"))
            self.pipeline.state.set(stage, EMITTED, script=str(self.sdir / script), emitted=now())
        if data_configs:
            jobs.insert(0, (PREPARE_JOB, self.write(f"00-{PREPARE_JOB}.sbatch", self.prepare_script(list(data_configs.values()))),
                            [], "afterok"))
        else:
            jobs = [(i, sc, [d for d in deps if d != PREPARE_JOB], k) for i, sc, deps, k in jobs]
        if jobs and jobs[-1][0] == "report":  # the report covers what finished: after every job, failed or not
            jobs[-1] = ("report", jobs[-1][1], [j[0] for j in jobs[:-1]], "afterany")
        submit = ["#!/bin/bash", "# Submits every stage with its dependencies. Generated by `llm-refine pipeline --emit slurm`.",
                  "set -euo pipefail", 'cd "$(dirname "$0")"', ""]
        var_of: dict[str, str] = {}
        for n, (sid, script, deps, kind) in enumerate(jobs):
            var = f"job{n}"
            dep = f"--dependency={kind}:{':'.join('$' + var_of[d] for d in deps)} " if deps else ""
            submit.append(f"{var}=$(sbatch --parsable --kill-on-invalid-dep=yes {dep}{script})")
            submit.append(f'echo "{sid}: job ${var}"')
            var_of[sid] = var
        return self.sdir / self.write("submit.sh", "\n".join(submit) + "\n")


def emit_slurm(
    pipeline: Pipeline, *, launcher: str | None = None, launch_config: str | None = None, recipe_arg: str | None = None
) -> Path:
    """Write ``<out>/slurm/NN-<stage>.sbatch`` for every stage not finished yet, ``00-prepare.sbatch``
    when any of them trains, and ``submit.sh`` that submits them in order (see the module doc)."""
    return _Emitter(pipeline, launcher, launch_config, recipe_arg).emit()


__all__ = ["emit_slurm", "PREPARE_JOB"]
