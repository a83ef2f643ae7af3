"""Crash-safe file writes.

Everything llm-refine produces that a later stage reads (schedules, configs, summaries, figures) is
written atomically: to a temporary file in the same directory, fsynced, then renamed over the
target. A crash leaves either the old file or the new one, never half of either.

Output paths are checked before anything is written (`check_output_path`): an empty path, a
directory, a device, a FIFO, a socket or a path whose parent is a file is refused with a
`UserError` naming the path; a symlink is written *through* (its target is replaced, the link
stays). A replaced file keeps its permission bits. Temporary files are named
``.<name>.llm-refine-<pid>-<random>.tmp``; one whose writer process is gone (a SIGKILL mid-write)
is removed by the next write to the same path.

`output_transaction()` makes the outputs of one command all-or-nothing: inside it every atomic
write is staged (written and fsynced to its temporary file) and the renames happen together when
the block ends without an exception; on an exception the staged files are removed and no target
is touched.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)

_TMP_TAG = "llm-refine"
_TMP_RE = re.compile(r"^\.(?P<name>.+)\." + _TMP_TAG + r"-(?P<pid>\d+)-[0-9a-f]+\.tmp$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _user_error(msg: str):
    from .errors import UserError

    return UserError(msg)


def _os_problem(e: OSError) -> str:
    return e.strerror or str(e)


def check_output_path(path: str | os.PathLike, *, what: str = "output") -> Path:
    """The file an atomic write to ``path`` would replace (a symlink resolved to its target).

    Raises a UserError, before anything is written, when ``path`` cannot be a regular output file:
    empty, a directory (or ending in a slash), a device, a FIFO or a socket, or under a parent that
    is a file.
    """
    raw = os.fspath(path)
    if raw == "":
        raise _user_error(f"the {what} path is empty; give a file name")
    if raw.endswith(os.sep) or (os.altsep and raw.endswith(os.altsep)):
        raise _user_error(f"{raw}: the {what} path names a directory; give a file name")
    p = Path(raw)
    if p.is_symlink():
        # The documented choice: write through the link, so the link stays and its target changes.
        p = Path(os.path.realpath(p))
    try:
        st = p.stat()
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        st = None
    except OSError as e:
        raise _user_error(f"{raw}: cannot use as {what} ({_os_problem(e)}); pick another path") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = (
            "a directory" if stat.S_ISDIR(st.st_mode)
            else "a device" if (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode))
            else "a FIFO" if stat.S_ISFIFO(st.st_mode)
            else "a socket" if stat.S_ISSOCK(st.st_mode)
            else "not a regular file"
        )
        raise _user_error(f"{raw}: is {kind}, not a regular file; llm-refine only replaces regular files, pick a file path")
    for parent in p.parents:
        try:
            pst = parent.stat()
        except FileNotFoundError:
            continue  # created by the write
        except NotADirectoryError:
            continue  # a file further up; reported when the loop reaches it
        except OSError as e:
            raise _user_error(f"{raw}: cannot use as {what} ({parent}: {_os_problem(e)}); pick another path") from None
        if not stat.S_ISDIR(pst.st_mode):
            raise _user_error(f"{raw}: its parent {parent} is a file, not a directory; pick another {what} path")
        break
    return p


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file (after symlinks; hard links included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_outputs(outputs: dict[str, str | os.PathLike | None], inputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse (UserError) any output that is not a regular file path, that equals an input, or that
    two outputs share. ``outputs``/``inputs`` map a label (e.g. ``"-o"``) to a path or None."""
    seen: list[tuple[str, str | os.PathLike]] = []
    for label, out in outputs.items():
        if out is None:
            continue
        check_output_path(out, what=f"{label} output")
        for in_label, inp in inputs.items():
            if inp is not None and os.fspath(inp) != "" and same_file(out, inp):
                raise _user_error(
                    f"{out}: the {label} output is the {in_label} input; writing it would destroy the input, pick another path"
                )
        for other_label, other in seen:
            if same_file(out, other):
                raise _user_error(f"{out}: given as both {other_label} and {label}; give each output its own path")
        seen.append((label, out))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def clean_stale_temps(target: str | os.PathLike) -> int:
    """Remove our temporary files for ``target`` whose writer process no longer exists."""
    target = Path(target)
    removed = 0
    try:
        entries = os.listdir(target.parent)
    except OSError:
        return 0
    for entry in entries:
        m = _TMP_RE.match(entry)
        if not m or m.group("name") != target.name or _pid_alive(int(m.group("pid"))):
            continue
        try:
            os.unlink(target.parent / entry)
            removed += 1
            logger.debug("removed stale temporary file %s", target.parent / entry)
        except OSError:
            pass
    return removed


