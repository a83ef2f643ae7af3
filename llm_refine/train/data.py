"""Pretraining data: documents → tokens → fixed-length packed sequences, cached, in a fixed order.

Sources (``DataConfig.source``):

- ``embedded`` (default, no download): the Python standard library's own ``.py`` sources, which
  ship with every Python — a few MB of real, varied text (code, docstrings, comments). Files are
  taken in an order fixed by a hash of their relative path until the character budget is met, and
  a file goes to validation or training by another hash of its path, so the split never changes.
- ``files``: local files or directories (or a glob): C4's format (``.json``/``.jsonl`` with a
  ``text`` field, optionally ``.gz``), plain text (``.txt``/``.md``: one document per blank-line
  separated paragraph block) and parquet (a ``text`` column). Held-out documents are chosen by a
  hash of (file, index) unless ``val_path`` names separate validation files.
- ``c4``: ``datasets.load_dataset("allenai/c4", "en", streaming=True)``: the first documents of the
  ``train`` split up to the budget, validation from its ``validation`` split.

Every document is tokenized, followed by the end-of-sequence id, concatenated, and cut into rows of
``seq_len`` tokens (the tail that does not fill a row is dropped), streaming: documents are read,
tokenized and written in batches, so a corpus of many GB never has to fit in memory. The packed
rows are cached under ``$LLM_REFINE_CACHE/data/<key>/`` (``train.bin``, ``val.bin``, ``meta.json``
written last) where the key hashes the documents (their content for the embedded corpus; path,
size and mtime for local files; the dataset name and budget for C4), the tokenizer's fingerprint
and every setting, so a cached load is a memory map (milliseconds).

Order: `PackedDataset` presents the training rows as one long sequence of epochs, each a
permutation drawn from ``(seed, epoch)``. The Trainer reads it sequentially (see
`llm_refine.train.pretrain`), and accelerate hands each rank consecutive per-device batches, so the
global batch of optimizer step k is rows [k·B, (k+1)·B) of that sequence whatever the number of
processes: runs that differ only in schedule — or in world size — see identical batches.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import logging
import os
import shutil
import sysconfig
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..errors import UserError
from ..fileio import atomic_write_json
from .config import SOURCES, DataConfig  # noqa: F401  (DataConfig is part of this module's API)
from .tokenizer import Tokenizer, cache_dir, get_tokenizer, load_hf_tokenizer, load_sentencepiece

TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
logger = logging.getLogger(__name__)
DATA_FORMAT_VERSION = 2  # bump when packing changes, to invalidate old caches


@dataclass
class PackedData:
    train: np.ndarray  # (n_train, seq_len) token ids
    val: np.ndarray  # (val_sequences, seq_len): the fixed held-out set
    tokenizer: Tokenizer
    meta: dict = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


# ---------------------------------------------------------------------------------------------
# Documents


def _hash_int(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(parts).encode()).digest()[:8], "big")


def is_validation(key: str, fraction: float) -> bool:
    """Whether the document named ``key`` is held out: a fixed function of the key alone."""
    return _hash_int("split", key) % 1_000_000 < fraction * 1_000_000


# Stdlib parts that are not representative text (tests, vendored tools, generated tables).
_EMBEDDED_SKIP = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idlelib", "lib2to3",
                  "ensurepip", "turtledemo", "lib-dynload", "encodings", "config"}


def embedded_files() -> list[tuple[str, Path]]:
    """(relative path, path) of the standard library's .py files, in a fixed hashed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in _EMBEDDED_SKIP and not x.startswith((".", "config-"))]
        for f in files:
            if f.endswith(".py"):
                p = Path(d) / f
                found.append((p.relative_to(root).as_posix(), p))
    if not found:
        raise UserError(f"no standard library sources under {root}; use data.source=files with data.path")
    found.sort(key=lambda kp: (_hash_int("order", kp[0]), kp[0]))
    return found


Doc = tuple[str, str, bool]  # (key, text, is held out)


