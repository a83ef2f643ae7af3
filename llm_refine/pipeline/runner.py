"""`llm-refine pipeline RECIPE`: baseline → refine → rerun → controls → evaluation → report.

For every model size in the recipe the pipeline plans these stages (ids in brackets):

1. ``[<size>/linear…]``   warm-up + linear decay runs that record gradient norms (the baseline);
2. ``[<size>/refine]``    refinement of one baseline's history into ``<size>/refined_schedule.json``;
3. ``[<size>/refined…]``  reruns with the refined schedule, same peak LR, data order and seed;
4. ``[<size>/cosine…]``   control runs with the recipe's other schedules;
5. ``[<size>/evaluate]``  evaluation of each run's final checkpoint (``eval.json`` in the run dir);
6. ``[report]``           ``report.md``, ``report.html`` and ``plots/*.png`` for the whole sweep.

Training stages run in this process, as ``accelerate launch`` subprocesses, or are written out as one
SLURM script per stage (``--emit slurm``) chained with ``--dependency=afterok``. Every stage is
resumable: a stage whose output is complete and whose config is unchanged is *skipped*; a training
run interrupted after a checkpoint is *resumed* (``run_pretrain`` restarts from its latest
checkpoint); anything else *runs*. The state of every stage is kept in ``<out>/pipeline_state.json``
and printed as one line per stage.

Output layout::

    <out>/pipeline_state.json  recipe.yaml  pretrain_base.yaml  report.md  report.html  plots/*.png
    <out>/<size>/refined_schedule.json
    <out>/<size>/<schedule>[-lr<m>][-seed<n>]/   run dirs (config.json, gradnorms.jsonl, summary.json, eval.json, ...)
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from ..errors import UserError
from ..fileio import atomic_write_json, atomic_write_text, sha256_file
from .recipe import BASELINE, LAUNCHERS, REFINED, Recipe, load_recipe

# Dotted keys of `llm_refine.train.pretrain.PretrainConfig` that the pipeline sets for each run.
KEY_SIZE = "model.size"
KEY_SEED = "train.seed"
KEY_LR = "train.learning_rate"
KEY_OUTPUT = "output_dir"

STAGE_MARKER = "pipeline_stage.json"  # in each run dir: what the pipeline launched there
STATE_FILE = "pipeline_state.json"
REFINED_FILE = "refined_schedule.json"
EVAL_FILE = "eval.json"

# Stage states, as printed and stored.
SKIPPED, RESUMED, RUNNING, DONE, FAILED, BLOCKED, INTERRUPTED, EMITTED = (
    "skipped", "resumed", "running", "done", "failed", "blocked", "interrupted", "emitted",
)


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass
class Stage:
    id: str
    kind: str  # "train" | "refine" | "evaluate" | "report"
    deps: list[str] = field(default_factory=list)
    size: str | None = None
    schedule: str | None = None  # schedule label
    schedule_name: str | None = None
    seed: int | None = None
    lr_multiplier: float | None = None
    run_dir: Path | None = None  # train stages
    overrides: list[str] = field(default_factory=list)  # train stages: dotted key=value for load_pretrain_config
    spec: dict = field(default_factory=dict)  # everything that defines the stage's result

    @property
    def spec_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def run_dir_name(recipe: Recipe, label: str, lr_multiplier: float, seed: int) -> str:
    """``<label>[-lr<m>][-seed<n>]``: an axis appears in the name only when the recipe sweeps it."""
    name = label
    if len(recipe.lr_multipliers) > 1:
        name += f"-lr{lr_multiplier:g}"
    if len(recipe.seeds) > 1:
        name += f"-seed{seed}"
    return name


def _lookup(d: dict, dotted: str):
    cur: Any = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def base_learning_rate(recipe: Recipe, size: str) -> float:
    """The size's peak LR before the sweep multiplier: its override, the recipe's, or the default."""
    for ov in reversed(recipe.size_overrides.get(size, [])):
        k, _, v = ov.partition("=")
        if k.strip() == KEY_LR:
            return float(v)
    v = _lookup(recipe.pretrain, KEY_LR)
    if v is not None:
        return float(v)
    from ..train.pretrain import load_pretrain_config

    cfg = load_pretrain_config(copy.deepcopy(recipe.pretrain), [f"{KEY_SIZE}={size}"])
    return float(cfg.train.learning_rate)


def base_overrides(
    recipe: Recipe, size: str, seed: int, lr_multiplier: float, label: str, run_dir, refined_file=None
) -> list[str]:
    """The dotted overrides that turn the recipe's base pretrain config into one run's config."""
    ov = [f"{KEY_SIZE}={size}", *recipe.size_overrides.get(size, []), f"{KEY_SEED}={seed}"]
    if not math.isclose(lr_multiplier, 1.0):
        base = base_learning_rate(recipe, size)
        ov.append(f"{KEY_LR}={_fmt_value(base * lr_multiplier)}")
    for k, v in recipe.schedule_config(label, refined_file=str(refined_file) if refined_file else None).items():
        ov.append(f"schedule.{k}={_fmt_value(v)}")
    ov.append(f"{KEY_OUTPUT}={run_dir}")
    return ov


def plan(recipe: Recipe, out: Path) -> list[Stage]:
    """Every stage of the recipe, in an order that respects dependencies."""
    out = Path(out).resolve()
    stages: list[Stage] = []
    base_spec = {"pretrain": recipe.pretrain}
    ordered = [recipe.schedule(BASELINE)] + [s for s in recipe.schedules if s.label != BASELINE]
    for size in recipe.sizes:
        size_dir = out / size
        refined_file = size_dir / REFINED_FILE
        baseline_id = f"{size}/{run_dir_name(recipe, BASELINE, recipe.refine_lr_multiplier, recipe.refine_seed)}"
        refine_id = f"{size}/refine"
        train_ids: list[str] = []
        for sched in ordered:
            if sched.name == REFINED and not any(s.id == refine_id for s in stages):
                stages.append(
                    Stage(
                        id=refine_id, kind="refine", deps=[baseline_id], size=size,
                        run_dir=size_dir,
                        spec={"baseline": baseline_id, "norm": recipe.refine.norm, "tau": recipe.refine.tau},
                    )
                )
            for lrm in recipe.lr_multipliers:
                for seed in recipe.seeds:
                    rd = size_dir / run_dir_name(recipe, sched.label, lrm, seed)
                    is_refined = sched.name == REFINED
                    ov = base_overrides(recipe, size, seed, lrm, sched.label, rd, refined_file if is_refined else None)
                    spec = {**base_spec, "overrides": [o for o in ov if not o.startswith(f"{KEY_OUTPUT}=")]}
                    deps = []
                    if is_refined:
                        spec["refine"] = stages[[s.id for s in stages].index(refine_id)].spec
                        deps = [refine_id]
                    st = Stage(
                        id=f"{size}/{rd.name}", kind="train", deps=deps, size=size, schedule=sched.label,
                        schedule_name=sched.name, seed=seed, lr_multiplier=lrm, run_dir=rd, overrides=ov, spec=spec,
                    )
                    stages.append(st)
                    train_ids.append(st.id)
        if recipe.evaluate:
            stages.append(Stage(id=f"{size}/evaluate", kind="evaluate", deps=list(train_ids), size=size, run_dir=size_dir))
    final = "evaluate" if recipe.evaluate else "train"
    stages.append(Stage(id="report", kind="report", deps=[s.id for s in stages if s.kind == final]))
    return stages


# ---------------------------------------------------------------------------------------------
# Launchers: how one training stage runs


class Launcher(Protocol):
    def train(self, stage: Stage, base_config_path: Path, recipe: Recipe) -> None: ...


class InProcessLauncher:
    """Trains in this process with `llm_refine.train.pretrain.run_pretrain` (which resumes from its latest checkpoint).

    ``callbacks_for(stage)``: extra ``TrainerCallback``s for a stage (monitoring; tests use one to
    interrupt a run mid-stage).
    """

    def __init__(self, callbacks_for: Callable[[Stage], list] | None = None):
        self.callbacks_for = callbacks_for

    def train(self, stage: Stage, base_config_path: Path, recipe: Recipe) -> None:
        from ..train.pretrain import load_pretrain_config, run_pretrain

        config = load_pretrain_config(copy.deepcopy(recipe.pretrain), list(stage.overrides))
        callbacks = list(self.callbacks_for(stage)) if self.callbacks_for else []
        run_pretrain(config, callbacks=callbacks)


class ChildRun:
    """A training subprocess whose output is echoed line by line, prefixed with the stage id when
    several runs share the terminal (``--jobs`` > 1)."""

    def __init__(self, cmd: list[str], prefix: str | None):
        import threading

        self.cmd = cmd
        if prefix is None:
            # Alone on the terminal: the child writes to it directly (progress bars intact).
            self.proc = subprocess.Popen(cmd)
            self.thread = None
            return
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)

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
    def command(self, stage: Stage, base_config_path: Path) -> list[str]:
        raise NotImplementedError

    def start(self, stage: Stage, base_config_path: Path, recipe: Recipe, prefix: str | None = None) -> ChildRun:
        return ChildRun(self.command(stage, base_config_path), prefix)

    def train(self, stage: Stage, base_config_path: Path, recipe: Recipe) -> None:
        run = self.start(stage, base_config_path, recipe)
        try:
            run.wait()
        except KeyboardInterrupt:
            run.terminate()
            raise
        run.check()


def _set_args(stage: Stage) -> list[str]:
    return [ov for ov in stage.overrides if not ov.startswith(f"{KEY_OUTPUT}=")]


class PythonLauncher(_SubprocessLauncher):
    """Each training in a fresh ``python`` process running `run_pretrain` (what ``--jobs N`` uses
    for the in-process launcher: runs in parallel need processes of their own)."""

    CHILD = (
        "import sys; from llm_refine.train.pretrain import load_pretrain_config, run_pretrain; "
        "run_pretrain(load_pretrain_config(sys.argv[1], sys.argv[2:]))"
    )

    def command(self, stage: Stage, base_config_path: Path) -> list[str]:
        return [sys.executable, "-c", self.CHILD, str(base_config_path), *stage.overrides]


class AccelerateLauncher(_SubprocessLauncher):
    """``accelerate launch --config_file CONFIG recipes/pretrain.py BASE --output_dir D --set ...``."""

    def __init__(self, config: str | None, script: str = "recipes/pretrain.py", extra_args: list[str] | None = None):
        self.config = config
        self.script = script
        self.extra_args = list(extra_args or [])

    def command(self, stage: Stage, base_config_path: Path) -> list[str]:
        cmd = [sys.executable, "-m", "accelerate.commands.launch"]
        if self.config:
            cmd += ["--config_file", self.config]
        cmd += [*self.extra_args, self.script, str(base_config_path), "--output_dir", str(stage.run_dir)]
        # One --set followed by every override (the script's --set takes a list).
        return cmd + ["--set", *_set_args(stage)]


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
    if not Path(recipe.launch.script).exists():
        raise UserError(f"{recipe.launch.script}: training script not found; run from the repository root or set launch.script")
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


# ---------------------------------------------------------------------------------------------
# Stage state on disk


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    best, best_step = None, -1
    for p in Path(run_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir() and int(m.group(1)) > best_step:
            best, best_step = p, int(m.group(1))
    return best


def _marker(stage: Stage, extra: dict | None = None) -> dict:
    return {
        "stage": stage.id, "size": stage.size, "schedule": stage.schedule, "schedule_name": stage.schedule_name,
        "seed": stage.seed, "lr_multiplier": stage.lr_multiplier, "spec_hash": stage.spec_hash,
        "overrides": stage.overrides, **(extra or {}),
    }


def train_state(stage: Stage) -> str:
    """SKIPPED (finished, same config), RESUMED (checkpoint there) or RUNNING (fresh start).

    A run dir made with a different config is never reused or overwritten: that is a UserError.
    """
    rd = stage.run_dir
    assert rd is not None
    marker = _read_json(rd / STAGE_MARKER)
    has_summary = (rd / "summary.json").exists()
    if marker is not None and marker.get("spec_hash") != stage.spec_hash:
        raise UserError(
            f"{rd}: was run with a different config than the recipe now gives stage {stage.id}; "
            f"delete that directory or pass a new --out"
        )
    if marker is None and (has_summary or latest_checkpoint(rd) is not None):
        raise UserError(f"{rd}: holds a run the pipeline did not start; delete it or pass a new --out")
    if stage.schedule_name == REFINED and marker is not None and marker.get("schedule_sha256"):
        f = rd.parent / REFINED_FILE
        if f.exists() and sha256_file(f) != marker["schedule_sha256"]:
            raise UserError(f"{rd}: was trained with an older {f.name}; delete the run dir to rerun it with the new one")
    if has_summary:
        return SKIPPED
    if latest_checkpoint(rd) is not None:
        return RESUMED
    return RUNNING


def refine_state(stage: Stage, baseline_dir: Path) -> str:
    f = stage.run_dir / REFINED_FILE
    art = _read_json(f)
    if art is None:
        return RUNNING
    prov = art.get("provenance", {})
    hist = baseline_dir / "gradnorms.jsonl"
    same = (
        prov.get("norm") == stage.spec["norm"]
        and prov.get("tau") is not None
        and math.isclose(float(prov["tau"]), float(stage.spec["tau"]))
        and hist.exists()
        and prov.get("source_sha256") == sha256_file(hist)
    )
    return SKIPPED if same else RUNNING


def eval_state(run_dirs: list[Path]) -> str:
    for rd in run_dirs:
        ev = _read_json(rd / EVAL_FILE)
        summary = rd / "summary.json"
        if ev is None or not summary.exists() or ev.get("summary_sha256") != sha256_file(summary):
            return RUNNING
    return SKIPPED


# ---------------------------------------------------------------------------------------------
# Stage bodies


def refine_baseline(history: Path, out_file: Path, *, norm: str, tau: float) -> dict:
    """Refine ``history`` into ``out_file`` (and a PNG beside it) with `llm_refine.refine.refine_file`."""
    import warnings

    from ..refine import refine_file

    with warnings.catch_warnings():
        # A degenerate refinement is reported by the stage line and the report, not as a warning.
        warnings.simplefilter("ignore")
        return refine_file(history, out_file, norm=norm, tau=tau, plot=out_file.with_suffix(".png"))


def final_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint the run ended with: summary.json's ``last_checkpoint``, else the newest."""
    summary = _read_json(run_dir / "summary.json") or {}
    last = summary.get("last_checkpoint")
    if isinstance(last, str) and Path(last).is_dir():
        return Path(last)
    return latest_checkpoint(run_dir)