_staged: contextvars.ContextVar[list | None] = contextvars.ContextVar("llm_refine_staged_writes", default=None)


def _stage(path: str | os.PathLike, data: bytes) -> tuple[str, Path]:
    """Write ``data`` to a temporary file beside the (resolved) target; return (tmp, target)."""
    shown = os.fspath(path)
    target = check_output_path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _user_error(f"{shown}: cannot create its directory ({_os_problem(e)}); pick another path") from None
    clean_stale_temps(target)
    try:
        mode = stat.S_IMODE(target.stat().st_mode)  # keep a replaced file's permissions
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    tmp = str(target.parent / f".{target.name}.{_TMP_TAG}-{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise _user_error(f"{shown}: cannot write there ({_os_problem(e)}); check the directory's permissions or pick another path") from None
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            hint = "free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "pick another path"
            raise _user_error(f"{shown}: writing failed ({_os_problem(e)}); {hint}; the old file is unchanged") from None
        raise
    return tmp, target


def _commit(tmp: str, target: Path, shown: str) -> None:
    try:
        os.replace(tmp, target)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise _user_error(f"{shown}: could not replace it ({_os_problem(e)}); pick another path") from None


@contextlib.contextmanager
def output_transaction() -> Iterator[None]:
    """Stage every atomic write in the block; rename them all at its end, or none on an exception."""
    outer = _staged.get()
    if outer is not None:  # nested: the outermost transaction commits
        yield
        return
    staged: list[tuple[str, Path, str]] = []
    token = _staged.set(staged)
    try:
        yield
    except BaseException:
        for tmp, _, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    finally:
        _staged.reset(token)
    for i, (tmp, target, shown) in enumerate(staged):
        try:
            _commit(tmp, target, shown)
        except BaseException:
            for rest, _, _ in staged[i + 1 :]:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(rest)
            raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module doc); returns ``path``.

    Inside `output_transaction` the write is staged and happens when the transaction commits.
    """
    staged = _staged.get()
    tmp, target = _stage(path, data)
    if staged is not None:
        staged.append((tmp, target, os.fspath(path)))
    else:
        _commit(tmp, target, os.fspath(path))
    return Path(path)


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


def parse_jsonl(text: str, path: str | os.PathLike, *, record_hint: str = "a {...} record") -> list[tuple[int, dict]]:
    """(line number, object) of each non-empty line of a JSON-lines text.

    The one policy of every reader of this project's JSON-lines files (logs, histories): a last line
    without its newline is a write torn by a crash and is dropped with a warning (the writers end
    every record with a newline); any other line that is not a JSON object is an error naming the
    file and the line; ``record_hint`` says what a line should look like.
    """
    import warnings

    from .errors import UserError

    lines, torn = split_jsonl(text)
    if torn:
        warnings.warn(f"{path}: ignoring a torn last line (the run was interrupted mid-write)")
        lines = lines[:-1]
    out: list[tuple[int, dict]] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {i} is not valid JSON ({e.msg}); fix or delete that line") from None
        except RecursionError:
            raise UserError(f"{path}: line {i} is nested too deeply to be a record; fix or delete that line") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}: line {i} is not a JSON object; each line must be {record_hint}")
        out.append((i, obj))
    return out


def read_jsonl(path: str | os.PathLike, *, missing_ok: bool = True) -> list[dict]:
    """The JSON objects of a JSON-lines file (`parse_jsonl`'s policy). A missing file is no records
    (``missing_ok``) or FileNotFoundError."""
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
    return [obj for _, obj in parse_jsonl(text, path)]


def append_jsonl(path: str | os.PathLike, record: Any) -> None:
    """Append one record as a line and flush it (logs that must survive a crash line by line)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