def _take(docs: Iterable[tuple[str, str]], budget: int | None) -> Iterator[tuple[str, str]]:
    """Documents until ``budget`` characters have been taken (lazily: a stream stops early)."""
    total = 0
    for key, text in docs:
        if budget is not None and total >= budget:
            return
        yield key, text
        total += len(text)


def _interleaved(docs: Iterable[tuple[str, str]], cfg: "DataConfig") -> Iterator[Doc]:
    """Split one stream by the hash of each key, each side up to its budget."""
    nt = nv = 0
    for key, text in docs:
        done_t = cfg.max_train_chars is not None and nt >= cfg.max_train_chars
        done_v = cfg.max_val_chars is not None and nv >= cfg.max_val_chars
        if done_t and done_v:
            return
        if is_validation(key, cfg.val_fraction):
            if not done_v:
                nv += len(text)
                yield key, text, True
        elif not done_t:
            nt += len(text)
            yield key, text, False


def _embedded_stream(cfg: "DataConfig") -> Iterator[Doc]:
    files = embedded_files()
    return _interleaved(((rel, path.read_text(encoding="utf-8", errors="replace")) for rel, path in files), cfg)


def _embedded_docs(cfg: "DataConfig") -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(training, validation) documents of the embedded corpus, as lists."""
    train, val = [], []
    for key, text, held_out in _embedded_stream(cfg):
        (val if held_out else train).append((key, text))
    return train, val


def expand_paths(spec: str) -> list[Path]:
    """The data files that ``spec`` (a file, a directory — searched recursively — or a glob) names."""
    p = Path(spec).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = [f for f in sorted(p.rglob("*")) if f.is_file() and _supported(f)]
    else:
        files = [Path(f) for f in sorted(glob.glob(str(p), recursive=True)) if Path(f).is_file()]
        if not files:
            raise UserError(f"data path {spec} does not exist; give a file, a directory or a glob of data files")
    files = [f for f in files if _supported(f)]
    if not files:
        raise UserError(f"data path {spec} has no .json/.jsonl(.gz), .txt/.md or .parquet files")
    return files


def _supported(f: Path) -> bool:
    name = f.name.lower()
    return name.endswith(JSON_SUFFIXES + TEXT_SUFFIXES + (".parquet",))


def read_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """The documents of one local file, by its extension."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise UserError(f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names}); set data.text_field")
        for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
            yield from (t for t in batch.column(0).to_pylist() if t)
        return
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        if name.endswith(TEXT_SUFFIXES):
            block: list[str] = []
            for line in f:
                if line.strip():
                    block.append(line)
                elif block:
                    yield "".join(block)
                    block = []
            if block:
                yield "".join(block)
            return
        # C4 format: one JSON object per line. A .json file holding one JSON array also works.
        first = f.read(1)
        while first and first.isspace():
            first = f.read(1)
        if first == "[":
            items = json.loads(first + f.read())
            lines: Iterable = (json.dumps(x) for x in items)
        else:
            lines = _prepend(first, f)
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {i + 1} is not JSON ({e.msg}); C4-format files hold one JSON object per line") from None
            if not isinstance(obj, dict) or text_field not in obj:
                raise UserError(f"{path}: line {i + 1} has no {text_field!r} field; set data.text_field")
            if obj[text_field]:
                yield obj[text_field]


def _prepend(first: str, f) -> Iterator[str]:
    rest = f.readline()
    yield first + rest
    yield from f


def _file_docs(spec: str, text_field: str) -> Iterator[tuple[str, str]]:
    files = expand_paths(spec)
    # Keys relative to the files' common folder: moving the data set does not change the split.
    root = Path(os.path.commonpath([str(f.resolve().parent) for f in files]))
    for path in files:
        rel = path.resolve().relative_to(root).as_posix()
        for i, text in enumerate(read_documents(path, text_field)):
            yield f"{rel}:{i}", text


