"""Gradient-norm history files: the format the recorder writes and the readers refinement uses.

The native format is JSON Lines, one object per optimizer step::

    {"format": "llm-refine/gradnorms", "version": 1, "meta": {...}}      <- optional first line
    {"step": 0, "l1": 15839.2, "l2": 3.1}
    {"step": 1, "l1": 15671.6, "l2": 3.0, "groups": {"l2": {...}}}      <- optional extras
    {"step": 2, "skipped": true, "reason": "fp16 overflow"}            <- step the engine skipped

Appends are line-at-a-time and flushed, so a crash loses at most the line being written; a torn
final line is detected and dropped on the next open. On resume the writer drops every record past
the checkpoint's step, so the history has no gap and no duplicate.

Readers also take a 2-column CSV (step, value), W&B CSV exports (header row, quoted values, the
norm in a named column or the second one) and ``.npy`` (1-D: one value per step from 0; 2-D:
columns step, value).
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from .errors import UserError
from .fileio import atomic_write_text

FORMAT = "llm-refine/gradnorms"
VERSION = 1
NORM_KEYS = ("l1", "l2")


@dataclass
class NormTrace:
    """One column of a gradient-norm history: per-step values as logged (possibly with gaps)."""

    steps: np.ndarray  # int64, as logged (not yet checked for order or gaps)
    values: np.ndarray  # float64
    source: str
    column: str
    meta: dict = field(default_factory=dict)
    skipped_steps: int = 0  # steps the engine skipped (fp16 overflow), left out of steps/values


# ---------------------------------------------------------------------------------------------
# Writing


def _header_line(meta: Mapping[str, Any] | None) -> str:
    return json.dumps({"format": FORMAT, "version": VERSION, "meta": dict(meta or {})}) + "\n"


def _record_line(record: Mapping[str, Any]) -> str:
    # allow_nan: a non-finite norm is real information (an overflow the engine did not catch);
    # the refinement drops and reports such steps rather than the writer hiding them.
    return json.dumps(dict(record), allow_nan=True) + "\n"


def _split_lines(text: str) -> tuple[list[str], bool]:
    """Lines of a JSONL file and whether the last one was torn (no trailing newline)."""
    if not text:
        return [], False
    torn = not text.endswith("\n")
    lines = text.split("\n")
    if not torn:
        lines = lines[:-1]
    return lines, torn


class HistoryWriter:
    """Append-only JSONL writer for per-step norm records.

    ``resume_after_step``: when given, records with ``step > resume_after_step`` already in the file
    (written after the checkpoint we resume from) are dropped, atomically, before appending.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        meta: Mapping[str, Any] | None = None,
        *,
        resume_after_step: int | None = None,
    ):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair(meta, resume_after_step)
        self._fh = open(self.path, "a", encoding="utf-8")

    def _repair(self, meta, resume_after_step):
        if not self.path.exists() or self.path.stat().st_size == 0:
            atomic_write_text(self.path, _header_line(meta))
            return
        text = self.path.read_text(encoding="utf-8")
        lines, torn = _split_lines(text)
        if torn:
            warnings.warn(f"{self.path}: dropping a torn last line left by an interrupted write")
            lines = lines[:-1]
        keep: list[str] = []
        dropped = 0
        for line in lines:
            if not line.strip():
                continue
            obj = json.loads(line)
            if resume_after_step is not None and "step" in obj and int(obj["step"]) > resume_after_step:
                dropped += 1
                continue
            keep.append(line)
        if keep and "format" in json.loads(keep[0]) and meta is not None:
            # Keep the original header's metadata but note the latest launch's settings too.
            head = json.loads(keep[0])
            head.setdefault("meta", {}).update({k: v for k, v in dict(meta).items() if k not in head["meta"]})
            keep[0] = json.dumps(head)
        elif not keep or "format" not in json.loads(keep[0]):
            keep.insert(0, _header_line(meta).rstrip("\n"))
        if torn or dropped or keep != [ln for ln in lines if ln.strip()]:
            atomic_write_text(self.path, "\n".join(keep) + "\n")

    def write(self, records: Iterable[Mapping[str, Any]]) -> None:
        data = "".join(_record_line(r) for r in records)
        if data:
            self._fh.write(data)
            self._fh.flush()

    def sync(self) -> None:
        """Flush to the OS and to disk (called on checkpoint save and at the end of training)."""
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self.sync()
            self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_history(path, records: Iterable[Mapping[str, Any]], meta: Mapping[str, Any] | None = None) -> Path:
    """Write a whole history atomically (tests, conversions)."""
    text = _header_line(meta) + "".join(_record_line(r) for r in records)
    return atomic_write_text(path, text)


# ---------------------------------------------------------------------------------------------
# Reading