def evaluate_run(run_dir: Path) -> dict:
    """Evaluate a finished run's final checkpoint with `llm_refine.train.evaluate.evaluate_checkpoint`; write eval.json."""
    from ..train.evaluate import evaluate_checkpoint

    ckpt = final_checkpoint(run_dir)
    if ckpt is None:
        raise UserError(f"{run_dir}: no checkpoint-N directory to evaluate; the run must save its final checkpoint")
    t0 = time.time()
    # The run's own config.json (next to the checkpoint) defines the validation set.
    res = dict(evaluate_checkpoint(ckpt))
    res.update(
        checkpoint=str(ckpt), summary_sha256=sha256_file(run_dir / "summary.json"),
        eval_time_s=round(time.time() - t0, 3), evaluated=_now(),
    )
    atomic_write_json(run_dir / EVAL_FILE, res)
    return res


# ---------------------------------------------------------------------------------------------
# The runner


class _OutLock:
    """An flock on ``<out>/.pipeline.lock``: a whole-pipeline run holds it exclusively, single-stage
    runs (``--stage``, the SLURM jobs) share it. The OS drops it when the process dies, even on
    SIGKILL, so a crash never leaves a stale lock behind."""

    def __init__(self, out: Path, *, shared: bool):
        self.path = out / ".pipeline.lock"
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