def _files_stream(cfg: "DataConfig") -> Iterator[Doc]:
    if not cfg.val_path:
        yield from _interleaved(_file_docs(cfg.path, cfg.text_field), cfg)
        return
    for k, t in _take(_file_docs(cfg.path, cfg.text_field), cfg.max_train_chars):
        yield k, t, False
    for k, t in _take(_file_docs(cfg.val_path, cfg.text_field), cfg.max_val_chars):
        yield k, t, True


def _c4_stream(cfg: "DataConfig") -> Iterator[Doc]:
    """C4 through ``datasets`` streaming: needs network (or the HF cache) the first time only."""
    if cfg.max_train_chars is None or cfg.max_val_chars is None:
        raise UserError("data.source 'c4' needs data.max_train_chars and data.max_val_chars (C4 is ~800 GB)")
    import datasets

    for split, budget, held_out in (("train", cfg.max_train_chars, False), ("validation", cfg.max_val_chars, True)):
        ds = datasets.load_dataset(cfg.c4_name, cfg.c4_config, split=split, streaming=True)
        for k, t in _take(((f"{split}:{i}", ex[cfg.text_field]) for i, ex in enumerate(ds)), budget):
            yield k, t, held_out


def document_stream(cfg: "DataConfig") -> Iterator[Doc]:
    """Every document of the run, once, in a fixed order, as (key, text, held out)."""
    if cfg.source == "embedded":
        return _embedded_stream(cfg)
    if cfg.source == "files":
        return _files_stream(cfg)
    return _c4_stream(cfg)


# ---------------------------------------------------------------------------------------------
# Fingerprints, packing and the cache


def _source_fingerprint(cfg: "DataConfig") -> str:
    """Cheap where possible, so a cached load reads no (or little) text."""
    h = hashlib.sha256()
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("val_sequences",)}
    h.update(json.dumps(settings, sort_keys=True).encode())
    if cfg.source == "embedded":
        # Content hash: the corpus is a few MB (~50 ms to read), and the stdlib can differ between
        # Python builds of the same version.
        for key, text, held_out in _embedded_stream(cfg):
            h.update(f"{key}|{held_out}".encode())
            h.update(text.encode("utf-8", "surrogatepass"))
    elif cfg.source == "files":
        # Path, size and mtime: hashing a multi-GB data set on every start would defeat the cache.
        for spec in (cfg.path, cfg.val_path):
            if spec:
                for f in expand_paths(spec):
                    st = f.stat()
                    h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    # c4: the named dataset, its config and the budgets (in the settings) are the identity.
    return h.hexdigest()


def pack(token_lists: Iterable[list[int]], eos_id: int, seq_len: int, dtype) -> np.ndarray:
    """Concatenate documents (each followed by ``eos_id``) and cut into rows of ``seq_len``
    (the last partial row is dropped). `RowWriter` does the same in bounded memory."""
    chunks = []
    for ids in token_lists:
        chunks.append(np.asarray(ids, dtype=np.int64))
        chunks.append(np.asarray([eos_id], dtype=np.int64))
    flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    n = len(flat) // seq_len
    return flat[: n * seq_len].reshape(n, seq_len).astype(dtype)


class RowWriter:
    """Packs documents into a flat binary file of whole ``seq_len`` rows, ``flush_tokens`` at a
    time, so a multi-GB corpus never has to fit in memory."""

    def __init__(self, path: Path, eos_id: int, seq_len: int, dtype, flush_tokens: int = 1 << 22):
        self.path, self.eos, self.seq_len, self.dtype = Path(path), eos_id, seq_len, np.dtype(dtype)
        self.flush_tokens = flush_tokens
        self._f = open(self.path, "wb")
        self._pending: list[np.ndarray] = []
        self._n = 0
        self.rows = 0
        self.documents = 0

    def add(self, ids: list[int]) -> None:
        self._pending.append(np.asarray(ids, dtype=np.int64))
        self._pending.append(np.asarray([self.eos], dtype=np.int64))
        self._n += len(ids) + 1
        self.documents += 1
        if self._n >= self.flush_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        flat = np.concatenate(self._pending)
        n = len(flat) // self.seq_len
        self._f.write(flat[: n * self.seq_len].astype(self.dtype).tobytes())
        self.rows += n
        rest = flat[n * self.seq_len:]
        self._pending, self._n = ([rest] if len(rest) else []), len(rest)

    def close(self) -> int:
        self._flush()  # a tail shorter than a row stays unwritten
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return self.rows


