"""Learning-rate schedules as pure functions ``multiplier(step, total_steps) -> float in [0, 1]``.

``step`` counts optimizer steps from 0; ``total_steps`` is the run's length. Every schedule takes an
optional linear warm-up (``warmup`` steps: step s < warmup gets (s+1)/(warmup+1), so the first
update is not wasted at lr 0, as in nanoGPT). The learning rate is ``peak_lr * multiplier``.

`ScheduleConfig` subclasses (one per schedule, registered by name) hold its options; `make_schedule` turns one into a function of
(step, total). The torch / transformers glue (``LambdaLR``, ``use_schedule`` for the Trainer) is in
`llm_refine.lr_schedulers`, so this module needs numpy only.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Literal, Sequence

import numpy as np

from .configs import Config, ConfigError, option
from .errors import UserError

Schedule = Callable[[int, int], float]


def _check(step: int, total: int) -> None:
    if total <= 0:
        raise ValueError(f"total_steps must be positive, got {total}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")


def _warmup(step: int, warmup: int) -> float | None:
    """The warm-up multiplier, or None once warm-up is over."""
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    return None


def _progress(step: int, total: int, warmup: int) -> float:
    """Fraction of the post-warm-up phase done at ``step``, clamped to [0, 1]."""
    span = total - warmup
    if span <= 0:
        return 1.0
    return min(max((step - warmup) / span, 0.0), 1.0)


def constant(step: int, total: int, *, warmup: int = 0) -> float:
    _check(step, total)
    w = _warmup(step, warmup)
    return 1.0 if w is None else w


def linear_decay(step: int, total: int, *, warmup: int = 0, min_ratio: float = 0.0) -> float:
    """1 − t/T after warm-up (the worst-case optimal last-iterate schedule), floored at min_ratio."""
    _check(step, total)
    w = _warmup(step, warmup)
    if w is not None:
        return w
    p = _progress(step, total, warmup)
    return min_ratio + (1.0 - min_ratio) * (1.0 - p)


def cosine(step: int, total: int, *, warmup: int = 0, min_ratio: float = 0.0) -> float:
    _check(step, total)
    w = _warmup(step, warmup)
    if w is not None:
        return w
    p = _progress(step, total, warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def polynomial(step: int, total: int, *, warmup: int = 0, power: float = 1.0, min_ratio: float = 0.0) -> float:
    _check(step, total)
    w = _warmup(step, warmup)
    if w is not None:
        return w
    p = _progress(step, total, warmup)
    return min_ratio + (1.0 - min_ratio) * (1.0 - p) ** power


_DECAY_SHAPES = {
    "linear": lambda q: 1.0 - q,
    "cosine": lambda q: 0.5 * (1.0 + math.cos(math.pi * q)),
    "1-sqrt": lambda q: 1.0 - math.sqrt(q),
}


def wsd(
    step: int,
    total: int,
    *,
    warmup: int = 0,
    decay_fraction: float = 0.2,
    decay_shape: str = "linear",
    min_ratio: float = 0.0,
) -> float:
    """Warmup–stable–decay: flat at 1, then a decay over the last ``decay_fraction`` of the run."""
    _check(step, total)
    if decay_shape not in _DECAY_SHAPES:
        raise ValueError(f"decay_shape must be one of {sorted(_DECAY_SHAPES)}, got {decay_shape!r}")
    w = _warmup(step, warmup)
    if w is not None:
        return w
    decay_steps = max(1, round(decay_fraction * total))
    start = total - decay_steps
    if step < start:
        return 1.0
    q = min((step - start + 1) / decay_steps, 1.0)
    return min_ratio + (1.0 - min_ratio) * _DECAY_SHAPES[decay_shape](q)


def inverse_sqrt(step: int, total: int, *, warmup: int = 0, timescale: int | None = None) -> float:
    """sqrt(timescale / step) after warm-up, capped at 1; timescale defaults to the warm-up (min 1)."""
    _check(step, total)
    w = _warmup(step, warmup)
    if w is not None:
        return w
    ts = timescale if timescale is not None else max(warmup, 1)
    return math.sqrt(ts / max(step, ts))


def refined(step: int, total: int, *, multipliers: Sequence[float] | np.ndarray, warmup: int = 0) -> float:
    """A refined schedule given as per-step multipliers of any length, resampled to ``total``.

    Step s sits at normalized time s/(total−1) (fraction of training), and the multiplier there is
    linearly interpolated from the source array's own normalized grid, so a schedule refined on a
    10k-step run drives a 50k-step run with the same shape. An optional extra warm-up multiplies
    the first ``warmup`` steps by (s+1)/(warmup+1).
    """
    _check(step, total)
    m = np.asarray(multipliers, dtype=np.float64)
    n = m.size
    if n == 0:
        raise ValueError("refined schedule has no multipliers")
    if n == 1:
        value = float(m[0])
    else:
        x = min(step, total - 1) / (total - 1) if total > 1 else 0.0
        pos = x * (n - 1)
        i = min(int(pos), n - 2)
        frac = pos - i
        value = float(m[i] * (1.0 - frac) + m[i + 1] * frac)
    wu = _warmup(step, warmup)
    return value if wu is None else value * wu


# ---------------------------------------------------------------------------------------------
# Configs: one class per schedule, registered by name


class ScheduleConfig(Config):
    """Base of the schedule configs. Each subclass is one schedule, registered under ``name``;
    options that do not apply to it are errors. Every schedule has a linear warm-up
    (``warmup_steps`` wins over ``warmup_ratio``).

    ``ScheduleConfig.from_dict({"name": "cosine", "min_ratio": 0.1})`` (or a plain name) picks the
    class; ``to_dict()`` writes ``name`` first.
    """

    name: ClassVar[str] = ""
    registry: ClassVar[dict[str, type["ScheduleConfig"]]] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.__dict__.get("name"):
            ScheduleConfig.registry[cls.name] = cls

    @classmethod
    def from_dict(cls, data, *, where: str | None = None) -> "ScheduleConfig":
        try:
            if isinstance(data, ScheduleConfig):
                return data
            if isinstance(data, str):
                data = {"name": data}
            if cls is not ScheduleConfig:  # a concrete class: the name, if given, must be its own
                data = dict(data or {})
                if data.pop("name", cls.name) != cls.name:
                    raise ConfigError(("name",), f"this is a {cls.name!r} schedule config")
                return Config.from_dict.__func__(cls, data)
            if not isinstance(data, Mapping):
                raise ConfigError((), f"{data!r} is not a schedule; write a name or a mapping with 'name'")
            data = dict(data)
            name = data.pop("name", "linear")
            sub = cls.registry.get(name) if isinstance(name, str) else None
            if sub is None:
                raise ConfigError(("name",), f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
            return Config.from_dict.__func__(sub, data)
        except ConfigError as e:
            if where is None:
                raise
            raise UserError(f"{where}: {e}") from None

    @classmethod
    def create(cls, name: str = "linear", **options) -> "ScheduleConfig":
        """``ScheduleConfig.create("cosine", warmup_ratio=0.01, min_ratio=0.1)``."""
        return cls.from_dict({"name": name, **options})

    def to_dict(self) -> dict:
        return {"name": self.name, **super().to_dict()}

    def warmup_for(self, total_steps: int) -> int:
        return self.warmup_steps if self.warmup_steps else int(round(self.warmup_ratio * total_steps))

    def function(self, warmup: int) -> Schedule:
        """The pure (step, total) -> multiplier function, with ``warmup`` resolved to steps."""
        raise NotImplementedError(type(self).__name__)  # every registered subclass implements it

    def build(self, total_steps: int | None = None) -> Schedule:
        return self.function(self.warmup_for(total_steps) if total_steps else self.warmup_steps)


_WARMUP_STEPS = "linear warm-up length in optimizer steps (wins over warmup_ratio)"
_WARMUP_RATIO = "linear warm-up length as a fraction of the run"
_MIN_RATIO = "floor of the decay, as a fraction of the peak LR"


@dataclass(kw_only=True)
class _Warmup(ScheduleConfig):
    warmup_steps: int = option(0, doc=_WARMUP_STEPS, ge=0)
    warmup_ratio: float = option(0.0, doc=_WARMUP_RATIO, ge=0.0, lt=1.0)


@dataclass(kw_only=True)
class _Decay(_Warmup):
    min_ratio: float = option(0.0, doc=_MIN_RATIO, ge=0.0, le=1.0)


@dataclass(kw_only=True)
class ConstantSchedule(_Warmup):
    """1 after warm-up."""

    name: ClassVar[str] = "constant"

    def function(self, warmup: int) -> Schedule:
        return functools.partial(constant, warmup=warmup)


@dataclass(kw_only=True)
class LinearSchedule(_Decay):
    """1 − progress after warm-up, floored at ``min_ratio``: the worst-case optimal schedule."""

    name: ClassVar[str] = "linear"

    def function(self, warmup: int) -> Schedule:
        return functools.partial(linear_decay, warmup=warmup, min_ratio=self.min_ratio)


@dataclass(kw_only=True)
class CosineSchedule(_Decay):
    """min + (1 − min)·½(1 + cos π·progress) after warm-up."""

    name: ClassVar[str] = "cosine"

    def function(self, warmup: int) -> Schedule:
        return functools.partial(cosine, warmup=warmup, min_ratio=self.min_ratio)


@dataclass(kw_only=True)
class PolynomialSchedule(_Decay):
    """min + (1 − min)·(1 − progress)^power after warm-up."""

    name: ClassVar[str] = "polynomial"
    power: float = option(1.0, doc="exponent of the decay (1 = linear); > 0 so the LR never rises", gt=0.0)

    def function(self, warmup: int) -> Schedule:
        return functools.partial(polynomial, warmup=warmup, power=self.power, min_ratio=self.min_ratio)


@dataclass(kw_only=True)
class WSDSchedule(_Decay):
    """Warmup–stable–decay: flat at 1, then a decay over the last ``decay_fraction`` of the run."""

    name: ClassVar[str] = "wsd"
    decay_fraction: float = option(0.2, doc="share of the run spent decaying, at the end", gt=0.0, le=1.0)
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = option("linear", doc="shape of the final decay")

    def function(self, warmup: int) -> Schedule:
        return functools.partial(
            wsd, warmup=warmup, decay_fraction=self.decay_fraction, decay_shape=self.decay_shape, min_ratio=self.min_ratio
        )


@dataclass(kw_only=True)
class InverseSqrtSchedule(_Warmup):
    """sqrt(timescale / step) after warm-up, capped at 1."""

    name: ClassVar[str] = "inverse_sqrt"
    timescale: int | None = option(None, doc="steps at which the decay starts (default: the warm-up, at least 1)", ge=1)

    def function(self, warmup: int) -> Schedule:
        return functools.partial(inverse_sqrt, warmup=warmup, timescale=self.timescale)


@dataclass(kw_only=True)
class RefinedSchedule(_Warmup):
    """A schedule file's multipliers (``llm-refine refine``), resampled over normalized time; the
    warm-up, if set, is applied on top of them."""

    name: ClassVar[str] = "refined"
    file: str | None = option(None, doc="schedule JSON written by `llm-refine refine`")
    multipliers: list[float] | None = option(None, doc="the multipliers themselves (instead of file)", repr=False, ge=0.0)

    def validate(self) -> None:
        if self.file is None and self.multipliers is None:
            raise ConfigError(("file",), "schedule 'refined' needs file: a schedule JSON written by `llm-refine refine`")

    def loaded(self) -> "RefinedSchedule":
        """This config with the file's multipliers read (and validated) now."""
        if self.multipliers is not None:
            return self
        return self.replace(multipliers=load_multipliers(self.file).tolist())

    def function(self, warmup: int) -> Schedule:
        mult = self.multipliers if self.multipliers is not None else load_multipliers(self.file)
        return functools.partial(refined, multipliers=np.asarray(mult, dtype=np.float64), warmup=warmup)


