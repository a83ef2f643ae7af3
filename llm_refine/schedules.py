"""Learning-rate schedules as pure functions ``multiplier(step, total_steps) -> float in [0, 1]``.

``step`` counts optimizer steps from 0; ``total_steps`` is the run's length. Every schedule takes an
optional linear warm-up (``warmup`` steps: step s < warmup gets (s+1)/(warmup+1), so the first
update is not wasted at lr 0, as in nanoGPT). The learning rate is ``peak_lr * multiplier``.

`ScheduleConfig` names a schedule and its options; `make_schedule` turns one into a function of
(step, total); `lambda_lr` wraps that in a ``torch.optim.lr_scheduler.LambdaLR``; `use_schedule`
installs it in a ``transformers.Trainer`` in one line.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

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
# Config → function


SCHEDULES = ("constant", "linear", "cosine", "polynomial", "wsd", "inverse_sqrt", "refined")


@dataclass
class ScheduleConfig:
    """A schedule by name, with its options. ``warmup_steps`` wins over ``warmup_ratio``.

    ``file`` (refined only) is a schedule artifact written by ``llm-refine refine``.
    """

    name: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_ratio: float = 0.0
    power: float = 1.0
    decay_fraction: float = 0.2
    decay_shape: str = "linear"
    timescale: int | None = None
    file: str | None = None
    multipliers: list[float] | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise UserError(f"unknown schedule {self.name!r}; choose one of {', '.join(SCHEDULES)}")
        if self.warmup_steps < 0 or not 0.0 <= self.warmup_ratio < 1.0:
            raise UserError("warmup_steps must be >= 0 and warmup_ratio in [0, 1)")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise UserError(f"min_ratio must be in [0, 1], got {self.min_ratio}")
        if self.name == "refined" and self.file is None and self.multipliers is None:
            raise UserError("schedule 'refined' needs file: a schedule JSON written by `llm-refine refine`")

    @classmethod
    def from_dict(cls, d: dict | str) -> "ScheduleConfig":
        if isinstance(d, str):
            return cls(name=d)
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown schedule option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("multipliers")
        return d

    def warmup_for(self, total_steps: int) -> int:
        return self.warmup_steps if self.warmup_steps else int(round(self.warmup_ratio * total_steps))


def make_schedule(config: ScheduleConfig | dict | str, total_steps: int | None = None) -> Schedule:
    """The pure function (step, total) -> multiplier that ``config`` names.

    ``total_steps`` is only needed to resolve ``warmup_ratio``; a schedule built without it uses
    ``warmup_steps``.
    """
    if not isinstance(config, ScheduleConfig):
        config = ScheduleConfig.from_dict(config)
    warmup = config.warmup_for(total_steps) if total_steps else config.warmup_steps
    c = config
    if c.name == "constant":
        return functools.partial(constant, warmup=warmup)
    if c.name == "linear":
        return functools.partial(linear_decay, warmup=warmup, min_ratio=c.min_ratio)
    if c.name == "cosine":
        return functools.partial(cosine, warmup=warmup, min_ratio=c.min_ratio)
    if c.name == "polynomial":
        return functools.partial(polynomial, warmup=warmup, power=c.power, min_ratio=c.min_ratio)
    if c.name == "wsd":
        return functools.partial(
            wsd, warmup=warmup, decay_fraction=c.decay_fraction, decay_shape=c.decay_shape, min_ratio=c.min_ratio
        )
    if c.name == "inverse_sqrt":
        return functools.partial(inverse_sqrt, warmup=warmup, timescale=c.timescale)
    # refined
    mult = c.multipliers if c.multipliers is not None else load_multipliers(c.file)
    return functools.partial(refined, multipliers=np.asarray(mult, dtype=np.float64), warmup=warmup)


def load_multipliers(path: str | os.PathLike) -> np.ndarray:
    """The multipliers of a schedule artifact (see `llm_refine.artifact`), validated."""
    from .artifact import read_schedule  # local: artifact imports this module

    return np.asarray(read_schedule(path)["multipliers"], dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# torch / transformers glue


def lambda_lr(optimizer, config: ScheduleConfig | dict | str, total_steps: int, last_epoch: int = -1):
    """A ``torch.optim.lr_scheduler.LambdaLR`` for any schedule (the LR at step s is peak·m(s, T))."""
    from torch.optim.lr_scheduler import LambdaLR

    schedule = make_schedule(config, total_steps)

    # A plain function, not a callable object: LambdaLR pickles callable objects' __dict__ into
    # checkpoints, and the Trainer reloads those with weights_only=True, which rejects them. The
    # schedule is rebuilt from the config on resume; only last_epoch needs saving.
    def lr_lambda(step: int) -> float:
        return schedule(step, total_steps)

    return LambdaLR(optimizer, lr_lambda, last_epoch=last_epoch)


def use_schedule(trainer, config: ScheduleConfig | dict | str):
    """Make ``trainer`` (a ``transformers.Trainer``) use ``config``'s schedule. Returns the trainer.

    One line: ``use_schedule(Trainer(...), "refined.json")`` — a string that names a file is read
    as a refined schedule artifact, any other string as a schedule name. The peak LR is
    ``args.learning_rate``; the Trainer's own warm-up settings are ignored (give warm-up in the
    config). The scheduler is built when the Trainer builds its own, with the run's real number of
    optimizer steps, and its state is saved and restored with checkpoints like any scheduler.
    """
    if isinstance(config, str) and (config.endswith(".json") or Path(config).is_file()):
        config = ScheduleConfig(name="refined", file=config)
    if not isinstance(config, ScheduleConfig):
        config = ScheduleConfig.from_dict(config)
    # Read a refined file now, so a bad file fails before training starts.
    if config.name == "refined" and config.multipliers is None:
        config = ScheduleConfig(**{**config.to_dict(), "multipliers": load_multipliers(config.file).tolist()})

    def create_scheduler(num_training_steps: int, optimizer=None):
        if trainer.lr_scheduler is None:
            trainer.lr_scheduler = lambda_lr(optimizer if optimizer is not None else trainer.optimizer, config, num_training_steps)
            trainer._created_lr_scheduler = True
        return trainer.lr_scheduler

    trainer.create_scheduler = create_scheduler
    return trainer