def validation_rows(n_available: int, n_wanted: int) -> np.ndarray:
    """Indices of the fixed validation set: evenly spread over the held-out stream, so it covers
    many documents rather than the first one or two."""
    n = min(n_available, n_wanted)
    return np.unique(np.linspace(0, n_available - 1, n).round().astype(np.int64))


def _tokenizer_spec_fingerprint(cfg: "DataConfig") -> str:
    if cfg.tokenizer == "sentencepiece":
        return f"sentencepiece:{cfg.vocab_size}:{cfg.tokenizer_train_chars}"
    tok = load_sentencepiece(cfg.tokenizer) if cfg.tokenizer.endswith(".model") else load_hf_tokenizer(cfg.tokenizer)
    return tok.fingerprint


def _load_packed(entry: Path, cfg: "DataConfig") -> PackedData | None:
    """The cache entry's arrays as read-only memory maps (None if its tokenizer file is gone)."""
    meta = json.loads((entry / "meta.json").read_text())
    t = meta["tokenizer"]
    if not Path(t["path"]).exists():
        return None
    tok = load_sentencepiece(t["path"]) if t["kind"] == "sentencepiece" else load_hf_tokenizer(t["path"])
    dtype, L = np.dtype(meta["dtype"]), meta["seq_len"]
    train = np.memmap(entry / "train.bin", dtype=dtype, mode="r", shape=(meta["train_sequences"], L))
    val_all = np.memmap(entry / "val.bin", dtype=dtype, mode="r", shape=(meta["val_sequences_available"], L))
    val = np.asarray(val_all[validation_rows(len(val_all), cfg.val_sequences)])
    if len(val) < cfg.val_sequences:
        warnings.warn(f"only {len(val)} validation sequences available (data.val_sequences={cfg.val_sequences})")
    return PackedData(train, val, tok, meta)


def _build(cfg: "DataConfig", key: str, entry: Path) -> None:
    """Tokenize and pack every document into ``entry`` (train.bin, val.bin, meta.json last)."""
    tok = get_tokenizer(cfg.tokenizer, cfg.vocab_size, (t for _, t, v in document_stream(cfg) if not v),
                        max_chars=cfg.tokenizer_train_chars)
    dtype = np.uint16 if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    entry.mkdir(parents=True, exist_ok=True)
    writers = {False: RowWriter(entry / "train.bin", tok.eos_id, cfg.seq_len, dtype),
               True: RowWriter(entry / "val.bin", tok.eos_id, cfg.seq_len, dtype)}
    chars = 0
    next_report = 100_000_000
    batch: list[tuple[str, bool]] = []
    batch_chars = 0

    def flush_batch():
        for ids, (_, held_out) in zip(tok.encode([t for t, _ in batch]), batch):
            writers[held_out].add(ids)
        batch.clear()

    for _, text, held_out in document_stream(cfg):
        batch.append((text, held_out))
        batch_chars += len(text)
        chars += len(text)
        if len(batch) >= 512 or batch_chars >= 4_000_000:
            flush_batch()
            batch_chars = 0
        if chars >= next_report:  # large corpora: say that something is happening
            logger.info(f"[llm-refine data] {chars / 1e6:.0f} M characters tokenized")
            next_report += 100_000_000
    flush_batch()
    n_train, n_val = writers[False].close(), writers[True].close()
    if writers[False].documents == 0:
        raise UserError(f"no training documents found for data.source={cfg.source} (path {cfg.path}); check the data")
    if writers[True].documents == 0:
        raise UserError("no validation documents: raise data.val_fraction or give data.val_path")
    if n_train == 0:
        raise UserError(f"the training text packs into 0 sequences of {cfg.seq_len} tokens; give more text or lower data.seq_len")
    if n_val == 0:
        raise UserError(f"the validation text packs into 0 sequences of {cfg.seq_len} tokens; give more held-out text")
    meta = {
        "key": key,
        "format_version": DATA_FORMAT_VERSION,
        "source": cfg.source,
        "train_documents": writers[False].documents,
        "val_documents": writers[True].documents,
        "train_sequences": n_train,
        "val_sequences_available": n_val,
        "train_tokens": n_train * cfg.seq_len,
        "seq_len": cfg.seq_len,
        "dtype": np.dtype(dtype).name,
        "characters": chars,
        "tokenizer": tok.describe(),
    }
    atomic_write_json(entry / "meta.json", meta)  # last: its presence means the entry is complete


