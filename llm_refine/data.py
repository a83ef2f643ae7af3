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
``seq_len`` tokens (the tail that does not fill a row is dropped). The packed arrays are cached
under ``$LLM_REFINE_CACHE/data/<key>/`` where the key hashes the documents (their content for the
embedded corpus; path, size and mtime for local files; the dataset name and budget for C4), the
tokenizer's fingerprint and every setting, so a cached load is one ``np.load`` of a memory map.

Order: `PackedDataset` presents the training rows as one long sequence of epochs, each a
permutation drawn from ``(seed, epoch)``. The Trainer reads it sequentially (see
`llm_refine.pretrain`), and accelerate hands each rank consecutive per-device batches, so the
global batch of optimizer step k is rows [k·B, (k+1)·B) of that sequence whatever the number of
processes: runs that differ only in schedule — or in world size — see identical batches.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import sysconfig
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .errors import UserError
from .fileio import atomic_write_json
from .tokenizer import Tokenizer, cache_dir, get_tokenizer, load_hf_tokenizer, load_sentencepiece

SOURCES = ("embedded", "files", "c4")
TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
DATA_FORMAT_VERSION = 1  # bump when packing changes, to invalidate old caches


@dataclass
class DataConfig:
    source: str = "embedded"
    path: str | None = None  # files: a file, a directory or a glob
    val_path: str | None = None  # files: separate validation files (else a hashed split of path)
    text_field: str = "text"
    seq_len: int = 128
    val_fraction: float = 0.05  # share of documents held out (embedded, files without val_path)
    val_sequences: int = 48  # size of the fixed validation set, in sequences
    max_train_chars: int | None = 5_000_000  # budget of training text; None: everything
    max_val_chars: int | None = 400_000
    tokenizer: str = "sentencepiece"  # "sentencepiece" (trained here), a .model file, or an HF tokenizer dir
    vocab_size: int = 2048  # for a trained sentencepiece model
    tokenizer_train_chars: int = 2_000_000  # sentencepiece trains on this much of the training text
    c4_name: str = "allenai/c4"
    c4_config: str = "en"

    def __post_init__(self):
        if self.source not in SOURCES:
            raise UserError(f"unknown data.source {self.source!r}; choose one of {', '.join(SOURCES)}")
        if self.source == "files" and not self.path:
            raise UserError("data.source 'files' needs data.path: a file, directory or glob of .jsonl/.json.gz/.txt/.parquet")
        if self.seq_len < 2:
            raise UserError(f"data.seq_len must be >= 2, got {self.seq_len}")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.val_sequences < 1:
            raise UserError(f"data.val_sequences must be >= 1, got {self.val_sequences}")


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


def _take(docs: Iterable[tuple[str, str]], budget: int | None) -> list[tuple[str, str]]:
    out, total = [], 0
    for key, text in docs:
        if budget is not None and total >= budget:
            break
        out.append((key, text))
        total += len(text)
    return out


