"""Gradient-norm history files: the format the recorder writes and the readers refinement uses.

The native format is JSON Lines, one object per optimizer step::

    {"format": "llm-refine/gradnorms", "version": 1, "meta": {...}}      <- optional first line
    {"step": 0, "l1": 15839.2, "l2": 3.1}
    {"step": 1, "l1": 15671.6, "l2": 3.0, "groups": {"l2": {...}}}      <- optional extras
    {"step": 2, "skipped": true, "reason": "fp16 overflow"}            <- step the engine skipped

Appends are line-at-a-time and flushed, so a crash loses at most the line being written; a torn
final line is detected and dropped on the next open. On resume the writer drops every record past
the checkpoint's step, so the history has no gap and no duplicate.

Readers also take a 2-column CSV (step, value; ``.tsv``: tab-separated), W&B CSV exports (header
row, quoted values, the norm in a named column or the second one) and ``.npy`` (1-D: one value per
step from 0; 2-D: columns step, value). All formats share one numeric policy (see
`_step_problem`); text must be UTF-8. With pyarrow installed, clean CSV and JSONL files are read by
its vectorised readers; anything else goes to the pure-Python readers, which give the errors.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from .errors import UserError
from .fileio import atomic_write_text, parse_jsonl, split_jsonl

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
        lines, torn = split_jsonl(text)
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
    meta, numbered = _read_jsonl_numbered(Path(path))
    return meta, [obj for _, obj in numbered]


def _decode_text(path: Path, data: bytes, kind: str) -> str:
    """``data`` as UTF-8 text (a UTF-8 BOM is allowed); a one-line UserError for anything else."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(f"{path}: is UTF-16 text; a {kind} must be UTF-8 (re-save it as UTF-8, e.g. `iconv -f UTF-16 -t UTF-8`)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); a {kind} must be UTF-8 "
            "(re-save it as UTF-8, e.g. `iconv -f latin1 -t UTF-8`)"
        ) from None


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _read_jsonl_numbered(path: Path, data: bytes | None = None) -> tuple[dict, list[tuple[int, dict]]]:
    text = _decode_text(path, _read_bytes(path) if data is None else data, "JSON-lines history")
    del data
    meta: dict = {}
    records: list[tuple[int, dict]] = []
    for i, obj in parse_jsonl(text, path, record_hint='{"step": ..., "l1": ...}'):
        if "format" in obj and "step" not in obj:
            m = obj.get("meta", {})
            meta = dict(m) if isinstance(m, dict) else {}
            continue
        if "step" not in obj:
            raise UserError(f"{path}: line {i} has no \"step\" field; each record needs one")
        records.append((i, obj))
    return meta, records


# ---------------------------------------------------------------------------------------------
# One numeric policy for every history format
#
# A step is a whole number with |step| < 2^53 (exact in float64, so every reader agrees); CSV
# cells are parsed as numbers ("10", "10.0", "1e3"), JSON steps must be JSON numbers. A norm is a
# number (CSV: any float literal, including nan/inf; JSON: a number, NaN/Infinity, or null for a
# missing value); JSON strings, booleans, lists and objects are not numbers. Non-finite norms are
# dropped and reported later by the refinement (`llm_refine.refine.prepare_norms`).

MAX_STEP = 2**53


def _step_problem(s: float) -> str | None:
    if not math.isfinite(s) or s != math.floor(s):
        return "is not a whole number; steps must be whole numbers (optimizer step indices)"
    if abs(s) >= MAX_STEP:
        return "is out of range; steps must be whole numbers below 2^53"
    return None


