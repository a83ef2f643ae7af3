"""The plan: a recipe -> the stages of one pipeline run, and each run's configuration.

Everything that turns a recipe into what a run is configured with lives here, one function per
stage kind (marked ``# --- configuration: <kind>``):

- `train_stage_config` — the dotted ``key=value`` overrides of one training run and its spec (what
  the config hash covers), built from `base_overrides`;
- `refine_stage_config` — the refine stage's spec;
- `train_args` — **the one function** that says what a training entry point is launched with
  (config file, output dir, overrides). `launchers.py` and `slurm.py` only format its answer for
  their command lines, so changing the configuration mechanism (a resolved config written to
  ``<run_dir>/run_config.json`` instead of ``--set`` strings) changes this module only.

`plan` lists the stages in dependency order. Stage *classes* (state, execute, detail) are in
`stages.py`, which sits above this module: they register themselves here by their ``kind``
(`Stage.__init_subclass__`), and `plan` creates them by that name.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..train.rundir import REFINED_FILE
from .recipe import BASELINE, REFINED, Recipe

# Dotted keys of `llm_refine.train.config.PretrainConfig` that the pipeline sets for each run.
KEY_SIZE = "model.size"
KEY_SEED = "train.seed"
KEY_LR = "train.learning_rate"
KEY_OUTPUT = "output_dir"

BASE_CONFIG = "pretrain_base.yaml"  # in <out>: the recipe's pretrain section, the base of every run


# ---------------------------------------------------------------------------------------------
# The stage record


@dataclass(kw_only=True)
class Stage:
    """What every stage has. Subclasses (one per kind, in `stages.py`) add their fields and their
    behaviour; each registers itself under its ``kind`` in `Stage.kinds`."""

    id: str
    deps: list[str] = field(default_factory=list)
    size: str | None = None
    run_dir: Path | None = None  # train: the run dir; refine / evaluate: the size dir
    spec: dict = field(default_factory=dict)  # everything that defines the stage's result

    kind: ClassVar[str] = ""
    kinds: ClassVar[dict[str, type[Stage]]] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.__dict__.get("kind"):
            Stage.kinds[cls.kind] = cls

    @property
    def spec_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _make(kind: str, **fields) -> Stage:
    try:
        cls = Stage.kinds[kind]
    except KeyError:
        raise AssertionError(f"no stage class registered for kind {kind!r} (import llm_refine.pipeline.stages)") from None
    return cls(**fields)


# ---------------------------------------------------------------------------------------------
# --- configuration: train (the dotted key=value overrides; the lead replaces this block)


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, float):
        return repr(v)
    return str(v)


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
    import copy

    from ..train.config import load_pretrain_config

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


def train_stage_config(
    recipe: Recipe, size: str, seed: int, lr_multiplier: float, label: str, run_dir: Path,
    refined_file: Path | None, refine_spec: dict | None,
) -> tuple[list[str], dict]:
    """(overrides, spec) of one training run. The spec is the base pretrain config and the
    overrides without the output dir (plus, for refined runs, the refine stage's spec): its hash
    decides skip / resume / refuse on a rerun, so it must not change for an unchanged recipe."""
    ov = base_overrides(recipe, size, seed, lr_multiplier, label, run_dir, refined_file)
    spec: dict = {"pretrain": recipe.pretrain, "overrides": [o for o in ov if not o.startswith(f"{KEY_OUTPUT}=")]}
    if refine_spec is not None:
        spec["refine"] = refine_spec
    return ov, spec


@dataclass(frozen=True)
class TrainArgs:
    """What a training entry point is launched with: a config file, the run's output dir, and
    dotted overrides on top of the file (``output_dir`` not among them)."""

    config: Path
    output_dir: Path
    overrides: tuple[str, ...] = ()

    def all_overrides(self) -> list[str]:
        """The overrides with ``output_dir=...`` last, for entry points that take no --output_dir."""
        return [*self.overrides, f"{KEY_OUTPUT}={self.output_dir}"]


def train_args(stage, base_config_path: Path) -> TrainArgs:
    """THE launch arguments of a training stage, for every launcher and the SLURM scripts.

    Today: the shared base config (``<out>/pretrain_base.yaml``) plus the stage's ``key=value``
    overrides. With resolved configs this returns ``<run_dir>/run_config.json`` and no overrides.
    """
    sets = tuple(o for o in stage.overrides if not o.startswith(f"{KEY_OUTPUT}="))
    return TrainArgs(config=Path(base_config_path), output_dir=Path(stage.run_dir), overrides=sets)


# ---------------------------------------------------------------------------------------------
# --- configuration: refine


def refine_stage_config(recipe: Recipe, baseline_id: str) -> dict:
    """The refine stage's spec: which baseline, which norm and tau."""
    return {"baseline": baseline_id, "norm": recipe.refine.norm, "tau": recipe.refine.tau}


# (evaluate and report have no configuration of their own: they read what the runs wrote.)


# ---------------------------------------------------------------------------------------------
# The plan


def run_dir_name(recipe: Recipe, label: str, lr_multiplier: float, seed: int) -> str:
    """``<label>[-lr<m>][-seed<n>]``: an axis appears in the name only when the recipe sweeps it."""
    name = label
    if len(recipe.lr_multipliers) > 1:
        name += f"-lr{lr_multiplier:g}"
    if len(recipe.seeds) > 1:
        name += f"-seed{seed}"
    return name


def plan(recipe: Recipe, out: Path) -> list[Stage]:
    """Every stage of the recipe, in an order that respects dependencies."""
    out = Path(out).resolve()
    stages: list[Stage] = []
    ordered = [recipe.schedule(BASELINE)] + [s for s in recipe.schedules if s.label != BASELINE]
    for size in recipe.sizes:
        size_dir = out / size
        refined_file = size_dir / REFINED_FILE
        baseline_dir = size_dir / run_dir_name(recipe, BASELINE, recipe.refine_lr_multiplier, recipe.refine_seed)
        baseline_id = f"{size}/{baseline_dir.name}"
        refine: Stage | None = None
        train_ids: list[str] = []
        for sched in ordered:
            is_refined = sched.name == REFINED
            if is_refined and refine is None:
                refine = _make("refine", id=f"{size}/refine", deps=[baseline_id], size=size, run_dir=size_dir,
                               spec=refine_stage_config(recipe, baseline_id), baseline_dir=baseline_dir)
                stages.append(refine)
            for lrm in recipe.lr_multipliers:
                for seed in recipe.seeds:
                    rd = size_dir / run_dir_name(recipe, sched.label, lrm, seed)
                    ov, spec = train_stage_config(recipe, size, seed, lrm, sched.label, rd,
                                                  refined_file if is_refined else None,
                                                  refine.spec if is_refined else None)
                    st = _make("train", id=f"{size}/{rd.name}", deps=[refine.id] if is_refined else [], size=size,
                               run_dir=rd, spec=spec, schedule=sched.label, schedule_name=sched.name, seed=seed,
                               lr_multiplier=lrm, overrides=ov)
                    stages.append(st)
                    train_ids.append(st.id)
        if recipe.evaluate:
            run_dirs = [s.run_dir for s in stages if s.id in train_ids]
            stages.append(_make("evaluate", id=f"{size}/evaluate", deps=list(train_ids), size=size, run_dir=size_dir,
                                run_dirs=run_dirs))
    final = "evaluate" if recipe.evaluate else "train"
    stages.append(_make("report", id="report", deps=[s.id for s in stages if s.kind == final]))
    return stages


__all__ = [
    "KEY_SIZE", "KEY_SEED", "KEY_LR", "KEY_OUTPUT", "BASE_CONFIG", "Stage", "TrainArgs", "train_args",
    "train_stage_config", "refine_stage_config", "base_overrides", "base_learning_rate", "run_dir_name", "plan",
]
