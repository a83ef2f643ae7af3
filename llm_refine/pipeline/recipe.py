"""Pipeline recipes: the YAML file `llm-refine pipeline` runs, parsed into a validated dataclass.

A recipe says which model sizes to train, which schedules to compare, with which seeds and peak-LR
grid, and gives the base pretraining config every run shares::

    name: tiny
    sizes: [cpu-0.5m, cpu-2m, cpu-8m]
    schedules: [linear, refined, cosine]     # linear = the baseline; refined = its rerun
    seeds: [0]
    lr_multipliers: [1.0]                    # peak-LR sweep: × pretrain train.learning_rate
    refine: {norm: l1, tau: 0.1}
    schedule: {warmup_steps: 10}             # options every schedule shares (warm-up, min_ratio)
    pretrain: {...}                          # the base llm_refine.train.pretrain config of every run
    size_overrides: {cpu-8m: ["train.learning_rate=1e-3"]}
    launch: {launcher: inprocess, config: launch/ddp.yaml}
    slurm: {nodes: 1, gpus_per_node: 8, time: "24:00:00"}

Validation happens before anything runs, so a typo fails in a second with a message naming the key
and the fix, not an hour into a sweep.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path


from ..errors import UserError
from ..schedules import SCHEDULES, ScheduleConfig

BASELINE = "linear"
REFINED = "refined"
LAUNCHERS = ("inprocess", "accelerate")
REFINE_NORMS = ("l1", "l2")

TOP_KEYS = {
    "name": "a short name for the experiment (used in the report title)",
    "description": "free text shown in the report",
    "sizes": "model sizes to train (see `llm-refine sizes`)",
    "schedules": "schedules to compare: linear (baseline), refined, and controls such as cosine or wsd",
    "seeds": "training seeds; every schedule runs with each",
    "lr_multipliers": "peak-LR grid as multipliers of pretrain.train.learning_rate",
    "refine": "refinement settings: norm (l1|l2), tau, seed, lr_multiplier, warmup",
    "schedule": "schedule options shared by all schedules (warmup_steps, warmup_ratio, min_ratio)",
    "pretrain": "the base pretraining config every run shares (llm_refine.train.pretrain)",
    "size_overrides": "per-size list of dotted key=value overrides of the pretrain config",
    "launch": "how to run each training: launcher (inprocess|accelerate), config (launch/X.yaml)",
    "slurm": "settings of emitted SLURM scripts (nodes, gpus_per_node, cpus_per_task, time, partition, account, setup, extra)",
    "evaluate": "evaluate each final checkpoint on the validation set (true|false)",
}
REFINE_KEYS = ("norm", "tau", "seed", "lr_multiplier", "warmup")
LAUNCH_KEYS = ("launcher", "config", "script", "extra_args")
SLURM_KEYS = ("nodes", "gpus_per_node", "cpus_per_task", "time", "partition", "account", "setup", "extra", "port")
SHARED_SCHEDULE_KEYS = ("warmup_steps", "warmup_ratio", "min_ratio")


@dataclass
class RunSchedule:
    """One schedule a recipe compares. ``label`` names its run directories and its table column."""

    label: str
    name: str
    options: dict = field(default_factory=dict)  # ScheduleConfig options beyond the shared ones


@dataclass
class RefineSettings:
    norm: str = "l1"
    tau: float = 0.1
    seed: int | None = None  # baseline run the schedule is refined from: None = the first seed
    lr_multiplier: float | None = None  # None = 1.0 if in the grid, else the grid's middle value
    # False: the refined schedule is used as computed (its warm-up, if any, comes from the norms,
    # as in the paper); True: the shared warm-up is applied on top of it.
    warmup: bool = False


@dataclass
class LaunchSettings:
    launcher: str = "inprocess"
    config: str | None = None  # launch/<engine>.yaml for `accelerate launch --config_file`
    script: str = "recipes/pretrain.py"
    extra_args: list[str] = field(default_factory=list)


@dataclass
class SlurmSettings:
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    port: int = 29500
    setup: list[str] = field(default_factory=list)  # shell lines run first (module load, venv)
    extra: list[str] = field(default_factory=list)  # extra "#SBATCH" options, e.g. "--qos=high"


@dataclass
class Recipe:
    name: str
    sizes: list[str]
    schedules: list[RunSchedule]
    seeds: list[int]
    lr_multipliers: list[float]
    refine: RefineSettings
    shared_schedule: dict
    pretrain: dict
    size_overrides: dict[str, list[str]]
    launch: LaunchSettings
    slurm: SlurmSettings
    evaluate: bool = True
    description: str = ""
    path: str | None = None  # the file it came from (None for a dict)

    @property
    def refine_seed(self) -> int:
        return self.seeds[0] if self.refine.seed is None else self.refine.seed

    @property
    def refine_lr_multiplier(self) -> float:
        if self.refine.lr_multiplier is not None:
            return self.refine.lr_multiplier
        if any(math.isclose(m, 1.0) for m in self.lr_multipliers):
            return 1.0
        return sorted(self.lr_multipliers)[len(self.lr_multipliers) // 2]

    def schedule(self, label: str) -> RunSchedule:
        for s in self.schedules:
            if s.label == label:
                return s
        raise KeyError(label)

    def schedule_config(self, label: str, refined_file: str | None = None) -> dict:
        """The ``schedule`` section of a run's pretrain config for the schedule ``label``."""
        s = self.schedule(label)
        cfg = {**self.shared_schedule, **s.options, "name": s.name}
        if s.name == REFINED:
            cfg["file"] = refined_file
            if not self.refine.warmup:
                cfg.pop("warmup_steps", None)
                cfg.pop("warmup_ratio", None)
        return cfg