def _json_kind(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _json_step(v: Any, path: Path, line: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UserError(f"{path}: line {line}: \"step\" is {_json_kind(v)} ({json.dumps(v)[:40]}), not a number; write the step as a whole number")
    try:
        f = float(v)
    except OverflowError:
        f = math.inf
    problem = _step_problem(f) if not isinstance(v, int) or abs(v) >= MAX_STEP else None
    if problem:
        raise UserError(f"{path}: line {line}: step {v!r} {problem}")
    return int(v)


def _json_value(v: Any, key: str, path: Path, line: int) -> float:
    if v is None:
        return math.nan
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UserError(
            f"{path}: line {line}: {key!r} is {_json_kind(v)} ({json.dumps(v)[:40]}), not a number; write the norm as a plain number"
        )
    try:
        return float(v)
    except OverflowError:
        return math.inf


def _jsonl_trace(path: Path, key: str) -> NormTrace:
    fast = _read_jsonl_arrow(path, key)
    if fast is not None:
        return fast
    meta, records = _read_jsonl_numbered(path)
    steps: list[int] = []
    vals: list[float] = []
    skipped = 0
    for line, r in records:
        step = _json_step(r["step"], path, line)
        if r.get("skipped"):
            skipped += 1
            continue
        if key not in r:
            keys = sorted(k for k in r if k != "step")
            raise UserError(f"{path}: record for step {step} (line {line}) has no {key!r}; available: {keys}; use --norm or --column")
        steps.append(step)
        vals.append(_json_value(r[key], key, path, line))
    return NormTrace(np.asarray(steps, np.int64), np.asarray(vals, np.float64), str(path), key, meta, skipped)


def _to_float(s: str) -> float | None:
    s = s.strip().strip('"').strip()
    if s == "":
        return None
    try:
        return float(s)
    except ValueError:
        return None


def _delimiter_hint(path: Path, first_line: str, delimiter: str) -> str:
    for d, name in (("\t", "tabs"), (",", "commas"), (";", "semicolons"), ("|", "'|'")):
        if d != delimiter and d in first_line:
            if d in "\t,":
                return f"; its rows look separated by {name}: name the file {'.tsv' if d == chr(9) else '.csv'}"
            return f"; its rows look separated by {name}: llm-refine reads comma-separated .csv and tab-separated .tsv, convert it"
    return "; write rows of step,value"


def _pick_column(header: list[str], column: str | None, path: Path, hint: str = "") -> int:
    if column is None:
        if len(header) < 2:
            raise UserError(f"{path}: needs at least 2 columns (step, value); found {len(header)}{hint}")
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


def csv_delimiter(path: str | os.PathLike) -> str:
    """The delimiter a history file's suffix names: tab for .tsv, comma otherwise."""
    return "\t" if Path(path).suffix.lower() == ".tsv" else ","


def read_csv(path: str | os.PathLike, column: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(steps, values, column name) of a 2-column or W&B CSV (TSV for .tsv), pure Python."""
    path = Path(path)
    delimiter = csv_delimiter(path)
    fast = _read_csv_arrow(path, column, delimiter)
    if fast is not None:
        return fast
    data = _read_bytes(path)
    text = _decode_text(path, data, "CSV history")
    del data
    if "\x00" in text:
        raise UserError(f"{path}: contains NUL bytes, so it is not a text CSV (UTF-16 without a BOM?); re-save it as UTF-8")
    try:
        rows = list(csv.reader(text.splitlines(), delimiter=delimiter))
    except csv.Error as e:
        raise UserError(f"{path}: not a readable CSV ({e}); re-save it as plain comma-separated text") from None
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if not rows:
        raise UserError(f"{path}: the file is empty; expected rows of step,value")
    hint = _delimiter_hint(path, delimiter.join(rows[0]), delimiter) if len(rows[0]) < 2 else ""
    has_header = any(_to_float(c) is None for c in rows[0])
    header = [c.strip() for c in rows[0]] if has_header else [f"col{i}" for i in range(len(rows[0]))]
    body = rows[1:] if has_header else rows
    if not has_header and column is not None:
        raise UserError(f"{path}: has no header row, so --column {column!r} cannot be matched; drop --column")
    col = _pick_column(header, column, path, hint)
    steps: list[float] = []
    vals: list[float] = []
    for lineno, r in enumerate(body, 2 if has_header else 1):
        if len(r) <= col:
            raise UserError(f"{path}: row {lineno} has {len(r)} columns, expected at least {col + 1}")
        s, v = _to_float(r[0]), _to_float(r[col])
        if s is None:
            raise UserError(f"{path}: row {lineno}: step {r[0]!r} is not a number; the first column must be the step")
        problem = _step_problem(s)
        if problem:
            raise UserError(f"{path}: row {lineno}: step {r[0].strip()!r} {problem}")
        if v is None:
            if r[col].strip().strip('"') == "":
                continue  # W&B leaves a cell empty where that run logged nothing at this step
            raise UserError(f"{path}: row {lineno}: value {r[col]!r} is not a number")
        steps.append(s)
        vals.append(v)
    return np.asarray(steps, dtype=np.float64).astype(np.int64), np.asarray(vals, dtype=np.float64), header[col]


# ---------------------------------------------------------------------------------------------
# Vectorised readers (pyarrow, when installed)
#
# The fast path parses a well-formed file with pyarrow's CSV / JSON readers and
# applies the same numeric policy with numpy. It answers only when the file is clean by every rule
# of the pure-Python readers above; on anything else (an error, an odd encoding, a blank line, a
# header in the middle, a null) it steps aside and the pure-Python reader reads the file, so
# results, warnings and error messages are the same with or without pyarrow. pyarrow is optional:
# the core install (numpy, scipy, pyyaml, matplotlib) uses the pure-Python readers.

_PYARROW: Any = None  # None: not tried yet; False: not installed; else (pyarrow, pyarrow.csv, pyarrow.json)
# Bytes that Python's str.splitlines() treats as line ends but pyarrow does not (VT, FF, FS, GS, RS,
# NEL, LS, PS): a file holding one goes to the pure-Python reader.
_ODD_LINE_ENDS = (b"\x0b", b"\x0c", b"\x1c", b"\x1d", b"\x1e")
_ODD_LINE_ENDS_UTF8 = (b"\xc2\x85", b"\xe2\x80\xa8", b"\xe2\x80\xa9")


def _arrow():
    """(pyarrow, pyarrow.csv, pyarrow.json), or None when pyarrow is not installed (or disabled
    with LLM_REFINE_READER=python)."""
    global _PYARROW
    if os.environ.get("LLM_REFINE_READER", "").lower() == "python":
        return None
    if _PYARROW is None:
        try:
            import pyarrow
            import pyarrow.csv
            import pyarrow.json

            _PYARROW = (pyarrow, pyarrow.csv, pyarrow.json)
        except ImportError:
            _PYARROW = False
    return _PYARROW or None


def _clean_utf8(data: bytes) -> bool:
    if data.startswith((b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data:
        return False
    odd = _ODD_LINE_ENDS
    if not data.isascii():
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return False
        odd = odd + _ODD_LINE_ENDS_UTF8
    return not any(b in data for b in odd)  # a few memchr-speed scans


def _steps_int(st: np.ndarray) -> np.ndarray | None:
    """The steps as int64 when they follow the numeric policy's step rule (finite, whole,
    |step| < 2^53), else None; vectorised: one cast, one comparison, min and max."""
    if st.size == 0:
        return st.astype(np.int64)
    if not (-MAX_STEP < st.min() and st.max() < MAX_STEP):  # also False for NaN
        return None
    with np.errstate(invalid="ignore"):
        si = st.astype(np.int64)
    return si if np.array_equal(si, st) else None


def _bits(buf, offset: int, n: int) -> np.ndarray:
    """An Arrow bitmap (validity or boolean values) as a numpy bool array."""
    return np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")[offset : offset + n].astype(bool)


def _column_numpy(col) -> tuple[np.ndarray, np.ndarray | None]:
    """(float64 values, validity mask or None when there are no nulls) of a pyarrow float64
    column, read from its buffers (Arrow's own to_numpy may import pandas)."""
    arr = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    n = len(arr)
    vals = np.frombuffer(arr.buffers()[1], dtype=np.float64)[arr.offset : arr.offset + n] if n else np.zeros(0)
    if arr.null_count == 0:
        return vals, None
    return vals, _bits(arr.buffers()[0], arr.offset, n)


def _bool_numpy(col) -> np.ndarray:
    """A pyarrow boolean column as numpy, null as False."""
    arr = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    n = len(arr)
    if n == 0 or arr.null_count == n:
        return np.zeros(n, dtype=bool)
    vals = _bits(arr.buffers()[1], arr.offset, n)
    if arr.null_count:
        vals &= _bits(arr.buffers()[0], arr.offset, n)
    return vals


# A CSV or JSONL history is memory-mapped (no copy of the file) and parsed in chunks of whole
# lines, one per core: each chunk is checked with numpy and parsed by pyarrow's serial reader in a
# thread of ours (both release the GIL, and a chunk stays hot in cache from check to parse).
# Arrow's own reader threads are not used: at interpreter exit they abort a short-lived CLI now
# and then (apache/arrow#34314); ours are joined before the reader returns. Every chunk must hold
# one row per line, so a split can never change what is read. A mapped file that is truncated
# while it is read would fault; histories are appended to, never truncated in place (the writer's
# repair replaces the file by a rename).
_MIN_CHUNK_BYTES = 4 << 20  # below this a thread costs more than it saves
_MAX_CHUNKS = 8
_TEXT_CONTROL_OK = np.array([9, 10, 13], dtype=np.int8)  # tab, LF, CR


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _line_chunks(buf, start: int, end: int | None = None) -> list[memoryview]:
    """``buf[start:end]`` as up to one chunk per core, each but the last ending after a newline
    (zero-copy views; ``buf`` is bytes or a memory map)."""
    view = memoryview(buf)
    end = len(buf) if end is None else end
    n = end - start
    k = max(1, min(_cores(), _MAX_CHUNKS, n // _MIN_CHUNK_BYTES))
    cuts = [start]
    for i in range(1, k):
        c = buf.find(b"\n", max(start + n * i // k, cuts[-1]), end)
        if c < 0 or c + 1 >= end:
            break
        cuts.append(c + 1)
    cuts.append(end)
    return [view[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]


def _plain_lines(chunk) -> int | None:
    """The number of LF-ended lines of a chunk that is plain ASCII with no control byte but tab, LF
    and CR, else None (a NUL, a form feed, a non-ASCII byte: the pure-Python reader decides). As
    int8 a byte >= 0x80 is negative, so one comparison ``< 0x20`` finds both kinds; when every such
    byte is an LF (the common file) two counts settle it."""
    a = np.frombuffer(chunk, dtype=np.int8)
    odd = a < 0x20
    n_ctrl = int(np.count_nonzero(odd))
    n_lf = int(np.count_nonzero(a == 10))
    if n_ctrl != n_lf and not np.isin(a[odd], _TEXT_CONTROL_OK).all():  # CRLF, tabs, or not plain
        return None
    return n_lf


def _csv_chunk_columns(pa, pacsv, chunk, names: list[str], col: int, options: dict):
    """(int64 steps, float64 values, validity of the values or None) of one chunk, or None when the
    chunk is not plain text, does not hold one row per line (a blank line, which pyarrow skips, or a
    quoted newline) or breaks the step rule: the pure-Python reader decides those."""
    lines = _plain_lines(chunk)
    if lines is None:
        return None
    lines += chunk[-1:] != b"\n"  # a last line without its newline
    table = pacsv.read_csv(
        pa.py_buffer(chunk), read_options=pacsv.ReadOptions(column_names=names, use_threads=False), **options
    )
    if table.num_rows != lines:
        return None
    steps, step_valid = _column_numpy(table.column(names[0]))
    steps = _steps_int(steps) if step_valid is None else None
    if steps is None:
        return None
    vals, val_valid = _column_numpy(table.column(names[col]))
    return steps, vals, val_valid


def _map_chunks(fn, chunks: list) -> list:
    """``fn`` of each chunk, the first in this thread and the rest in threads of ours."""
    if len(chunks) == 1:
        return [fn(chunks[0])]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(chunks) - 1, thread_name_prefix="llm-refine-read") as pool:
        rest = [pool.submit(fn, c) for c in chunks[1:]]
        out = [fn(chunks[0])]
        return out + [f.result() for f in rest]


def _map_file(path: Path):
    """The file's bytes as a read-only memory map, or None (empty or not mappable)."""
    import mmap

    try:
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):  # ValueError: an empty file
        return None


def _mapped_text(path: Path):
    """(pyarrow modules, the file's memory map) for the fast path, or None: no pyarrow, an empty
    or unmappable file, or a BOM (the pure-Python reader handles or names those)."""
    mods = _arrow()
    if mods is None:
        return None
    buf = _map_file(path)
    if buf is None or buf[:3] == b"\xef\xbb\xbf" or buf[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return None
    return mods, buf


def _reads_alike(part: bytes) -> bool:
    """Whether a line the chunks do not cover (a header, a torn tail) is UTF-8 with no NUL and no
    line end only Python's splitlines knows, so the pure-Python reader would see it as one line."""
    if b"\x00" in part or any(b in part for b in _ODD_LINE_ENDS + _ODD_LINE_ENDS_UTF8):
        return False
    try:
        part.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _joined(parts: list) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(steps, values, validity or None) of the chunks' (steps, values, validity or None, ...)
    in file order; the values are a copy that owns its memory."""
    steps = np.concatenate([p[0] for p in parts])
    vals = np.concatenate([p[1] for p in parts])
    if all(p[2] is None for p in parts):
        return steps, vals, None
    return steps, vals, np.concatenate([np.ones(p[1].size, bool) if p[2] is None else p[2] for p in parts])


def _read_csv_arrow(path: Path, column: str | None, delimiter: str):
    mapped = _mapped_text(path)
    if mapped is None:
        return None
    (pa, pacsv, _), buf = mapped
    nl = buf.find(b"\n")
    if nl <= 0 or not _reads_alike(buf[:nl]):
        return None
    first = buf[:nl].rstrip(b"\r").decode("utf-8")
    try:
        row = next(csv.reader([first], delimiter=delimiter))
    except (csv.Error, StopIteration):
        return None
    if not row or not any(c.strip() for c in row):
        return None  # leading blank line: the pure-Python reader skips it
    has_header = any(_to_float(c) is None for c in row)
    header = [c.strip() for c in row] if has_header else [f"col{i}" for i in range(len(row))]
    if not has_header and column is not None:
        return None
    try:
        col = _pick_column(header, column, path)
    except UserError:
        return None
    if col == 0:
        return None
    names = [f"c{i}" for i in range(len(row))]
    start = nl + 1 if has_header else 0
    # No quote in the rows (a plain 2-column file): quote handling changes nothing, and without
    # it pyarrow's tokenizer is ~15% faster (one memchr over the file to know).
    quoted = buf.find(b'"', start) >= 0
    options = dict(
        parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=False,
                                         quote_char='"' if quoted else False),
        convert_options=pacsv.ConvertOptions(
            include_columns=[names[0], names[col]],
            column_types={names[0]: pa.float64(), names[col]: pa.float64()},
            null_values=[""],
            quoted_strings_can_be_null=True,
            strings_can_be_null=False,
        ),
    )
    chunks = _line_chunks(buf, start)
    if not chunks:
        return None  # a header and no rows: the pure-Python reader says what is missing
    try:
        parts = _map_chunks(lambda c: _csv_chunk_columns(pa, pacsv, c, names, col, options), chunks)
    except (pa.ArrowException, ValueError, OverflowError):
        return None
    finally:
        del chunks
    if any(p is None for p in parts):
        return None
    steps, vals, valid = _joined(parts)
    if valid is not None:  # W&B leaves a cell empty where that run logged nothing at this step
        return steps[valid], vals[valid], header[col]
    return steps, vals, header[col]


def _plain_or_utf8(view) -> int | None:
    """The number of LF-ended lines of ``view`` when it is text the pyarrow path may read: plain
    ASCII (`_plain_lines`, two numpy passes), or else valid UTF-8 without a line end that only
    Python's splitlines knows (`_clean_utf8`, for a header naming a run in any script)."""
    lines = _plain_lines(view)
    if lines is None:
        data = bytes(view)
        if not _clean_utf8(data):
            return None
        lines = data.count(b"\n")
    return lines


def _read_jsonl_arrow(path: Path, key: str) -> NormTrace | None:
    mapped = None if key in ("step", "skipped") else _mapped_text(path)
    if mapped is None:
        return None
    (pa, _, pajson), buf = mapped
    torn = buf[-1:] != b"\n"
    end = buf.rfind(b"\n") + 1 if torn else len(buf)  # a torn last line is left out (zero-copy)
    meta: dict = {}
    nl = buf.find(b"\n")
    try:
        head = json.loads(buf[:nl]) if nl > 0 else None
    except (json.JSONDecodeError, RecursionError, UnicodeDecodeError):
        return None
    start = 0
    if isinstance(head, dict) and "format" in head and "step" not in head:
        m = head.get("meta", {})
        meta = dict(m) if isinstance(m, dict) else {}
        start = nl + 1
    if end <= start:
        return None
    if not (_reads_alike(buf[:start]) and _reads_alike(buf[end:])):  # the header line and a torn tail
        return None
    schema = pa.schema([("step", pa.float64()), (key, pa.float64()), ("skipped", pa.bool_())])
    options = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore", newlines_in_values=False)

    def columns(chunk):
        """(int64 steps, values, validity or None, skipped mask) of one chunk, or None (the
        pure-Python reader decides: not plain text, a blank line or two records on one line, a
        step that breaks the step rule)."""
        n_lines = _plain_or_utf8(chunk)
        if not n_lines:
            return None
        table = pajson.read_json(pa.BufferReader(pa.py_buffer(chunk)),  # the mapped file itself: no copy
                                 read_options=pajson.ReadOptions(use_threads=False), parse_options=options)
        if table.num_rows != n_lines:
            return None
        steps, step_valid = _column_numpy(table.column("step"))
        steps = _steps_int(steps) if step_valid is None else None
        if steps is None:
            return None
        vals, val_valid = _column_numpy(table.column(key))
        return steps, vals, val_valid, _bool_numpy(table.column("skipped"))

    chunks = _line_chunks(buf, start, end)
    try:
        parts = _map_chunks(columns, chunks)
    except (pa.ArrowException, ValueError, OverflowError):
        return None
    finally:
        del chunks
    if any(p is None for p in parts):
        return None
    steps, vals, valid = _joined(parts)
    skipped = np.concatenate([p[3] for p in parts])
    keep = ~skipped
    if valid is not None and not valid[keep].all():
        return None  # a null or a missing key: the pure-Python reader tells them apart
    if torn:
        warnings.warn(f"{path}: ignoring a torn last line (the run was interrupted mid-write)")
    n_skipped = int(skipped.sum())
    steps, vals = (steps[keep], vals[keep]) if n_skipped else (steps, vals)
    return NormTrace(steps, vals, str(path), key, meta, n_skipped)


NPY_MAGIC = b"\x93NUMPY"


def read_npy(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(len(NPY_MAGIC))
    if magic != NPY_MAGIC:
        raise UserError(f"{path}: not a .npy file (no NumPy header); save the norms with numpy.save, or name a text file .csv")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises several types for a bad file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a readable .npy array ({first}); save it with numpy.save") from None
    if arr.dtype.kind not in "iuf":
        raise UserError(f"{path}: holds {arr.dtype} data, not numbers; save the norms as a float array with numpy.save")
    if arr.ndim == 1:
        return np.arange(arr.size, dtype=np.int64), arr.astype(np.float64)
    if arr.ndim == 2 and arr.shape[1] == 2:
        st = arr[:, 0].astype(np.float64)
        bad = ~np.isfinite(st) | (st != np.floor(st)) | (np.abs(st) >= MAX_STEP)
        if bad.any():
            i = int(np.argmax(bad))
            raise UserError(f"{path}: row {i}: step {arr[i, 0]!r} {_step_problem(float(st[i]))}")
        return st.astype(np.int64), arr[:, 1].astype(np.float64)
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
    if not path.is_file():
        raise UserError(f"{path}: is not a regular file; pass the history file itself")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _jsonl_trace(path, column or norm)
    if suffix in (".csv", ".tsv", ".txt"):
        steps, vals, col = read_csv(path, column)
        return NormTrace(steps, vals, str(path), col)
    if suffix == ".npy":
        if column is not None:
            raise UserError(f"{path}: .npy files have no named columns; drop --column")
        steps, vals = read_npy(path)
        return NormTrace(steps, vals, str(path), "value")
    raise UserError(f"{path}: unknown history format {suffix!r}; use .jsonl, .csv, .tsv or .npy")
