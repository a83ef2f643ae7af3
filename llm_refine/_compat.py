"""A loud warning, once per process, when a package whose private internals llm-refine patches is
at a version it was not tested with.

pyproject.toml bounds these packages (``transformers<6``, ``accelerate<2``, ``deepspeed<0.20``),
but ``pip install --no-deps``, conda or a source checkout can still put a newer one next to
llm-refine. What is patched:

- transformers: the Trainer's loop (`GradNormCallback` finds the Trainer by walking the stack from
  ``on_train_begin`` inside ``Trainer._inner_training_loop``);
- accelerate: ``Accelerator.clip_grad_norm_`` (the Trainer's and `AccelerateGradNormHook`'s clip);
- deepspeed: ``DeepSpeedEngine._take_model_step`` and the ZeRO optimizers' ``averaged_gradients``.

Call ``warn_if_untested("deepspeed")`` where the patch is installed; it never raises.
"""

from __future__ import annotations

import re
import warnings

# package -> the first version NOT tested (keep equal to the upper bounds in pyproject.toml)
TESTED_BELOW: dict[str, str] = {
    "transformers": "6",
    "accelerate": "2",
    "deepspeed": "0.20",
}

WHAT: dict[str, str] = {
    "transformers": "the Trainer's training loop",
    "accelerate": "Accelerator.clip_grad_norm_",
    "deepspeed": "DeepSpeedEngine._take_model_step and the ZeRO optimizers' gradient partitions",
}

_warned: set[str] = set()


def release(v: str) -> tuple[int, ...]:
    """The leading numeric release of a version string: '5.23.0rc1' -> (5, 23, 0), '0.19.8+cu' -> (0, 19, 8)."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", v)
    if not m:
        return ()
    return tuple(int(x) for x in m.group(1).split("."))


def _installed(package: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - Python >= 3.8 has it
        return None
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def untested_message(package: str, found: str, tested_below: str) -> str:
    what = WHAT.get(package, f"private internals of {package}")
    return (f"llm-refine patches {what} and is tested with {package}<{tested_below}, but {package} {found} is "
            f"installed: gradient norms may be recorded wrongly or not at all. Install {package}<{tested_below} "
            f"(pip install '{package}<{tested_below}') or check the recorded history against a known run.")


def warn_if_untested(package: str, tested_below: str | None = None, *, version: str | None = None) -> str | None:
    """Warn (RuntimeWarning, once per package per process) when ``package``'s installed version (or
    ``version``) is ``>= tested_below`` (default: `TESTED_BELOW`). Returns the message when it warned,
    else None. Not installed, unparseable or within the tested range: silent."""
    bound = tested_below if tested_below is not None else TESTED_BELOW.get(package)
    if bound is None or package in _warned:
        return None
    found = version if version is not None else _installed(package)
    if found is None:
        return None
    have, limit = release(found), release(bound)
    if not have or not limit:
        return None
    # compare on the bound's length: tested_below "6" means any 6.x is untested
    if have[: len(limit)] + (0,) * max(0, len(limit) - len(have)) < limit:
        return None
    _warned.add(package)
    msg = untested_message(package, found, bound)
    warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return msg