class Pipeline:
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
        self.stages = plan(recipe, self.out)
        self.by_id = {s.id: s for s in self.stages}
        self.launcher = launcher
        self.print = print_fn or (lambda s: print(s, flush=True))
        self.evaluate_fn = evaluate_fn
        self.refine_fn = refine_fn
        self.state: dict = {}

    # -- bookkeeping

    @property
    def base_config_path(self) -> Path:
        return self.out / "pretrain_base.yaml"

    def _write_inputs(self) -> None:
        import yaml

        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.base_config_path, yaml.safe_dump(self.recipe.pretrain, sort_keys=False))
        if self.recipe.path:
            atomic_write_text(self.out / "recipe.yaml", Path(self.recipe.path).read_text(encoding="utf-8"))

    def _load_state(self) -> None:
        old = _read_json(self.out / STATE_FILE) or {}
        self.state = {
            "recipe": self.recipe.path, "name": self.recipe.name, "out": str(self.out),
            "started": old.get("started") or _now(), "updated": _now(),
            "stages": old.get("stages", {}),
        }
        # Drop stages the current recipe no longer has (their files stay on disk).
        self.state["stages"] = {k: v for k, v in self.state["stages"].items() if k in self.by_id}

    def _set(self, stage: Stage, state: str, **info) -> None:
        # Merge with the file first: SLURM jobs of other stages (`--stage`) may have updated it.
        on_disk = (_read_json(self.out / STATE_FILE) or {}).get("stages", {})
        for sid, entry in on_disk.items():
            if sid in self.by_id and sid != stage.id:
                self.state["stages"][sid] = entry
        entry = self.state["stages"].setdefault(stage.id, {})
        entry.update(kind=stage.kind, state=state, updated=_now(), **info)
        if stage.run_dir is not None:
            entry["dir"] = str(stage.run_dir)
        self.state["updated"] = _now()
        atomic_write_json(self.out / STATE_FILE, self.state)

    def _line(self, i: int, stage: Stage, state: str, detail: str = "") -> None:
        n = len(self.stages)
        self.print(f"[{i:>{len(str(n))}}/{n}] {stage.id:<28} {state}{('  ' + detail) if detail else ''}")

    def baseline_dir(self, size: str) -> Path:
        return self.by_id[f"{size}/refine"].run_dir / run_dir_name(
            self.recipe, BASELINE, self.recipe.refine_lr_multiplier, self.recipe.refine_seed
        )

    def size_run_dirs(self, size: str) -> list[Path]:
        return [s.run_dir for s in self.stages if s.kind == "train" and s.size == size]

    # -- running

    def current_state(self, stage: Stage) -> str:
        if stage.kind == "train":
            return train_state(stage)
        if stage.kind == "refine":
            return refine_state(stage, self.baseline_dir(stage.size))
        if stage.kind == "evaluate":
            return eval_state(self.size_run_dirs(stage.size))
        return RUNNING  # the report is cheap and always rebuilt

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
        with _OutLock(self.out, shared=only is not None):
            return self._run(only, jobs)

    def _run(self, only: list[str] | None, jobs: int) -> int:
        self._write_inputs()
        self._load_state()
        # Check every finished/partial run dir against the recipe before training anything.
        for st in self.stages:
            if st.kind == "train" and (only is None or st.id in only):
                train_state(st)
        self.print(f"llm-refine pipeline: {self.recipe.name} -> {self.out} ({len(self.stages)} stages)")
        if jobs > 1 and not hasattr(self.launcher, "start"):
            raise UserError("--jobs > 1 needs a launcher that starts subprocesses (the default ones do)")
        todo = [(i, st) for i, st in enumerate(self.stages, 1) if only is None or st.id in only]
        waiting = {st.id for _, st in todo}
        running: dict[str, tuple[int, Stage, Any, float]] = {}
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
            for i, st, handle, t0 in running.values():
                handle.terminate()
                self._set(st, INTERRUPTED, wall_s=round(time.time() - t0, 2))
                self._line(i, st, INTERRUPTED, "rerun the same command to resume")
            raise
        counts: dict[str, int] = {}
        for sid, entry in self.state["stages"].items():
            if only is None or sid in only:
                counts[entry["state"]] = counts.get(entry["state"], 0) + 1
        self.print("pipeline: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
                   + (f"; report: {self.out / 'report.md'}" if (self.out / "report.md").exists() else ""))
        return 1 if failed else 0

    def _start_ready(self, todo, waiting, running, failed, only, jobs) -> bool:
        """Start (or skip, or block) the first stage in plan order whose dependencies are settled.

        Training stages run as background subprocesses when ``jobs`` > 1, up to ``jobs`` at once;
        everything else (refine, evaluate, report: seconds) runs here, in order.
        """
        for pos, (i, stage) in enumerate(todo):
            if any(d in waiting or d in running for d in stage.deps):
                continue
            is_async = stage.kind == "train" and jobs > 1
            if is_async and len(running) >= jobs:
                continue
            del todo[pos]
            waiting.discard(stage.id)
            bad = [d for d in stage.deps if d in failed]
            if only is not None:
                bad += [d for d in stage.deps if d not in only and self.current_state(self.by_id[d]) != SKIPPED]
            if bad and stage.kind != "report":
                failed.add(stage.id)
                self._set(stage, BLOCKED, blocked_by=bad)
                self._line(i, stage, BLOCKED, f"(needs {', '.join(bad)})")
                return True
            state = self.current_state(stage)
            if state == SKIPPED:
                self._set(stage, SKIPPED)
                self._line(i, stage, SKIPPED, self._detail(stage))
                return True
            self._set(stage, state, started=_now())
            self._line(i, stage, state)
            t0 = time.time()
            try:
                if is_async:
                    self._prepare_train(stage)
                    handle = self.launcher.start(stage, self.base_config_path, self.recipe, prefix=f"[{stage.id}]")
                    running[stage.id] = (i, stage, handle, t0)
                    return True
                detail = self._execute(stage)
            except KeyboardInterrupt:
                self._set(stage, INTERRUPTED, wall_s=round(time.time() - t0, 2))
                self._line(i, stage, INTERRUPTED, "rerun the same command to resume")
                raise
            except Exception as e:  # a failed stage blocks its dependents, not the other sizes
                self._fail(i, stage, e, t0, failed)
                return True
            self._done(i, stage, t0, detail)
            return True
        return False

    def _reap(self, running, failed) -> bool:
        """Settle the background runs that have exited."""
        any_done = False
        for sid in list(running):
            i, stage, handle, t0 = running[sid]
            if handle.poll() is None:
                continue
            del running[sid]
            any_done = True
            try:
                handle.check()
                detail = self._finish_train(stage)
            except Exception as e:
                self._fail(i, stage, e, t0, failed, trace=False)
                continue
            self._done(i, stage, t0, detail)
        return any_done

    def _fail(self, i, stage, e, t0, failed, trace: bool = True) -> None:
        failed.add(stage.id)
        if trace and not isinstance(e, UserError):  # a bug or a crash: keep the traceback visible
            traceback.print_exc(file=sys.stderr)
        msg = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        self._set(stage, FAILED, error=msg, wall_s=round(time.time() - t0, 2))
        self._line(i, stage, FAILED, msg.splitlines()[0] if msg else "")

    def _done(self, i, stage, t0, detail: str) -> None:
        self._set(stage, DONE, wall_s=round(time.time() - t0, 2), finished=_now())
        self._line(i, stage, DONE, f"{time.time() - t0:.1f}s" + (f"  {detail}" if detail else ""))

    def _detail(self, stage: Stage) -> str:
        if stage.kind == "train":
            s = _read_json(stage.run_dir / "summary.json") or {}
            v = s.get("final_val_loss")
            return f"val_loss {v:.4f}" if isinstance(v, (int, float)) else ""
        if stage.kind == "refine":
            return _refine_detail(_read_json(stage.run_dir / REFINED_FILE) or {})
        return ""

    def _prepare_train(self, stage: Stage) -> None:
        """Write the stage marker (what is launched, and the refined schedule's hash) first."""
        if self.launcher is None:
            raise UserError("no launcher configured")
        refined = stage.run_dir.parent / REFINED_FILE if stage.schedule_name == REFINED else None
        extra = {"schedule_sha256": sha256_file(refined)} if refined is not None and refined.exists() else {}
        stage.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(stage.run_dir / STAGE_MARKER, _marker(stage, {**extra, "launched": _now()}))

    def _finish_train(self, stage: Stage) -> str:
        if not (stage.run_dir / "summary.json").exists():
            raise RuntimeError(f"{stage.run_dir}: training returned without writing summary.json")
        return self._detail(stage)

    def _execute(self, stage: Stage) -> str:
        if stage.kind == "train":
            self._prepare_train(stage)
            self.launcher.train(stage, self.base_config_path, self.recipe)
            return self._finish_train(stage)
        if stage.kind == "refine":
            hist = self.baseline_dir(stage.size) / "gradnorms.jsonl"
            if not hist.exists():
                raise RuntimeError(f"{hist}: the baseline run recorded no gradient-norm history")
            self.refine_fn(hist, stage.run_dir / REFINED_FILE, norm=self.recipe.refine.norm, tau=self.recipe.refine.tau)
            return self._detail(stage)
        if stage.kind == "evaluate":
            losses = []
            for rd in self.size_run_dirs(stage.size):
                ev = _read_json(rd / EVAL_FILE)
                if ev is not None and (rd / "summary.json").exists() and ev.get("summary_sha256") == sha256_file(rd / "summary.json"):
                    continue
                res = self.evaluate_fn(rd)
                losses.append(res.get("val_loss"))
            return f"{len(losses)} run(s) evaluated"
        if stage.kind == "report":
            from ..report import build_report, collect_runs

            runs = collect_runs([self.out])
            paths = build_report(runs, self.out, title=f"llm-refine: {self.recipe.name}", recipe=self.recipe)
            return str(paths["markdown"])
        raise AssertionError(stage.kind)


