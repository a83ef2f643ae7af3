"""Pipeline recipes: the YAML file `llm-refine pipeline` runs, read into typed configs.

A recipe says which model sizes to train, which schedules to compare, with which seeds and peak-LR
grid, and gives the base pretraining config every run shares::

    name: tiny
    sizes: [cpu-0.5m, cpu-2m, cpu-8m]
    schedules: [linear, refined, cosine]     # linear = the baseline; refined = its rerun
    seeds: [0]
    lr_multipliers: [1.0]                    # peak-LR sweep: × pretrain train.learning_rate
                                             #   (or per size: {cpu-0.5m: [1, 2, 4], cpu-2m: [2]})
    refine: {norm: l1, tau: 0.1}
    schedule: {warmup_steps: 10}             # options shared by the schedules that have them
    pretrain: {...}                          # the base pretraining config (llm_refine.train.config)
    size_overrides: {cpu-8m: {train: {learning_rate: 1e-3}}}   # or ["train.learning_rate=1e-3"]
    launch: {launcher: inprocess, config: launch/ddp.yaml}
    slurm: {nodes: 1, gpus_per_node: 8, time: "24:00:00"}

Validation happens before anything runs: `load_recipe` resolves the `PretrainConfig` of every run
the recipe implies (every size × schedule × LR × seed, refined and control schedules included), so a
typo or a bad value fails in a second with the file, the key path, the value and what is allowed —
not an hour into a sweep.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..configs import Config, ConfigError, check_value, merge, option, parse_overrides
from ..errors import UserError
from ..labels import BASELINE, REFINED
from ..schedules import SCHEDULES, RefinedSchedule, ScheduleConfig

LAUNCHERS = ("inprocess", "accelerate")
# Refinement variants: each is a schedule column of its own (runs `<label>[-lr<m>][-seed<n>]`).
REFINED_AGG = "refined-agg"  # refined from the per-step median/mean of the norms over the seeds
REFINED_XFER = "refined-xfer"  # another size's refined schedule, resampled to this size's steps


def round_label(k: int) -> str:
    """Round k of iterated refinement (round 1 is `refined` itself)."""
    return REFINED if k == 1 else f"refined-r{k}"


# Keys of the pretraining config that the pipeline sets for each run (from sizes, seeds, schedules).
PIPELINE_KEYS = ("model.size", "train.seed", "schedule", "output_dir")


@dataclass(kw_only=True)
class RefineSettings(Config):
    norm: Literal["l1", "l2"] = option("l1", doc="l1: weights 1/n (AdamW-type); l2: 1/n^2 (SGD)")
    tau: float = option(0.1, doc="median-filter width as a fraction of the run (0: none)", ge=0.0)
    seed: int | None = option(None, doc="seed of the baseline run refined; null: the first seed", ge=0)
    lr_multiplier: float | None = option(None, doc="LR multiplier of that baseline; null: 1 if in the grid, else the middle", gt=0.0)
    warmup: bool = option(False, doc="apply the shared warm-up on top of the refined schedule (default: use it as computed)")
    # YAML key `from` (a Python keyword): which linear baseline the refined schedule is refined from.
    from_: Literal["best", "each"] | float | None = option(
        None, doc="baseline refined: best (lowest mean final loss over seeds; the default), an LR multiplier, or each (one schedule per LR)")
    aggregate: Literal["none", "median", "mean"] = option(
        "none", doc="also refine the per-step median/mean of the norms over the baseline's seeds (column refined-agg)")
    rounds: int = option(1, doc="refinement rounds: N > 1 adds refined-r2..refined-rN, each refined from the previous round's run", ge=1)
    transfer_from: str | None = option(
        None, doc="also apply this size's refined schedule, resampled, to the other sizes (column refined-xfer)")

    KEY_ALIASES = {"from": "from_"}  # YAML key -> field

    @classmethod
    def from_dict(cls, data: Any, *, where: str | None = None):
        if isinstance(data, Mapping) and not isinstance(data, cls):
            if "from_" in data:
                raise ConfigError(("from_",), "unknown key in RefineSettings; write 'from'")
            data = {cls.KEY_ALIASES.get(k, k): v for k, v in data.items()}
        try:
            return super().from_dict(data)
        except ConfigError as e:
            key = tuple("from" if k == "from_" else k for k in e.key)
            detail = e.detail.replace("from_,", "from,")
            err = ConfigError(key, detail)
            if where is None:
                raise err from None
            raise UserError(f"{where}: {err}") from None

    def to_dict(self) -> dict:
        return {("from" if k == "from_" else k): v for k, v in super().to_dict().items()}

    @property
    def variants(self) -> bool:
        """Whether any refinement variant (aggregation, rounds, transfer) is enabled."""
        return self.aggregate != "none" or self.rounds > 1 or self.transfer_from is not None


@dataclass(kw_only=True)
class SharedScheduleOptions(Config):
    warmup_steps: int = option(0, doc="warm-up of every schedule, in steps (refined: only with refine.warmup)", ge=0)
    warmup_ratio: float = option(0.0, doc="warm-up as a fraction of the run", ge=0.0, lt=1.0)
    min_ratio: float = option(0.0, doc="decay floor of the schedules that have one (linear, cosine, polynomial, wsd)", ge=0.0, le=1.0)


@dataclass(kw_only=True)
class LaunchSettings(Config):
    launcher: Literal["inprocess", "accelerate"] = option("inprocess", doc="train in this process, or `accelerate launch` each run")
    config: str | None = option(None, doc="accelerate config for --config_file, e.g. launch/ddp.yaml")
    script: str | None = option(None, doc="training script to launch instead of the packaged `-m llm_refine.train`")
    extra_args: list[str] = option(default_factory=list, doc="extra `accelerate launch` arguments, as a YAML list")


@dataclass(kw_only=True)
class SlurmSettings(Config):
    nodes: int = option(1, doc="nodes per training job", ge=1)
    gpus_per_node: int = option(0, doc="GPUs per node (0: none requested)", ge=0)
    cpus_per_task: int | None = option(None, doc="#SBATCH --cpus-per-task", ge=1)
    time: str | None = option(None, doc="#SBATCH --time, e.g. '24:00:00'")
    partition: str | None = option(None, doc="#SBATCH --partition")
    account: str | None = option(None, doc="#SBATCH --account")
    port: int = option(29500, doc="rendezvous port of multi-node runs", ge=1, le=65535)
    setup: list[str] = option(default_factory=list, doc="shell lines run first (module load, venv)")
    extra: list[str] = option(default_factory=list, doc='extra "#SBATCH" options, e.g. "--qos=high"')


@dataclass
class RunSchedule:
    """One schedule a recipe compares. ``label`` names its run directories and its table column."""

    label: str
    name: str
    options: dict = field(default_factory=dict)  # the schedule's own options (beyond the shared ones)


@dataclass
class Recipe:
    name: str
    sizes: list[str]
    schedules: list[RunSchedule]
    seeds: list[int]
    lr_multipliers: list[float]  # the grid of every size (per-size grids: their sorted union)
    refine: RefineSettings
    shared_schedule: SharedScheduleOptions
    pretrain: dict
    size_override_map: dict[str, dict]  # size -> nested mapping merged over ``pretrain``
    launch: LaunchSettings
    slurm: SlurmSettings
    evaluate: bool = True
    description: str = ""
    path: str | None = None  # the file it came from (None for a dict)
    size_lr_multipliers: dict[str, list[float]] = field(default_factory=dict)  # per-size grids, when given

    def lr_grid(self, size: str | None = None) -> list[float]:
        """The peak-LR multipliers ``size`` is trained at (the recipe's grid unless it is per size)."""
        if size is not None and size in self.size_lr_multipliers:
            return self.size_lr_multipliers[size]
        return self.lr_multipliers

    def refine_mode_at(self, size: str | None = None) -> str:
        """How the refine stage picks its baseline's LR at ``size``: "fixed" (known when planning),
        "best" (lowest mean final loss over seeds, chosen once the baselines ran) or "each" (one
        refined schedule per LR). A one-LR grid is always "fixed"."""
        grid = self.lr_grid(size)
        if len(grid) == 1 or self.refine.lr_multiplier is not None or isinstance(self.refine.from_, float):
            return "fixed"
        return "each" if self.refine.from_ == "each" else "best"

    def refine_from_fixed_at(self, size: str | None = None) -> float | None:
        """The refined baseline's LR multiplier at ``size`` when the recipe fixes it (refine.from
        or refine.lr_multiplier, or a one-LR grid); None when the refine stage chooses it."""
        grid = self.lr_grid(size)
        if self.refine.lr_multiplier is not None:
            return next(m for m in grid if math.isclose(m, self.refine.lr_multiplier))
        if isinstance(self.refine.from_, float):
            return next(m for m in grid if math.isclose(m, self.refine.from_))
        if len(grid) == 1:
            return grid[0]
        return None

    @property
    def refine_seed(self) -> int:
        return self.seeds[0] if self.refine.seed is None else self.refine.seed

    @property
    def refine_lr_multiplier(self) -> float:
        """The LR multiplier of the refined baseline when it is fixed by the recipe (refine.from or
        refine.lr_multiplier, or a one-LR grid); else (refine.from: best/each over a grid) the
        multiplier 1 if in the grid, or the middle one (the run the report plots norms of)."""
        fixed = self.refine_from_fixed_at(None)
        if fixed is not None:
            return fixed
        if any(math.isclose(m, 1.0) for m in self.lr_multipliers):
            return 1.0
        return sorted(self.lr_multipliers)[len(self.lr_multipliers) // 2]

    @property
    def variant_labels(self) -> list[str]:
        """The refinement variants' schedule labels the refine settings enable, in column order."""
        if not any(s.name == REFINED for s in self.schedules):
            return []
        out = [REFINED_AGG] if self.refine.aggregate != "none" else []
        out += [round_label(k) for k in range(2, self.refine.rounds + 1)]
        if self.refine.transfer_from is not None:
            out.append(REFINED_XFER)
        return out

    @property
    def run_schedules(self) -> list[RunSchedule]:
        """`schedules` with the enabled refinement variants right after `refined`: every column
        that gets runs (`plan` and `check_runs` iterate this)."""
        variants = [RunSchedule(label=v, name=REFINED) for v in self.variant_labels]
        out: list[RunSchedule] = []
        for s in self.schedules:
            out.append(s)
            if s.name == REFINED and s.label == REFINED:
                out += variants
                variants = []
        return out + variants

    def schedule(self, label: str) -> RunSchedule:
        for s in self.run_schedules:
            if s.label == label:
                return s
        raise KeyError(label)

    def schedule_config(self, label: str, refined_file: str | None = None) -> dict:
        """The ``schedule`` section of a run's config for the schedule ``label``: the shared options
        the schedule has, then its own. The refined schedule takes the shared warm-up only with
        ``refine.warmup`` (its warm-up comes from the norms, as in the paper)."""
        s = self.schedule(label)
        accepts = ScheduleConfig.registry[s.name].field_names()
        shared = {k: v for k, v in self.shared_schedule.to_dict().items() if k in accepts}
        shared = {k: v for k, v in shared.items() if v != getattr(SharedScheduleOptions(), k)}  # set ones only
        if s.name == REFINED and not self.refine.warmup:
            shared = {k: v for k, v in shared.items() if not k.startswith("warmup")}
        cfg = {**shared, **s.options, "name": s.name}
        if s.name == REFINED:
            cfg["file"] = refined_file
        return cfg

    def base_config(self, size: str) -> dict:
        """The pretraining mapping every run of ``size`` starts from (before seed, LR and schedule)."""
        raw = merge(self.pretrain, self.size_override_map.get(size, {}))
        return merge(raw, {"model": {"size": size}})

    def base_learning_rate(self, size: str) -> float:
        """The size's peak LR before the sweep multiplier: its override, the recipe's, or the default."""
        from ..train.config import TrainConfig

        lr = (self.base_config(size).get("train") or {}).get("learning_rate", TrainConfig().learning_rate)
        return check_value(lr, float, ("train", "learning_rate"))

    def run_config(self, size: str, seed: int, lr_multiplier: float, label: str, run_dir: str | os.PathLike,
                   refined_file: str | os.PathLike | None = None):
        """The validated `PretrainConfig` of one run of the recipe."""
        from ..train.config import load_pretrain_config

        train: dict[str, Any] = {"seed": seed}
        if not math.isclose(lr_multiplier, 1.0):
            train["learning_rate"] = self.base_learning_rate(size) * lr_multiplier
        sched = self.schedule_config(label, refined_file=str(refined_file) if refined_file else None)
        raw = merge(self.base_config(size), {"train": train})
        raw["schedule"] = sched
        raw["output_dir"] = str(run_dir)
        return load_pretrain_config(raw)


# ---------------------------------------------------------------------------------------------
# Reading a recipe

TOP_KEYS = {
    "name": "a short name for the experiment (used in the report title)",
    "description": "free text shown in the report",
    "sizes": "model sizes to train (see `llm-refine sizes`)",
    "schedules": "schedules to compare: linear (baseline), refined, and controls such as cosine or wsd",
    "seeds": "training seeds; every schedule runs with each",
    "lr_multipliers": "peak-LR grid as multipliers of pretrain.train.learning_rate",
    "refine": "refinement settings (RefineSettings)",
    "schedule": "options shared by the schedules that have them (SharedScheduleOptions)",
    "pretrain": "the base pretraining config every run shares (llm_refine.train.config)",
    "size_overrides": "per size, a mapping (or key=value list) merged over pretrain",
    "launch": "how to run each training (LaunchSettings)",
    "slurm": "settings of emitted SLURM scripts (SlurmSettings)",
    "evaluate": "evaluate each final checkpoint on the validation set (true|false)",
}


def _err(key: tuple[str, ...] | str, detail: str) -> ConfigError:
    return ConfigError((key,) if isinstance(key, str) else key, detail)


def _unique(values: list, key: str) -> None:
    seen = [round(v, 12) if isinstance(v, float) else v for v in values]
    if len(set(seen)) != len(seen):
        raise _err(key, f"{values!r} lists a value twice")


def _parse_schedules(raw: Any) -> list[RunSchedule]:
    items = check_value(raw, list[Any], ("schedules",))
    out: list[RunSchedule] = []
    for i, item in enumerate(items):
        key = ("schedules", f"[{i}]")
        if isinstance(item, str):
            name, label, options = item, item, {}
        elif isinstance(item, Mapping):
            options = dict(item)
            if "name" not in options:
                raise _err(key, "has no 'name'; write e.g. {name: wsd, decay_fraction: 0.2}")
            name = options.pop("name")
            label = options.pop("label", name)
        else:
            raise _err(key, f"{item!r} is not a schedule name or a mapping with 'name'")
        if name not in SCHEDULES:
            raise _err(key, f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
        if not isinstance(label, str) or not label or any(c in label for c in "/\\ ") or label.startswith("."):
            raise _err(key + ("label",), f"{label!r} must be a plain name (no slashes or spaces)")
        if name == REFINED and options:
            raise _err(key, f"'refined' takes its options from the 'refine' section, not {sorted(options)}")
        if "file" in options:
            raise _err(key + ("file",), "is set by the pipeline (the refined schedule it computes); remove it")
        if name != REFINED:
            try:
                ScheduleConfig.from_dict({"name": name, **options})
            except ConfigError as e:
                raise e.under(*key) from None
        if any(s.label == label for s in out):
            raise _err(key, f"schedule {label!r} is listed twice; give one of them a distinct 'label'")
        out.append(RunSchedule(label=label, name=name, options=options))
    if not out:
        raise _err("schedules", "is empty; list at least [linear, refined, cosine]")
    if not any(s.label == BASELINE and s.name == BASELINE for s in out):
        raise _err("schedules", "must include 'linear', the baseline whose gradient norms are refined")
    return out


def _parse_size_overrides(raw: Any, sizes: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for size, ov in check_value(raw or {}, dict[str, Any], ("size_overrides",)).items():
        key = ("size_overrides", size)
        if size not in sizes:
            raise _err(key, f"names size {size!r}, which is not in 'sizes' {sizes}")
        if isinstance(ov, (list, tuple)):
            for it in ov:
                if not isinstance(it, str) or "=" not in it:
                    raise _err(key, f"{it!r} is not a dotted key=value override")
            ov = parse_overrides(list(ov))
        elif isinstance(ov, Mapping):
            ov = parse_overrides([f"{k}={_yaml_scalar(v)}" for k, v in ov.items()]) if any("." in k for k in ov) else dict(ov)
        else:
            raise _err(key, f"{ov!r} is not a mapping or a list of key=value overrides")
        _refuse_pipeline_keys(ov, key)
        out[size] = ov
    return out


def _yaml_scalar(v: Any) -> str:
    import yaml

    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def _refuse_pipeline_keys(pretrain: Mapping, key: tuple[str, ...]) -> None:
    for dotted in PIPELINE_KEYS:
        node: Any = pretrain
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None:
            instead = {"model.size": "'sizes'", "train.seed": "'seeds'", "schedule": "'schedules'"}.get(dotted, "the pipeline")
            raise _err(key + tuple(dotted.split(".")), f"is set by the pipeline from {instead}; remove it")


def _check_data(pretrain: dict, base_dir: Path) -> None:
    """Fail early when the recipe points at local data files that are not there."""
    data = pretrain.get("data") if isinstance(pretrain, dict) else None
    if not isinstance(data, dict):
        return
    keys = ["path", "val_path"]
    tok = data.get("tokenizer")
    if isinstance(tok, str) and (tok.endswith(".model") or os.sep in tok):
        keys.append("tokenizer")  # a tokenizer file or directory (not the keyword "sentencepiece")
    for key in keys:
        p = data.get(key)
        if not isinstance(p, str) or "://" in p or any(ch in p for ch in "*?["):
            continue  # unset, remote, or a glob (the data loader reports an empty glob itself)
        pp = Path(os.path.expanduser(p))
        if not pp.is_absolute() and not pp.exists():
            pp = base_dir / pp
        if not pp.exists():
            raise _err(("pretrain", "data", key), f"{p!r} does not exist; fix the path or use the embedded corpus (source: embedded)")


def _parse_lists(raw: dict) -> tuple[list[str], list[int], list[float], dict[str, list[float]]]:
    """sizes, seeds, the LR grid (per-size grids: their sorted union) and the per-size grids."""
    from ..train.models import MODEL_SIZES

    sizes = check_value(raw.get("sizes") or [], list[str], ("sizes",))
    if not sizes:
        raise _err("sizes", "is missing; list model sizes, e.g. [cpu-0.5m, cpu-2m] (see `llm-refine sizes`)")
    for i, s in enumerate(sizes):
        if s not in MODEL_SIZES:
            raise _err(("sizes", f"[{i}]"), f"unknown model size {s!r}; choose one of {', '.join(MODEL_SIZES)} (`llm-refine sizes`)")
    seeds = check_value(raw.get("seeds", [0]), list[int], ("seeds",), {"ge": 0})
    for key, values in (("sizes", sizes), ("seeds", seeds)):
        if not values:
            raise _err(key, "is empty")
        _unique(values, key)
    raw_lrm = raw.get("lr_multipliers", [1.0])
    per_size: dict[str, list[float]] = {}
    if isinstance(raw_lrm, Mapping):  # a grid per size: {cpu-0.5m: [1, 2, 4], cpu-2m: [2]}
        for size in raw_lrm:
            if size not in sizes:
                raise _err(("lr_multipliers", str(size)), f"names size {size!r}, which is not in 'sizes' {sizes}")
        for size in sizes:
            if size not in raw_lrm:
                raise _err("lr_multipliers", f"has no grid for size {size!r}; give every size a list, or use one list for all")
            grid = check_value(raw_lrm[size], list[float], ("lr_multipliers", size), {"gt": 0.0})
            if not grid:
                raise _err(("lr_multipliers", size), "is empty")
            _unique(grid, f"lr_multipliers.{size}")
            per_size[size] = grid
        lrm = sorted({m for grid in per_size.values() for m in grid})
        if all(grid == per_size[sizes[0]] for grid in per_size.values()):
            lrm, per_size = per_size[sizes[0]], {}  # the same grid everywhere: a plain list
    else:
        lrm = check_value(raw_lrm, list[float], ("lr_multipliers",), {"gt": 0.0})
        if not lrm:
            raise _err("lr_multipliers", "is empty")
        _unique(lrm, "lr_multipliers")
    return sizes, seeds, lrm, per_size


def _check_refine_combinations(refine: RefineSettings, raw: dict, sizes: list[str], seeds: list[int], lrm: list[float],
                               per_size: dict[str, list[float]]) -> None:
    """The refine settings that cannot go together, refused up front (one line naming the key)."""
    src = refine.from_
    if src is not None and refine.lr_multiplier is not None:
        raise _err(("refine", "lr_multiplier"), "and refine.from both pick the baseline's LR; keep only refine.from")
    grids = per_size or {None: lrm}
    for key, m in ((("refine", "from"), src if isinstance(src, float) else None), (("refine", "lr_multiplier"), refine.lr_multiplier)):
        for size, grid in grids.items():
            if m is not None and not any(math.isclose(m, g) for g in grid):
                where = f"lr_multipliers {grid}" if size is None else f"size {size}'s lr_multipliers {grid}"
                raise _err(key, f"{m:g} is not in {where}; use best, each or one of them" if key[1] == "from"
                           else f"{m} is not in {where}")
    lrm = max(grids.values(), key=len)  # the largest grid decides what sweeps allow
    labels = []
    for item in raw.get("schedules") or []:
        labels.append(item if isinstance(item, str) else (item.get("label", item.get("name")) if isinstance(item, Mapping) else None))
    if not refine.variants:
        return
    first = next(k for k in ("aggregate", "rounds", "transfer_from")
                 if getattr(refine, k) != getattr(RefineSettings(), k))
    names = [it if isinstance(it, str) else (it.get("name") if isinstance(it, Mapping) else None)
             for it in (raw.get("schedules") or [BASELINE, REFINED, "cosine"])]
    if REFINED not in names:
        raise _err(("refine", first), "adds a variant of the refined schedule; list 'refined' in schedules too")
    if src == "each" and len(lrm) > 1:
        raise _err(("refine", first), "cannot be combined with refine.from: each (one schedule per LR); use best or a multiplier")
    if refine.aggregate != "none" and len(seeds) < 2:
        raise _err(("refine", "aggregate"), f"{refine.aggregate!r} aggregates over the baseline's seeds; list at least 2 seeds")
    if refine.transfer_from is not None:
        if refine.transfer_from not in sizes:
            raise _err(("refine", "transfer_from"), f"{refine.transfer_from!r} is not one of the recipe's sizes {sizes}")
        if len(sizes) < 2:
            raise _err(("refine", "transfer_from"), "needs at least 2 sizes (the schedule is applied to the others)")
    for label in (REFINED_AGG, REFINED_XFER, *(round_label(k) for k in range(2, refine.rounds + 1))):
        if label in labels:
            raise _err("schedules", f"label {label!r} is the refine settings' variant column; give that schedule another label")


def _parse(raw: Any, path: str | None) -> Recipe:
    if not isinstance(raw, dict):
        raise _err((), f"a recipe is a YAML mapping (key: value); got {type(raw).__name__}")
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise _err(str(unknown[0]), f"unknown key in the recipe; allowed: {', '.join(TOP_KEYS)}")
    sizes, seeds, lrm, per_size = _parse_lists(raw)
    refine = check_value(raw.get("refine") or {}, RefineSettings, ("refine",))
    if refine.seed is not None and refine.seed not in seeds:
        raise _err(("refine", "seed"), f"{refine.seed} is not one of the recipe's seeds {seeds}")
    _check_refine_combinations(refine, raw, sizes, seeds, lrm, per_size)
    pretrain = check_value(raw.get("pretrain") or {}, dict[str, Any], ("pretrain",))
    _refuse_pipeline_keys(pretrain, ("pretrain",))
    _check_data(pretrain, Path(path).resolve().parent if path else Path.cwd())
    return Recipe(
        name=check_value(raw.get("name") or (Path(path).stem if path else "recipe"), str, ("name",)),
        description=check_value(raw.get("description") or "", str, ("description",)),
        sizes=sizes,
        schedules=_parse_schedules(raw.get("schedules", [BASELINE, REFINED, "cosine"])),
        seeds=seeds,
        lr_multipliers=lrm,
        size_lr_multipliers=per_size,
        refine=refine,
        shared_schedule=check_value(raw.get("schedule") or {}, SharedScheduleOptions, ("schedule",)),
        pretrain=pretrain,
        size_override_map=_parse_size_overrides(raw.get("size_overrides"), sizes),
        launch=check_value(raw.get("launch") or {}, LaunchSettings, ("launch",)),
        slurm=check_value(raw.get("slurm") or {}, SlurmSettings, ("slurm",)),
        evaluate=check_value(raw.get("evaluate", True), bool, ("evaluate",)),
        path=path,
    )


def check_runs(recipe: Recipe) -> None:
    """Resolve the config of every run the recipe implies (refined and controls, every LR and
    seed), so a bad value anywhere fails now. Errors name the pretrain key and the run."""
    for size in recipe.sizes:
        for sched in recipe.run_schedules:
            for lrm in recipe.lr_grid(size):
                for seed in recipe.seeds:
                    try:
                        recipe.run_config(size, seed, lrm, sched.label, "unused", refined_file="refined_schedule.json")
                    except ConfigError as e:
                        run = f"size {size}, schedule {sched.label}, lr x{lrm:g}, seed {seed}"
                        raise ConfigError(("pretrain",) + e.key, f"{e.detail} (in the run: {run})") from None


def parse_recipe(raw: Any, *, path: str | None = None, check_pretrain: bool = True) -> Recipe:
    """Validate a recipe mapping. ``check_pretrain`` also resolves every run's pretraining config."""
    try:
        recipe = _parse(raw, path)
        if check_pretrain:
            check_runs(recipe)
    except ConfigError as e:
        raise UserError(f"{path or 'recipe'}: {e}") from None
    return recipe


def load_recipe(path: str | os.PathLike, *, check_pretrain: bool = True) -> Recipe:
    """Read and validate a recipe YAML file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such recipe file; pass a recipe YAML (`llm-refine examples list` names the shipped "
                        "ones, `llm-refine examples copy tiny` writes the embedded default here)")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{p}: not UTF-8 text; save the recipe as UTF-8") from None
    except yaml.YAMLError as e:
        raise UserError(f"{p}: not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    return parse_recipe(raw if raw is not None else {}, path=str(p), check_pretrain=check_pretrain)


__all__ = [
    "BASELINE", "REFINED", "REFINED_AGG", "REFINED_XFER", "round_label", "LAUNCHERS", "Recipe", "RunSchedule", "RefineSettings", "SharedScheduleOptions",
    "LaunchSettings", "SlurmSettings", "RefinedSchedule", "load_recipe", "parse_recipe", "check_runs",
]
