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


def validate_schedule(obj: Any, where: str) -> dict:
    fix = "regenerate it with `llm-refine refine HISTORY -o SCHEDULE.json`"
    if not isinstance(obj, dict):
        raise UserError(f"{where}: not a schedule file (top level is not a JSON object); {fix}")
    if obj.get("format") != FORMAT:
        raise UserError(f"{where}: not a schedule file (format is {obj.get('format')!r}, expected {FORMAT!r}); {fix}")
    if obj.get("version") != VERSION:
        raise UserError(f"{where}: schedule format version {obj.get('version')!r} is not supported (expected {VERSION}); {fix}")
    m = obj.get("multipliers")
    if not isinstance(m, list) or len(m) < 2:
        raise UserError(f"{where}: \"multipliers\" must be a list of at least 2 numbers; {fix}")
    try:
        arr = np.asarray(m, dtype=np.float64)
    except (TypeError, ValueError):
        raise UserError(f"{where}: \"multipliers\" holds non-numbers; {fix}") from None
    if not np.all(np.isfinite(arr)) or arr.min() < 0.0 or arr.max() > 1.0 + 1e-9:
        raise UserError(f"{where}: multipliers must be finite and within [0, 1]; {fix}")
    return obj


def read_schedule(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such schedule file; write one with `llm-refine refine HISTORY -o {path}`")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); regenerate it with `llm-refine refine`") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file; pass the schedule JSON written by `llm-refine refine`") from None
    return validate_schedule(obj, str(path))