def _refine_detail(art: dict) -> str:
    diag = art.get("diagnostics") or {}
    bits = []
    for key in ("warmup_steps", "peak_step", "above_half_fraction", "final_anneal_steps"):
        v = diag.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            bits.append(f"{key}={v:.3g}" if isinstance(v, float) else f"{key}={v}")
    if diag.get("degenerate"):
        bits.insert(0, f"DEGENERATE ({diag.get('degenerate_reason') or 'see diagnostics'})")
    return "  ".join(bits)


# ---------------------------------------------------------------------------------------------
# SLURM


def _slug(stage_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", stage_id).strip("-")


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
    lines += [f"#SBATCH {x}" for x in s.extra]
    lines.append(f"#SBATCH --output={log_dir}/%x-%j.out")
    return lines


def emit_slurm(
    pipeline: Pipeline, *, launcher: str | None = None, launch_config: str | None = None, recipe_arg: str | None = None
) -> Path:
    """Write ``<out>/slurm/NN-<stage>.sbatch`` for every stage not finished yet, plus ``submit.sh``
    that submits them in order with ``--dependency=afterok:`` on each stage's dependencies."""
    recipe = pipeline.recipe
    out = pipeline.out
    pipeline._write_inputs()
    sdir = out / "slurm"
    log_dir = sdir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    repo = Path.cwd().resolve()
    use_accel = (launcher or recipe.launch.launcher) == "accelerate"
    cfg = launch_config or recipe.launch.config
    recipe_path = str(Path(recipe_arg or recipe.path or out / "recipe.yaml").resolve())
    s = recipe.slurm
    if s.nodes > 1 and not use_accel:
        raise UserError("slurm.nodes > 1 needs launch.launcher: accelerate (and a multi-node launch/ config)")
    submit = ["#!/bin/bash", "# Submits every stage with its dependencies. Generated by `llm-refine pipeline --emit slurm`.",
              "set -euo pipefail", 'cd "$(dirname "$0")"', ""]
    var_of: dict[str, str] = {}
    n = 0
    for stage in pipeline.stages:
        if stage.kind == "train" and train_state(stage) == SKIPPED:
            continue
        n += 1
        name = f"{n:02d}-{_slug(stage.id)}.sbatch"
        job = f"llm-refine-{_slug(recipe.name)}-{_slug(stage.id)}"[:120]
        is_train = stage.kind == "train"
        # Refinement and the report need no accelerator; evaluation needs one at most.
        gpus = s.gpus_per_node if is_train else (min(1, s.gpus_per_node) if stage.kind == "evaluate" else 0)
        lines = _sbatch_header(recipe, job, log_dir, nodes=s.nodes if is_train else 1, gpus=gpus)
        lines += ["", "set -euo pipefail", f"cd {shlex.quote(str(repo))}", *s.setup]
        if is_train:
            stage.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(stage.run_dir / STAGE_MARKER, _marker(stage, {"emitted": _now()}))
            sets = "--set " + " ".join(shlex.quote(o) for o in stage.overrides if not o.startswith(f"{KEY_OUTPUT}="))
            tail = f"{shlex.quote(recipe.launch.script)} {shlex.quote(str(pipeline.base_config_path))} --output_dir {shlex.quote(str(stage.run_dir))} {sets}"
            if use_accel:
                lines += [
                    'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
                    f"export MASTER_PORT={int(s.port)}",
                ]
                inner = "accelerate launch"
                if cfg:
                    inner += f" --config_file {shlex.quote(str(Path(cfg).resolve()))}"
                inner += ' --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID"'
                inner += ' --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"'
                if s.gpus_per_node:
                    inner += f' --num_processes "$((SLURM_NNODES * {int(s.gpus_per_node)}))"'
                inner += " " + " ".join(shlex.quote(a) for a in recipe.launch.extra_args) if recipe.launch.extra_args else ""
                inner += " " + tail
                # One accelerate launcher per node; the inner shell expands SLURM_NODEID per node.
                lines.append(f"srun --ntasks-per-node=1 bash -c {shlex.quote(inner)}")
            else:
                lines.append(f"python {tail}")
        else:
            lines.append(
                f"llm-refine pipeline {shlex.quote(recipe_path)} --out {shlex.quote(str(out))} --stage {shlex.quote(stage.id)}"
            )
        path = sdir / name
        atomic_write_text(path, "\n".join(lines) + "\n")
        path.chmod(0o755)
        var = f"job{n}"
        deps = [var_of[d] for d in stage.deps if d in var_of]
        dep = f"--dependency=afterok:{':'.join('$' + v for v in deps)} " if deps else ""
        submit.append(f"{var}=$(sbatch --parsable {dep}{name})")
        submit.append(f'echo "{stage.id}: job ${var}"')
        var_of[stage.id] = var
    path = sdir / "submit.sh"
    atomic_write_text(path, "\n".join(submit) + "\n")
    path.chmod(0o755)
    return path


# ---------------------------------------------------------------------------------------------
# CLI


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
    return parser


def main_pipeline(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe)
    out = Path(args.out) if getattr(args, "out", None) else Path("runs") / recipe.name
    launcher_name = getattr(args, "launcher", None)
    launch_config = getattr(args, "launch_config", None)
    if launch_config and (launcher_name or recipe.launch.launcher) != "accelerate":
        launcher_name = "accelerate"
    if getattr(args, "emit", None) == "slurm":
        pipe = Pipeline(recipe, out)
        submit = emit_slurm(pipe, launcher=launcher_name, launch_config=launch_config, recipe_arg=args.recipe)
        print(f"wrote {len(list(submit.parent.glob('*.sbatch')))} sbatch scripts; submit them with: bash {submit}")
        return 0
    pipe = Pipeline(recipe, out, None)
    if getattr(args, "dry_run", False):
        for i, st in enumerate(pipe.stages, 1):
            try:
                state = pipe.current_state(st)
            except UserError as e:
                state = f"conflict: {e}"
            verb = {SKIPPED: "would skip", RESUMED: "would resume", RUNNING: "would run"}.get(state, state)
            pipe._line(i, st, verb)
        return 0
    jobs = int(getattr(args, "jobs", 1) or 1)
    # The pipeline prints one line per stage and the runs print their own progress lines; the
    # per-checkpoint "Writing model shards" / "Loading weights" bars of transformers only bury them.
    # (The environment variable carries that to runs launched as subprocesses.)
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    hf_logging.disable_progress_bar()
    pipe.launcher = make_launcher(recipe, launcher_name, launch_config, jobs=jobs)
    return pipe.run(only=getattr(args, "stage", None), jobs=jobs)


def main(argv: list[str] | None = None) -> int:
    """``python -m llm_refine.pipeline ...`` = ``llm-refine pipeline ...`` (same errors, same exit codes)."""
    from ..cli import main as cli_main

    return cli_main(["pipeline", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
