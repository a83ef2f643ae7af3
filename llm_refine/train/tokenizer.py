"""Tokenizers for pretraining: a sentencepiece model trained on the run's own training text, or a
Hugging Face tokenizer from a local directory.

A trained sentencepiece model is cached by the sha256 of its training sample and options, so every
run of a sweep (and every rank) loads the same file instead of training again. Normalization is the
identity and whitespace is kept as is: the embedded corpus is Python source, where indentation is
content. ``byte_fallback`` makes every string encodable (no ``<unk>`` for rare characters).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import UserError


def cache_dir() -> Path:
    """Where llm-refine caches tokenizers and tokenized data: $LLM_REFINE_CACHE or ~/.cache/llm-refine."""
    root = os.environ.get("LLM_REFINE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llm-refine")
    return Path(root)


@dataclass
class Tokenizer:
    """What pretraining needs from a tokenizer: ids for texts, the vocabulary size, a document
    separator, and a fingerprint that changes whenever the ids would."""

    kind: str  # "sentencepiece" | "hf"
    path: str
    vocab_size: int
    eos_id: int
    fingerprint: str
    _impl: object = None

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        if self.kind == "sentencepiece":
            return self._impl.encode(list(texts))
        return self._impl(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self._impl.decode(list(ids))

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "fingerprint": self.fingerprint}


# Options that decide the trained model; part of the cache key.
_SP_OPTIONS = dict(
    model_type="bpe",
    character_coverage=0.9995,  # rare characters fall back to bytes
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    max_sentence_length=16384,
    num_threads=1,
    minloglevel=2,
)


def _sample_lines(texts: Iterable[str], max_chars: int) -> list[str]:
    """The first ``max_chars`` characters of ``texts``, as lines (sentencepiece's unit)."""
    lines: list[str] = []
    total = 0
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            lines.append(line)
            total += len(line) + 1
            if total >= max_chars:
                return lines
    return lines


def train_sentencepiece(texts: Iterable[str], vocab_size: int, *, max_chars: int = 2_000_000) -> Tokenizer:
    """A sentencepiece BPE model on (the first ``max_chars`` of) ``texts``, cached by content hash."""
    import sentencepiece as spm

    lines = _sample_lines(texts, max_chars)
    if not lines:
        raise UserError("the training text is empty: no tokenizer can be trained; check data.source / data.path")
    h = hashlib.sha256()
    h.update(json.dumps({"vocab_size": vocab_size, **_SP_OPTIONS}, sort_keys=True).encode())
    for line in lines:
        h.update(line.encode("utf-8", "surrogatepass"))
        h.update(b"\n")
    key = h.hexdigest()[:24]
    model_path = cache_dir() / "tokenizers" / f"sp-{vocab_size}-{key}.model"
    if not model_path.exists():
        model_path.parent.mkdir(parents=True, exist_ok=True)
        # Train into a private prefix, then rename: ranks (or runs) racing on the same key never see
        # a half-written model.
        tmp_prefix = model_path.parent / f".tmp-{key}-{os.getpid()}"
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_prefix=str(tmp_prefix), vocab_size=vocab_size, **_SP_OPTIONS
            )
        except RuntimeError as e:
            raise UserError(f"sentencepiece could not train a {vocab_size}-token vocabulary: {e}; "
                            "lower data.vocab_size or give more text") from None
        os.replace(f"{tmp_prefix}.model", model_path)
        for leftover in (f"{tmp_prefix}.vocab",):
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass
    return load_sentencepiece(model_path)


# Encoded by every fingerprint: catches normalization differences that the pieces alone do not show.
_PROBE = "Hello,  world!\n\tdef f(x):  return x ** 2  # ünïcödé ✓ 日本語 1234567 \u00a0\u2003end\n"


def _sp_fingerprint(sp) -> str:
    """What decides the ids: every piece with its score and type, and the ids of a probe string.
    (Not the file's bytes: a model file also records the path it was trained to.)"""
    h = hashlib.sha256()
    for i in range(sp.get_piece_size()):
        kind = (sp.is_control(i), sp.is_unknown(i), sp.is_unused(i), sp.is_byte(i))
        h.update(f"{sp.id_to_piece(i)}\t{sp.get_score(i)!r}\t{kind}\n".encode("utf-8", "surrogatepass"))
    h.update(json.dumps(sp.encode(_PROBE)).encode())
    return "sp:" + h.hexdigest()[:24]


def load_sentencepiece(path: str | os.PathLike) -> Tokenizer:
    import sentencepiece as spm

    path = Path(path)
    if not path.is_file():
        raise UserError(f"sentencepiece model {path} does not exist; give an existing .model file")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    eos = sp.eos_id()
    if eos < 0:
        raise UserError(f"sentencepiece model {path} has no end-of-sequence piece; train it with eos_id >= 0")
    return Tokenizer("sentencepiece", str(path), sp.get_piece_size(), eos, _sp_fingerprint(sp), sp)


def load_hf_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A Hugging Face tokenizer saved in a local directory (no hub access)."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise UserError(f"tokenizer directory {p} does not exist; give a local directory saved with save_pretrained()")
    tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    eos = tok.eos_token_id
    if eos is None:
        raise UserError(f"tokenizer {p} has no eos_token; set one (it separates packed documents)")
    h = hashlib.sha256()
    for f in sorted(p.iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return Tokenizer("hf", str(p), len(tok), int(eos), "hf:" + h.hexdigest()[:24], tok)


def get_tokenizer(spec: str, vocab_size: int, train_texts: Iterable[str], *, max_chars: int = 2_000_000) -> Tokenizer:
    """``spec`` is "sentencepiece" (train on ``train_texts``), a ``.model`` file, or an HF tokenizer dir."""
    if spec == "sentencepiece":
        return train_sentencepiece(train_texts, vocab_size, max_chars=max_chars)
    if spec.endswith(".model"):
        return load_sentencepiece(spec)
    return load_hf_tokenizer(spec)