def _embedded_docs(cfg: DataConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    train, val = [], []
    nt = nv = 0
    for rel, path in embedded_files():
        if cfg.max_train_chars is not None and nt >= cfg.max_train_chars and \
                cfg.max_val_chars is not None and nv >= cfg.max_val_chars:
            break
        text = path.read_text(encoding="utf-8", errors="replace")
        if is_validation(rel, cfg.val_fraction):
            if cfg.max_val_chars is None or nv < cfg.max_val_chars:
                val.append((rel, text))
                nv += len(text)
        elif cfg.max_train_chars is None or nt < cfg.max_train_chars:
            train.append((rel, text))
            nt += len(text)
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

        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise UserError(f"{path}: no column {text_field!r} (columns: {table.column_names}); set data.text_field")
        yield from (t for t in table.column(text_field).to_pylist() if t)
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


def _files_docs(cfg: DataConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    if cfg.val_path:
        return _take(_file_docs(cfg.path, cfg.text_field), cfg.max_train_chars), \
            _take(_file_docs(cfg.val_path, cfg.text_field), cfg.max_val_chars)
    train, val, nt, nv = [], [], 0, 0
    for key, text in _file_docs(cfg.path, cfg.text_field):
        done_t = cfg.max_train_chars is not None and nt >= cfg.max_train_chars
        done_v = cfg.max_val_chars is not None and nv >= cfg.max_val_chars
        if done_t and done_v:
            break
        if is_validation(key, cfg.val_fraction):
            if not done_v:
                val.append((key, text))
                nv += len(text)
        elif not done_t:
            train.append((key, text))
            nt += len(text)
    return train, val


def _c4_docs(cfg: DataConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """C4 through ``datasets`` streaming: needs network (or the HF cache) the first time only."""
    import datasets

    def stream(split: str, budget: int | None) -> list[tuple[str, str]]:
        if budget is None:
            raise UserError("data.source 'c4' needs data.max_train_chars and data.max_val_chars (C4 is ~800 GB)")
        ds = datasets.load_dataset(cfg.c4_name, cfg.c4_config, split=split, streaming=True)
        return _take(((f"{split}:{i}", ex[cfg.text_field]) for i, ex in enumerate(ds)), budget)

    return stream("train", cfg.max_train_chars), stream("validation", cfg.max_val_chars)


# ---------------------------------------------------------------------------------------------
# Fingerprints and the cache


def _source_fingerprint(cfg: DataConfig) -> tuple[str, object]:
    """(fingerprint, documents or None): cheap where possible so a cached load reads no text."""
    h = hashlib.sha256()
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("val_sequences",)}
    h.update(json.dumps(settings, sort_keys=True).encode())
    if cfg.source == "embedded":
        # Content hash: the corpus is a few MB, reading it costs ~50 ms, and the stdlib can differ
        # between Python builds of the same version.
        train, val = _embedded_docs(cfg)
        for key, text in train + val:
            h.update(key.encode())
            h.update(text.encode("utf-8", "surrogatepass"))
        return h.hexdigest(), (train, val)
    if cfg.source == "files":
        for spec in (cfg.path, cfg.val_path):
            if spec:
                for f in expand_paths(spec):
                    st = f.stat()
                    h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest(), None
    return h.hexdigest(), None  # c4: the named dataset and budgets are the identity


def _documents(cfg: DataConfig):
    if cfg.source == "embedded":
        return _embedded_docs(cfg)
    if cfg.source == "files":
        return _files_docs(cfg)
    return _c4_docs(cfg)


def pack(token_lists: Iterable[list[int]], eos_id: int, seq_len: int, dtype) -> np.ndarray:
    """Concatenate documents (each followed by ``eos_id``) and cut into rows of ``seq_len``."""
    chunks = []
    for ids in token_lists:
        chunks.append(np.asarray(ids, dtype=np.int64))
        chunks.append(np.asarray([eos_id], dtype=np.int64))
    flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    n = len(flat) // seq_len
    return flat[: n * seq_len].reshape(n, seq_len).astype(dtype)


def _tokenize(tok: Tokenizer, docs: list[tuple[str, str]], batch: int = 256) -> Iterator[list[int]]:
    for i in range(0, len(docs), batch):
        yield from tok.encode([t for _, t in docs[i: i + batch]])


def validation_rows(n_available: int, n_wanted: int) -> np.ndarray:
    """Indices of the fixed validation set: evenly spread over the held-out stream, so it covers
    many documents rather than the first one or two."""
    n = min(n_available, n_wanted)
    return np.unique(np.linspace(0, n_available - 1, n).round().astype(np.int64))


def _tokenizer_spec_fingerprint(cfg: DataConfig) -> str:
    if cfg.tokenizer == "sentencepiece":
        return f"sentencepiece:{cfg.vocab_size}:{cfg.tokenizer_train_chars}"
    tok = load_sentencepiece(cfg.tokenizer) if cfg.tokenizer.endswith(".model") else load_hf_tokenizer(cfg.tokenizer)
    return tok.fingerprint


def prepare_data(cfg: DataConfig, *, cache: bool = True) -> PackedData:
    """Tokenized, packed training rows and the fixed validation set for ``cfg`` (cached)."""
    source_fp, docs = _source_fingerprint(cfg)
    key = hashlib.sha256(
        f"v{DATA_FORMAT_VERSION}|{source_fp}|{_tokenizer_spec_fingerprint(cfg)}".encode()
    ).hexdigest()[:24]
    out = cache_dir() / "data" / key
    if cache and (out / "meta.json").is_file():
        meta = json.loads((out / "meta.json").read_text())
        tok_path = meta["tokenizer"]["path"]
        if Path(tok_path).exists():
            tok = load_sentencepiece(tok_path) if meta["tokenizer"]["kind"] == "sentencepiece" else load_hf_tokenizer(tok_path)
            train = np.load(out / "train.npy", mmap_mode="r")
            val_all = np.load(out / "val.npy", mmap_mode="r")
            val = np.asarray(val_all[validation_rows(len(val_all), cfg.val_sequences)])
            return PackedData(train, val, tok, meta)

    train_docs, val_docs = docs if docs is not None else _documents(cfg)
    if not train_docs:
        raise UserError(f"no training documents found for data.source={cfg.source} (path {cfg.path}); check the data")
    if not val_docs:
        raise UserError("no validation documents: raise data.val_fraction or give data.val_path")
    tok = get_tokenizer(cfg.tokenizer, cfg.vocab_size, (t for _, t in train_docs), max_chars=cfg.tokenizer_train_chars)
    dtype = np.uint16 if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    train = pack(_tokenize(tok, train_docs), tok.eos_id, cfg.seq_len, dtype)
    val_all = pack(_tokenize(tok, val_docs), tok.eos_id, cfg.seq_len, dtype)
    if len(train) == 0:
        raise UserError(f"the training text packs into 0 sequences of {cfg.seq_len} tokens; give more text or lower data.seq_len")
    if len(val_all) == 0:
        raise UserError(f"the validation text packs into 0 sequences of {cfg.seq_len} tokens; give more held-out text")
    if len(val_all) < cfg.val_sequences:
        warnings.warn(f"only {len(val_all)} validation sequences available (data.val_sequences={cfg.val_sequences})")
    meta = {
        "key": key,
        "source": cfg.source,
        "train_documents": len(train_docs),
        "val_documents": len(val_docs),
        "train_sequences": int(len(train)),
        "val_sequences_available": int(len(val_all)),
        "train_tokens": int(train.size),
        "seq_len": cfg.seq_len,
        "tokenizer": tok.describe(),
    }
    if cache:
        out.mkdir(parents=True, exist_ok=True)
        for name, arr in (("train", train), ("val", val_all)):
            tmp = out / f".{name}.{os.getpid()}.npy"
            np.save(tmp, arr)
            os.replace(tmp, out / f"{name}.npy")
        atomic_write_json(out / "meta.json", meta)  # last: its presence means the entry is complete
    val = val_all[validation_rows(len(val_all), cfg.val_sequences)]
    return PackedData(train, val, tok, meta)


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