# ---------------------------------------------------------------------------------------------


def _where(path: str | None) -> str:
    return str(path) if path else "recipe"


def _check_keys(d: dict, allowed, what: str, where: str) -> None:
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise UserError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))} in {what}; allowed: {', '.join(sorted(allowed))}"
        )


def _section(raw: dict, key: str, allowed, example: str, where: str, what: str | None = None) -> dict:
    """``raw[key]`` (missing: empty) checked to be a mapping with only ``allowed`` keys."""
    d = raw.get(key) or {}
    if not isinstance(d, dict):
        raise UserError(f"{where}: '{key}' must be a mapping like {example}")
    _check_keys(d, allowed, what or f"'{key}'", where)
    return d


def _as_list(value, what: str, where: str) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, (str, int, float, dict)):
        return [value]
    raise UserError(f"{where}: {what} must be a list, got {type(value).__name__}")


def _parse_schedules(raw, where: str) -> list[RunSchedule]:
    out: list[RunSchedule] = []
    for i, item in enumerate(_as_list(raw, "schedules", where)):
        if isinstance(item, str):
            name, label, options = item, item, {}
        elif isinstance(item, dict):
            item = dict(item)
            if "name" not in item:
                raise UserError(f"{where}: schedules[{i}] has no 'name'; write e.g. {{name: wsd, decay_fraction: 0.2}}")
            name = str(item.pop("name"))
            label = str(item.pop("label", name))
            options = item
        else:
            raise UserError(f"{where}: schedules[{i}] must be a name or a mapping with 'name', got {item!r}")
        if name not in SCHEDULES:
            raise UserError(f"{where}: unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")
        if name == REFINED and options:
            raise UserError(f"{where}: schedule 'refined' takes its options from the 'refine' section, not {sorted(options)}")
        if "file" in options:
            raise UserError(f"{where}: schedule {label!r}: 'file' is set by the pipeline (the refined schedule it computes); remove it")
        try:
            ScheduleConfig.from_dict({"name": name, **options} if name != REFINED else {"name": name, "multipliers": [1.0, 0.0]})
        except UserError as e:
            raise UserError(f"{where}: schedule {label!r}: {e}") from None
        except TypeError as e:
            raise UserError(f"{where}: schedule {label!r}: {e}") from None
        if not label or any(c in label for c in "/\\ ") or label.startswith("."):
            raise UserError(f"{where}: schedule label {label!r} must be a plain name (no slashes or spaces)")
        if any(s.label == label for s in out):
            raise UserError(f"{where}: schedule {label!r} is listed twice; give one of them a distinct 'label'")
        out.append(RunSchedule(label=label, name=name, options=options))
    if not out:
        raise UserError(f"{where}: 'schedules' is empty; list at least [linear, refined, cosine]")
    if not any(s.label == BASELINE and s.name == BASELINE for s in out):
        raise UserError(f"{where}: 'schedules' must include 'linear', the baseline whose gradient norms are refined")
    return out


