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
from .recipe import BASELINE, REFINED, REFINED_AGG, REFINED_XFER, Recipe, round_label


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


def run_dir_name(recipe: Recipe, label: str, lr_multiplier: float, seed: int, size: str | None = None) -> str:
    """``<label>[-lr<m>][-seed<n>]``: an axis appears in the name only when the recipe sweeps it
    (the LR axis: when ``size``'s grid has more than one multiplier)."""
    name = label
    if len(recipe.lr_grid(size)) > 1:
        name += f"-lr{lr_multiplier:g}"
    if len(recipe.seeds) > 1:
        name += f"-seed{seed}"
    return name


def refined_file_name(suffix: str | None = None) -> str:
    """``refined_schedule.json``, or ``refined_schedule-<suffix>.json`` for a variant / one LR."""
    return REFINED_FILE if not suffix else REFINED_FILE.replace(".json", f"-{suffix}.json")


def _variant_suffix(label: str) -> str:
    return label.removeprefix(REFINED + "-")  # refined-agg -> agg, refined-r2 -> r2, refined-xfer -> xfer


class _SizePlan:
    """The stages of one size, built in dependency order (`plan` calls it per size)."""

    def __init__(self, recipe: Recipe, out: Path, size: str, stages: list[Stage]):
        self.recipe, self.size, self.stages = recipe, size, stages
        self.size_dir = out / size
        self.train_ids: list[str] = []
        # label -> {(lrm, seed): stage}
        self.runs: dict[str, dict[tuple[float, int], Stage]] = {}

    def _id(self, label: str, lrm: float, seed: int) -> str:
        return f"{self.size}/{run_dir_name(self.recipe, label, lrm, seed, self.size)}"

    def _candidates(self, label: str, lrms: list[float], seeds: list[int]) -> dict[float, dict[int, Path]]:
        return {m: {sd: self.size_dir / run_dir_name(self.recipe, label, m, sd, self.size) for sd in seeds} for m in lrms}

    def _refine(self, id: str, deps: list[str], spec: dict, **fields) -> Stage:
        st = _make("refine", id=id, deps=deps, size=self.size, run_dir=self.size_dir, spec=spec, **fields)
        self.stages.append(st)
        return st

    def refine_stages(self, label: str, lrms: list[float]) -> dict[float, Stage]:
        """lr multiplier -> the refine stage whose schedule the ``label`` runs at that LR use."""
        r, rf = self.recipe, self.recipe.refine
        mode, fixed, seed = r.refine_mode_at(self.size), r.refine_from_fixed_at(self.size), r.refine_seed
        grid = r.lr_grid(self.size)
        base = {"norm": rf.norm, "tau": rf.tau}
        if label == REFINED:
            if mode == "fixed":  # the one-baseline refinement (recipes before refine.from: unchanged)
                bid = self._id(BASELINE, fixed, seed)
                st = self._refine(f"{self.size}/refine", [bid], refine_stage_config(r, bid),
                                  baseline_dir=self.size_dir / bid.split("/", 1)[1])
                return {m: st for m in lrms}
            if mode == "each":
                out = {}
                for m in lrms:
                    bid = self._id(BASELINE, m, seed)
                    out[m] = self._refine(f"{self.size}/refine-lr{m:g}", [bid], refine_stage_config(r, bid),
                                          baseline_dir=self.size_dir / bid.split("/", 1)[1],
                                          output_name=refined_file_name(f"lr{m:g}"))
                return out
            cands = self._candidates(BASELINE, grid, r.seeds)
            deps = [self._id(BASELINE, m, sd) for m in grid for sd in r.seeds]
            st = self._refine(f"{self.size}/refine", deps, {"baseline": "best", "seed": seed, **base},
                              candidates=cands, seed=seed)
            return {m: st for m in lrms}
        suffix = _variant_suffix(label)
        lrs = [fixed] if mode == "fixed" else list(grid)
        if label == REFINED_XFER:
            src = rf.transfer_from
            steps = r.run_config(self.size, seed, lrs[0], BASELINE, "unused").train.max_steps
            st = self._refine(f"{self.size}/refine-{suffix}", [f"{src}/refine"],
                              {"variant": label, "transfer_from": src, "steps": steps},
                              variant=label, output_name=refined_file_name(suffix),
                              transfer_file=self.size_dir.parent / src / REFINED_FILE, target_steps=steps)
            return {m: st for m in lrms}
        if label == REFINED_AGG:
            source, seeds, spec = BASELINE, list(r.seeds), {"aggregate": rf.aggregate}
        else:  # round k: refined from the norms of round k-1's run
            k = int(suffix.removeprefix("r"))
            source, seeds, spec = round_label(k - 1), list(r.seeds), {"round": k, "source": round_label(k - 1)}
        deps = [self._id(source, m, sd) for m in lrs for sd in seeds]
        st = self._refine(f"{self.size}/refine-{suffix}", deps,
                          {"variant": label, "baseline": "best" if len(lrs) > 1 else f"lr{lrs[0]:g}", "seed": seed,
                           **spec, **base},
                          candidates=self._candidates(source, lrs, seeds), seed=seed, variant=label,
                          aggregate=rf.aggregate if label == REFINED_AGG else "none",
                          output_name=refined_file_name(suffix))
        return {m: st for m in lrms}

    def train_runs(self, sched) -> None:
        r = self.recipe
        is_refined = sched.name == REFINED
        grid = r.lr_grid(self.size)
        refines = self.refine_stages(sched.label, grid) if is_refined else {}
        for lrm in grid:
            for seed in r.seeds:
                rd = self.size_dir / run_dir_name(r, sched.label, lrm, seed, self.size)
                ref = refines.get(lrm)
                config, spec = train_stage_config(r, self.size, seed, lrm, sched.label, rd,
                                                  ref.output if ref is not None else None,
                                                  ref.spec if ref is not None else None)
                st = _make("train", id=f"{self.size}/{rd.name}", deps=[ref.id] if ref is not None else [], size=self.size,
                           run_dir=rd, spec=spec, schedule=sched.label, schedule_name=sched.name, seed=seed,
                           lr_multiplier=lrm, config=config,
                           schedule_file=ref.output if ref is not None else None)
                self.stages.append(st)
                self.train_ids.append(st.id)