def read_jsonl(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """(meta, records) of a native history file. A torn final line is dropped with a warning."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines, torn = _split_lines(text)
    if torn:
        warnings.warn(f"{path}: ignoring a torn last line (the run was interrupted mid-write)")
        lines = lines[:-1]
    meta: dict = {}
    records: list[dict] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {i} is not valid JSON ({e.msg}); fix or delete that line") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}: line {i} is not a JSON object; each line must be {{\"step\": ..., \"l1\": ...}}")
        if "format" in obj and "step" not in obj:
            meta = dict(obj.get("meta", {}))
            continue
        if "step" not in obj:
            raise UserError(f"{path}: line {i} has no \"step\" field; each record needs one")
        records.append(obj)
    return meta, records


def _to_float(s: str) -> float | None:
    s = s.strip().strip('"').strip()
    if s == "":
        return None
    try:
        return float(s)
    except ValueError:
        return None


def _pick_column(header: list[str], column: str | None, path: Path) -> int:
    if column is None:
        if len(header) < 2:
            raise UserError(f"{path}: needs at least 2 columns (step, value); found {len(header)}")
        return 1
    for i, h in enumerate(header):
        if h == column:
            return i
    # W&B exports name columns "<run> - <metric>"; accept the metric name alone.
    matches = [i for i, h in enumerate(header) if h.endswith(f" - {column}") or h.endswith(f"/{column}")]
    if len(matches) == 1:
        return matches[0]
    raise UserError(
        f"{path}: no column named {column!r}; columns are {header}; pass one of them with --column"
    )


def read_csv(path: str | os.PathLike, column: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if not rows:
        raise UserError(f"{path}: the file is empty; expected rows of step,value")
    has_header = any(_to_float(c) is None for c in rows[0])
    header = [c.strip() for c in rows[0]] if has_header else [f"col{i}" for i in range(len(rows[0]))]
    body = rows[1:] if has_header else rows
    if not has_header and column is not None:
        raise UserError(f"{path}: has no header row, so --column {column!r} cannot be matched; drop --column")
    col = _pick_column(header, column, path)
    steps: list[float] = []
    vals: list[float] = []
    for lineno, r in enumerate(body, 2 if has_header else 1):
        if len(r) <= col:
            raise UserError(f"{path}: row {lineno} has {len(r)} columns, expected at least {col + 1}")
        s, v = _to_float(r[0]), _to_float(r[col])
        if s is None:
            raise UserError(f"{path}: row {lineno}: step {r[0]!r} is not a number; the first column must be the step")
        if v is None:
            if r[col].strip().strip('"') == "":
                continue  # W&B leaves a cell empty where that run logged nothing at this step
            raise UserError(f"{path}: row {lineno}: value {r[col]!r} is not a number")
        steps.append(s)
        vals.append(v)
    st = np.asarray(steps, dtype=np.float64)
    if st.size and not np.all(st == np.round(st)):
        raise UserError(f"{path}: steps in the first column must be whole numbers")
    return st.astype(np.int64), np.asarray(vals, dtype=np.float64), header[col]


def read_npy(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    path = Path(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises several types for a bad file
        raise UserError(f"{path}: not a readable .npy array ({e}); save it with numpy.save") from None
    if arr.ndim == 1:
        return np.arange(arr.size, dtype=np.int64), arr.astype(np.float64)
    if arr.ndim == 2 and arr.shape[1] == 2:
        return arr[:, 0].astype(np.int64), arr[:, 1].astype(np.float64)
    raise UserError(f"{path}: array of shape {arr.shape}; expected (T,) norms or (T, 2) step,value rows")


def load_trace(path: str | os.PathLike, *, norm: str = "l1", column: str | None = None) -> NormTrace:
    """Read one norm column from any supported history file.

    ``norm`` picks the key in native JSONL files (``l1`` or ``l2``); ``column`` overrides it (a JSONL
    key or a CSV column name).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file; pass the gradnorms.jsonl (or CSV/.npy) of a finished run")
    if path.is_dir():
        cand = path / "gradnorms.jsonl"
        if cand.exists():
            path = cand
        else:
            raise UserError(f"{path}: is a directory without gradnorms.jsonl; pass the history file itself")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        meta, records = read_jsonl(path)
        key = column or norm
        steps, vals = [], []
        skipped = 0
        for r in records:
            if r.get("skipped"):
                skipped += 1
                continue
            if key not in r:
                keys = sorted(k for k in r if k != "step")
                raise UserError(f"{path}: record for step {r['step']} has no {key!r}; available: {keys}; use --norm or --column")
            v = r[key]
            steps.append(int(r["step"]))
            vals.append(float("nan") if v is None else float(v))
        return NormTrace(np.asarray(steps, np.int64), np.asarray(vals, np.float64), str(path), key, meta, skipped)
    if suffix in (".csv", ".tsv", ".txt"):
        steps, vals, col = read_csv(path, column)
        return NormTrace(steps, vals, str(path), col)
    if suffix == ".npy":
        if column is not None:
            raise UserError(f"{path}: .npy files have no named columns; drop --column")
        steps, vals = read_npy(path)
        return NormTrace(steps, vals, str(path), "value")
    raise UserError(f"{path}: unknown history format {suffix!r}; use .jsonl, .csv or .npy")
