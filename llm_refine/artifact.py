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

Schedules longer than ``COMPACT_MIN_STEPS`` steps are stored compactly: instead of the
``"multipliers"`` list the file holds ``"multipliers_encoding": "float32-le-base64"`` and
``"multipliers_data"`` (the multipliers as little-endian float32, base64; 5.3 bytes per step
instead of about 22, relative rounding at most 6e-8, peak 1 and final 0 exact). `read_schedule`
decodes it into a float64 ``numpy.ndarray`` under ``"multipliers"`` and applies the same checks.
"""

from __future__ import annotations

import base64
import binascii
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
COMPACT_MIN_STEPS = 100_000
COMPACT_ENCODING = "float32-le-base64"


def package_version() -> str:
    """The version in its one place (also right when the package runs from a checkout, unbuilt)."""
    from . import __version__

    return __version__


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
        # a list for small schedules; an array for long ones (written compactly, see the module doc)
        "multipliers": m.tolist() if (m := np.asarray(multipliers, dtype=np.float64)).size <= COMPACT_MIN_STEPS else m,
        "provenance": prov,
        "diagnostics": diagnostics or {},
        "fit": fit or {},
    }


def encode_multipliers(m: np.ndarray) -> dict:
    """The compact form of a long schedule's multipliers (keys that replace ``"multipliers"``)."""
    data = np.ascontiguousarray(m, dtype="<f4").tobytes()
    return {"multipliers_encoding": COMPACT_ENCODING, "multipliers_length": int(m.size), "multipliers_data": base64.b64encode(data).decode("ascii")}


def _decode_multipliers(obj: dict, where: str) -> np.ndarray:
    if obj.get("multipliers_encoding") != COMPACT_ENCODING:
        raise UserError(f"{where}: unknown \"multipliers_encoding\" {obj.get('multipliers_encoding')!r} (expected {COMPACT_ENCODING!r}); {FIX}")
    data, n = obj.get("multipliers_data"), obj.get("multipliers_length")
    if not isinstance(data, str) or type(n) is not int:
        raise UserError(f"{where}: \"multipliers_data\" must be a base64 string and \"multipliers_length\" a whole number; {FIX}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"{where}: \"multipliers_data\" is not valid base64; {FIX}") from None
    if len(raw) != 4 * n:
        raise UserError(f"{where}: \"multipliers_data\" holds {len(raw) // 4} float32 values, but \"multipliers_length\" says {n}; {FIX}")
    return np.frombuffer(raw, dtype="<f4").astype(np.float64)


def write_schedule(path: str | os.PathLike, artifact: dict) -> Path:
    """Validate and write ``artifact`` atomically (compactly when it is long)."""
    m = schedule_multipliers(artifact, str(path))
    out = dict(artifact)
    if m.size > COMPACT_MIN_STEPS:
        del out["multipliers"]
        out.update(encode_multipliers(m))
    elif not isinstance(out["multipliers"], list):
        out["multipliers"] = m.tolist()
    return atomic_write_json(path, out, indent=1)


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
    if m is None and "multipliers_encoding" in obj:
        return _check_values(_decode_multipliers(obj, where), where)
    if isinstance(m, np.ndarray):  # an in-memory artifact (make_schedule_artifact of a long run)
        if m.dtype.kind != "f":
            raise UserError(f"{where}: \"multipliers\" must be floats; {fix}")
        return _check_values(np.asarray(m, dtype=np.float64), where)
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
    _check_provenance(obj, where)
    return obj


def _check_provenance(obj: dict, where: str) -> None:
    prov = obj.get("provenance")
    if prov is not None and not isinstance(prov, dict):
        raise UserError(f"{where}: \"provenance\" must be a JSON object; {FIX}")


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
    m = schedule_multipliers(obj, str(path))
    _check_provenance(obj, str(path))
    if "multipliers_encoding" in obj:
        for k in ("multipliers_encoding", "multipliers_length", "multipliers_data"):
            obj.pop(k, None)
        obj["multipliers"] = m
    if obj.get("provenance") is None:
        obj["provenance"] = {}
    return obj