def _check_data(pretrain: dict, where: str, base_dir: Path) -> None:
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
            raise UserError(
                f"{where}: pretrain.data.{key}: {p!r} does not exist; fix the path or use the embedded corpus (source: embedded)"
            )


def parse_recipe(raw: dict, *, path: str | None = None, check_pretrain: bool = True) -> Recipe:
    """Validate a recipe mapping. ``check_pretrain`` also resolves the pretrain section with
    `llm_refine.train.pretrain.load_pretrain_config` for each size, so its unknown keys fail here too."""
    where = _where(path)
    if not isinstance(raw, dict):
        raise UserError(f"{where}: a recipe is a YAML mapping (key: value); got {type(raw).__name__}")
    _check_keys(raw, TOP_KEYS, "the recipe", where)

    sizes = [str(s) for s in _as_list(raw.get("sizes"), "sizes", where)]
    if not sizes:
        raise UserError(f"{where}: 'sizes' is missing; list model sizes, e.g. [cpu-0.5m, cpu-2m] (see `llm-refine sizes`)")
    if len(set(sizes)) != len(sizes):
        raise UserError(f"{where}: 'sizes' lists a size twice: {sizes}")
    from ..train.models import MODEL_SIZES

    for s in sizes:
        if s not in MODEL_SIZES:
            raise UserError(f"{where}: unknown model size {s!r}; choose from {', '.join(MODEL_SIZES)} (`llm-refine sizes`)")

    schedules = _parse_schedules(raw.get("schedules", [BASELINE, REFINED, "cosine"]), where)

    seeds_raw = _as_list(raw.get("seeds", [0]), "seeds", where)
    if not seeds_raw or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds_raw):
        raise UserError(f"{where}: 'seeds' must be a list of non-negative integers, got {seeds_raw!r}")
    if len(set(seeds_raw)) != len(seeds_raw):
        raise UserError(f"{where}: 'seeds' lists a seed twice: {seeds_raw}")

    lrm = _as_list(raw.get("lr_multipliers", [1.0]), "lr_multipliers", where)
    if not lrm or not all(isinstance(m, (int, float)) and not isinstance(m, bool) and m > 0 for m in lrm):
        raise UserError(f"{where}: 'lr_multipliers' must be positive numbers, e.g. [0.5, 1, 2]; got {lrm!r}")
    lrm = [float(m) for m in lrm]
    if len({round(m, 12) for m in lrm}) != len(lrm):
        raise UserError(f"{where}: 'lr_multipliers' lists a value twice: {lrm}")

    ref_raw = _section(raw, "refine", REFINE_KEYS, "{norm: l1, tau: 0.1}", where)
    refine = RefineSettings(**ref_raw)
    if refine.norm not in REFINE_NORMS:
        raise UserError(f"{where}: refine.norm {refine.norm!r} is not one of {', '.join(REFINE_NORMS)} (l1 for AdamW, l2 for SGD)")
    if not isinstance(refine.tau, (int, float)) or refine.tau < 0:
        raise UserError(f"{where}: refine.tau must be a non-negative number, got {refine.tau!r}")
    if refine.seed is not None and refine.seed not in seeds_raw:
        raise UserError(f"{where}: refine.seed {refine.seed} is not one of the recipe's seeds {seeds_raw}")
    if refine.lr_multiplier is not None and not any(math.isclose(refine.lr_multiplier, m) for m in lrm):
        raise UserError(f"{where}: refine.lr_multiplier {refine.lr_multiplier} is not in lr_multipliers {lrm}")

    shared = _section(raw, "schedule", SHARED_SCHEDULE_KEYS, "{warmup_steps: 10}", where,
                      "'schedule' (per-schedule options go in the 'schedules' list)")
    try:
        ScheduleConfig.from_dict({"name": BASELINE, **shared})
    except (UserError, TypeError) as e:
        raise UserError(f"{where}: schedule: {e}") from None

    pretrain = raw.get("pretrain") or {}
    if not isinstance(pretrain, dict):
        raise UserError(f"{where}: 'pretrain' must be a mapping (the base pretraining config)")
    for k in ("schedule", "output_dir"):
        if k in pretrain:
            raise UserError(f"{where}: pretrain.{k} is set by the pipeline for each run; remove it (schedules go in 'schedules')")
    for section, key, instead in (("model", "size", "sizes"), ("train", "seed", "seeds")):
        if isinstance(pretrain.get(section), dict) and key in pretrain[section]:
            raise UserError(f"{where}: pretrain.{section}.{key} is set by the pipeline from '{instead}'; remove it")
    base_dir = Path(path).resolve().parent if path else Path.cwd()
    _check_data(pretrain, where, base_dir)

    so_raw = raw.get("size_overrides") or {}
    if not isinstance(so_raw, dict):
        raise UserError(f"{where}: 'size_overrides' must map a size to a list of key=value overrides")
    size_overrides: dict[str, list[str]] = {}
    for size, ov in so_raw.items():
        if size not in sizes:
            raise UserError(f"{where}: size_overrides names size {size!r}, which is not in 'sizes' {sizes}")
        items = _as_list(ov, f"size_overrides.{size}", where)
        if isinstance(ov, dict):
            items = [f"{k}={v}" for k, v in ov.items()]
        for it in items:
            if not isinstance(it, str) or "=" not in it:
                raise UserError(f"{where}: size_overrides.{size}: {it!r} is not a dotted key=value override")
            key = it.split("=", 1)[0].strip()
            if key in ("model.size", "train.seed", "output_dir") or key.startswith("schedule"):
                raise UserError(f"{where}: size_overrides.{size}: {key} is set by the pipeline; remove {it!r}")
        size_overrides[str(size)] = [str(x) for x in items]

    launch_raw = _section(raw, "launch", LAUNCH_KEYS, "{launcher: accelerate, config: launch/ddp.yaml}", where)
    launch = LaunchSettings(**launch_raw)
    if launch.launcher not in LAUNCHERS:
        raise UserError(f"{where}: launch.launcher {launch.launcher!r} is not one of {', '.join(LAUNCHERS)}")

    slurm_raw = _section(raw, "slurm", SLURM_KEYS, "{nodes: 2, gpus_per_node: 8, time: '24:00:00'}", where)
    slurm = SlurmSettings(**slurm_raw)
    slurm.setup = [str(x) for x in _as_list(slurm.setup, "slurm.setup", where)]
    slurm.extra = [str(x) for x in _as_list(slurm.extra, "slurm.extra", where)]

    recipe = Recipe(
        name=str(raw.get("name") or (Path(path).stem if path else "recipe")),
        description=str(raw.get("description") or ""),
        sizes=sizes,
        schedules=schedules,
        seeds=[int(s) for s in seeds_raw],
        lr_multipliers=lrm,
        refine=refine,
        shared_schedule=dict(shared),
        pretrain=copy.deepcopy(pretrain),
        size_overrides=size_overrides,
        launch=launch,
        slurm=slurm,
        evaluate=bool(raw.get("evaluate", True)),
        path=path,
    )
    if check_pretrain:
        _check_pretrain(recipe, where)
    return recipe


def _check_pretrain(recipe: Recipe, where: str) -> None:
    """Resolve each size's base config with the pretraining loader so unknown keys fail now."""
    from .runner import base_overrides  # local: runner imports this module
    from ..train.pretrain import load_pretrain_config

    for size in recipe.sizes:
        try:
            overrides = base_overrides(recipe, size, recipe.seeds[0], recipe.lr_multipliers[0], BASELINE, "unused")
            load_pretrain_config(copy.deepcopy(recipe.pretrain), overrides)
        except UserError as e:
            raise UserError(f"{where}: pretrain config for size {size!r}: {e}") from None


def load_recipe(path: str | os.PathLike, *, check_pretrain: bool = True) -> Recipe:
    """Read and validate a recipe YAML file."""
    import yaml

    p = Path(path)
    if not p.exists():
        hint = " (the embedded default is recipes/tiny.yaml)" if not str(path).endswith("tiny.yaml") else ""
        raise UserError(f"{p}: no such recipe file; pass a recipe YAML{hint}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"{p}: not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    return parse_recipe(raw if raw is not None else {}, path=str(p), check_pretrain=check_pretrain)
