"""Crash-safe file writes.

Everything llm-refine produces that a later stage reads (schedules, configs, summaries) is written
atomically: to a temporary file in the same directory, fsynced, then renamed over the target. A
crash leaves either the old file or the new one, never half of either.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the file the permissions a plain open() would have.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, allow_nan=False) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading: one JSON reader, one JSON-lines reader with one torn-line policy


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """The JSON value in ``path``, or ``default`` when the file is missing or not valid JSON.

    For files this project writes atomically (summaries, markers, state): a missing or unreadable
    one means "not there yet", which every caller treats the same way.
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return default


def split_jsonl(text: str) -> tuple[list[str], bool]:
    """Lines of a JSON-lines text and whether the last one is torn (no trailing newline)."""
    if not text:
        return [], False
    torn = not text.endswith("\n")
    lines = text.split("\n")
    if not torn:
        lines = lines[:-1]
    return lines, torn


def read_jsonl(path: str | os.PathLike, *, missing_ok: bool = True) -> list[dict]:
    """The JSON objects of a JSON-lines file, one per non-empty line.

    The policy every reader of this project's logs shares: a last line without its newline whose
    JSON does not parse is a write torn by a crash, and is dropped with a warning; any other line
    that is not a JSON object is an error naming the file and line. A missing file is no records
    (``missing_ok``) or FileNotFoundError.
    """
    import warnings

    from .errors import UserError

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return []
        raise
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; a JSON-lines file must be UTF-8") from None
    lines, torn = split_jsonl(text)
    out: list[dict] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if torn and i == len(lines):
                warnings.warn(f"{path}: ignoring a torn last line (the run was interrupted mid-write)")
                break
            raise UserError(f"{path}: line {i} is not valid JSON ({e.msg}); fix or delete that line") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}: line {i} is not a JSON object; each line must be a {{...}} record")
        out.append(obj)
    return out


def append_jsonl(path: str | os.PathLike, record: Any) -> None:
    """Append one record as a line and flush it (logs that must survive a crash line by line)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