def plan(recipe: Recipe, out: Path) -> list[Stage]:
    """Every stage of the recipe, in an order that respects dependencies."""
    out = Path(out).resolve()
    stages: list[Stage] = []
    ordered = [recipe.schedule(BASELINE)] + [s for s in recipe.run_schedules if s.label != BASELINE]
    sizes = list(recipe.sizes)
    src = recipe.refine.transfer_from
    if src is not None and recipe.variant_labels:  # the transfer's source size first: the others wait on it
        sizes = [src] + [s for s in sizes if s != src]
    for size in sizes:
        sp = _SizePlan(recipe, out, size, stages)
        for sched in ordered:
            if sched.label == REFINED_XFER and size == src:
                continue  # the source size's own refined column is the schedule itself
            sp.train_runs(sched)
        if recipe.evaluate:
            run_dirs = [s.run_dir for s in stages if s.id in sp.train_ids]
            stages.append(_make("evaluate", id=f"{size}/evaluate", deps=list(sp.train_ids), size=size, run_dir=size_dir_of(out, size),
                                run_dirs=run_dirs))
    final = "evaluate" if recipe.evaluate else "train"
    stages.append(_make("report", id="report", deps=[s.id for s in stages if s.kind == final]))
    return stages


def size_dir_of(out: Path, size: str) -> Path:
    return out / size


__all__ = [
    "Stage", "TrainArgs", "train_args", "train_stage_config", "refine_stage_config", "run_dir_name", "refined_file_name", "plan",
]