def prepare_data(cfg: "DataConfig", *, cache: bool = True) -> PackedData:
    """Tokenized, packed training rows and the fixed validation set for ``cfg``.

    Cached under ``$LLM_REFINE_CACHE/data/<key>`` (see the module docstring); ``cache=False``
    rebuilds in a temporary directory and returns in-memory arrays.
    """
    key = hashlib.sha256(
        f"v{DATA_FORMAT_VERSION}|{_source_fingerprint(cfg)}|{_tokenizer_spec_fingerprint(cfg)}".encode()
    ).hexdigest()[:24]
    root = cache_dir() / "data"
    entry = root / key
    if cache and (entry / "meta.json").is_file():
        loaded = _load_packed(entry, cfg)
        if loaded is not None:
            return loaded
    root.mkdir(parents=True, exist_ok=True)
    # Build in a private directory, then rename it into place: concurrent builders never see each
    # other's half-written files, and the first rename wins.
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))
    try:
        _build(cfg, key, tmp)
        if not cache:
            data = _load_packed(tmp, cfg)
            return PackedData(np.array(data.train), data.val, data.tokenizer, data.meta)
        if entry.exists() and (entry / "meta.json").is_file() and _load_packed(entry, cfg) is not None:
            return _load_packed(entry, cfg)  # another process finished first
        if entry.exists():
            shutil.rmtree(entry, ignore_errors=True)  # stale: its tokenizer file was deleted
        try:
            os.replace(tmp, entry)
        except OSError:
            pass  # another process finished first: use its entry
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _load_packed(entry, cfg)


# ---------------------------------------------------------------------------------------------
# Order


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of ``n`` training rows used in ``epoch``: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class PackedDataset:
    """Rows of a packed array as ``{"input_ids", "labels"}``, in a fixed order for ``seed``.

    Index i is row ``epoch_order(n, seed, i // n)[i % n]``; ``length`` (default: one epoch)
    may exceed ``n`` so a run longer than the data walks through fresh permutations without the
    Trainer's own epoch logic. With ``shuffle=False`` rows come in stored order (validation).
    """

    def __init__(self, rows: np.ndarray, seed: int = 0, length: int | None = None, shuffle: bool = True):
        self.rows = rows
        self.seed = seed
        self.shuffle = shuffle
        self.length = len(rows) if length is None else int(length)
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.length

    def row_index(self, i: int) -> int:
        n = len(self.rows)
        if not self.shuffle:
            return i % n
        epoch = i // n
        order = self._orders.get(epoch)
        if order is None:
            order = self._orders[epoch] = epoch_order(n, self.seed, epoch)
        return int(order[i % n])

    def __getitem__(self, i: int) -> dict:
        import torch

        if not 0 <= i < self.length:
            raise IndexError(i)
        ids = torch.from_numpy(np.asarray(self.rows[self.row_index(i)], dtype=np.int64))
        return {"input_ids": ids, "labels": ids}


def shard_indices(n: int, rank: int, world_size: int) -> range:
    """Rows a rank reads for one global batch of ``n`` consecutive rows when not using the Trainer
    (custom loops): rank r gets the r-th contiguous block, like accelerate's batch sharding."""
    if n % world_size:
        raise ValueError(f"global batch {n} is not divisible by world size {world_size}")
    per = n // world_size
    return range(rank * per, (rank + 1) * per)
