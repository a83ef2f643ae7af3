"""The plan: a recipe -> the stages of one pipeline run, and each run's configuration.

Everything that turns a recipe into what a run is configured with lives here, one function per
stage kind (marked ``# --- configuration: <kind>``):

- `train_stage_config` — the resolved `PretrainConfig` of one training run (`Recipe.run_config`)
  and its spec (what the config hash covers);
- `refine_stage_config` — the refine stage's spec;
- `train_args` — **the one function** that says what a training entry point is launched with:
  ``<run_dir>/run_config.json``, the resolved config the pipeline writes before the launch.
  `launchers.py` and `slurm.py` only format its answer for their command lines.

`plan` lists the stages in dependency order. Stage *classes* (state, execute, detail) are in
`stages.py`, which sits above this module: they register themselves here by their ``kind``
(`Stage.__init_subclass__`), and `plan` creates them by that name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..train.config import PretrainConfig
from ..train.rundir import REFINED_FILE, RUN_CONFIG
from .recipe import BASELINE, REFINED, Recipe


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
# --- configuration: train


def train_stage_config(
    recipe: Recipe, size: str, seed: int, lr_multiplier: float, label: str, run_dir: Path,
    refined_file: Path | None, refine_spec: dict | None,
) -> tuple[PretrainConfig, dict]:
    """(config, spec) of one training run: its resolved, validated `PretrainConfig`, and the spec
    whose hash decides skip / resume / refuse on a rerun (the config without its output dir, plus
    the refine stage's spec for refined runs)."""
    config = recipe.run_config(size, seed, lr_multiplier, label, run_dir, refined_file)
    spec: dict = {"config": {k: v for k, v in config.to_dict().items() if k != "output_dir"}}
    if refine_spec is not None:
        spec["refine"] = refine_spec
    return config, spec


@dataclass(frozen=True)
class TrainArgs:
    """What a training entry point is launched with: the run's config file (the resolved config,
    written by the pipeline before the launch) and its output dir."""

    config: Path
    output_dir: Path


def train_args(stage) -> TrainArgs:
    """THE launch arguments of a training stage, for every launcher and the SLURM scripts:
    ``<run_dir>/run_config.json``, a file the run can also be re-run from by hand."""
    return TrainArgs(config=Path(stage.run_dir) / RUN_CONFIG, output_dir=Path(stage.run_dir))


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
                    config, spec = train_stage_config(recipe, size, seed, lrm, sched.label, rd,
                                                  refined_file if is_refined else None,
                                                  refine.spec if is_refined else None)
                    st = _make("train", id=f"{size}/{rd.name}", deps=[refine.id] if is_refined else [], size=size,
                               run_dir=rd, spec=spec, schedule=sched.label, schedule_name=sched.name, seed=seed,
                               lr_multiplier=lrm, config=config)
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
    "Stage", "TrainArgs", "train_args", "train_stage_config", "refine_stage_config", "run_dir_name", "plan",
]