SCHEDULES = tuple(ScheduleConfig.registry)


def make_schedule(config: ScheduleConfig | Mapping | str, total_steps: int | None = None) -> Schedule:
    """The pure function (step, total) -> multiplier that ``config`` names.

    ``total_steps`` is only needed to resolve ``warmup_ratio``; a schedule built without it uses
    ``warmup_steps``.
    """
    return ScheduleConfig.from_dict(config).build(total_steps)


def load_multipliers(path: str | os.PathLike) -> np.ndarray:
    """The multipliers of a schedule artifact (see `llm_refine.artifact`), validated."""
    from .artifact import read_schedule  # local: artifact imports this module

    return np.asarray(read_schedule(path)["multipliers"], dtype=np.float64)


def resolve_schedule(config: ScheduleConfig | Mapping | str) -> ScheduleConfig:
    """A schedule config from a config, a mapping, a schedule name, or a schedule file's path (a
    string ending in .json, or naming a file, is a refined schedule); a refined schedule's file is
    read and validated now, so a bad file fails before training starts."""
    if isinstance(config, str) and (config.endswith(".json") or Path(config).is_file()):
        config = RefinedSchedule(file=config)
    config = ScheduleConfig.from_dict(config)
    return config.loaded() if isinstance(config, RefinedSchedule) else config
