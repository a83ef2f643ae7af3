"""Schedule artifacts: the JSON file a refinement produces and training runs read.

    {
      "format": "llm-refine/schedule", "version": 1,
      "multipliers": [...],             # one per optimizer step of the source run, max 1, last 0
      "provenance": {"source": ..., "source_sha256": ..., "norm": "l1", "tau": 0.1, "T": ...,
                     "package_version": ..., "created": ...},
      "diagnostics": {...}, "fit": {...}
    }

Written atomically; read back with validation so a wrong file fails with a clear message before a
training run starts.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .fileio import atomic_write_json

FORMAT = "llm-refine/schedule"
VERSION = 1


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("llm-refine")
    except Exception:
        return "unknown"


def make_schedule_artifact(
    multipliers: np.ndarray,
    *,
    provenance: dict[str, Any],
    diagnostics: dict[str, Any] | None = None,
    fit: dict[str, Any] | None = None,
) -> dict:
    prov = {
        "package_version": package_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **provenance,
    }
    return {
        "format": FORMAT,
        "version": VERSION,
        "multipliers": [float(x) for x in np.asarray(multipliers, dtype=np.float64)],
        "provenance": prov,
        "diagnostics": diagnostics or {},
        "fit": fit or {},
    }


def write_schedule(path: str | os.PathLike, artifact: dict) -> Path:
    validate_schedule(artifact, str(path))
    return atomic_write_json(path, artifact, indent=1)


FIX = "regenerate it with `llm-refine refine HISTORY -o SCHEDULE.json`"


def schedule_multipliers(obj: Any, where: str) -> np.ndarray:
    """The validated multipliers of a parsed schedule file, as float64 (a UserError otherwise).

    Real content, not the stored summary: a 1-D list of at least 2 JSON numbers (no strings,
    booleans or nested lists), finite, within [0, 1], with a peak above 0 (all zeros would train
    at learning rate 0).
    """
    fix = FIX
    if not isinstance(obj, dict):
        raise UserError(f"{where}: not a schedule file (top level is not a JSON object); {fix}")
    if obj.get("format") != FORMAT:
        raise UserError(f"{where}: not a schedule file (format is {obj.get('format')!r}, expected {FORMAT!r}); {fix}")
    if obj.get("version") != VERSION:
        raise UserError(f"{where}: schedule format version {obj.get('version')!r} is not supported (expected {VERSION}); {fix}")
    m = obj.get("multipliers")
    if not isinstance(m, list) or len(m) < 2:
        raise UserError(f"{where}: \"multipliers\" must be a list of at least 2 numbers; {fix}")
    for i, x in enumerate(m):
        if type(x) not in (int, float):
            kind = "a list" if isinstance(x, list) else "a string" if isinstance(x, str) else "a boolean" if isinstance(x, bool) else type(x).__name__
            raise UserError(f"{where}: multiplier {i} is {kind} ({json.dumps(x)[:30]}), not a number; \"multipliers\" must be a flat list of numbers; {fix}")
    try:
        arr = np.asarray(m, dtype=np.float64)
    except OverflowError:
        raise UserError(f"{where}: multipliers must be finite and within [0, 1]; {fix}") from None
    return _check_values(arr, where)


def _check_values(arr: np.ndarray, where: str) -> np.ndarray:
    fix = FIX
    if arr.ndim != 1 or arr.size < 2:
        raise UserError(f"{where}: \"multipliers\" must be a flat list of at least 2 numbers; {fix}")
    if not np.all(np.isfinite(arr)) or arr.min() < 0.0 or arr.max() > 1.0 + 1e-9:
        raise UserError(f"{where}: multipliers must be finite and within [0, 1]; {fix}")
    if not arr.max() > 0.0:
        raise UserError(f"{where}: every multiplier is 0, so training would run at learning rate 0; {fix}")
    return arr


def validate_schedule(obj: Any, where: str) -> dict:
    """Check a parsed schedule file's real content (see `schedule_multipliers`); returns ``obj``."""
    schedule_multipliers(obj, where)
    prov = obj.get("provenance")
    if prov is not None and not isinstance(prov, dict):
        raise UserError(f"{where}: \"provenance\" must be a JSON object; {FIX}")
    return obj


def read_schedule(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such schedule file; write one with `llm-refine refine HISTORY -o {path}`")
    if path.is_dir():
        raise UserError(f"{path}: is a directory; pass the schedule JSON written by `llm-refine refine`")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); regenerate it with `llm-refine refine`") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file; pass the schedule JSON written by `llm-refine refine`") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a schedule file; {FIX}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror}); pass the schedule JSON written by `llm-refine refine`") from None
    obj = validate_schedule(obj, str(path))
    if obj.get("provenance") is None:
        obj["provenance"] = {}
    return obj
