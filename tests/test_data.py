"""Data: embedded corpus, local files in every supported format, C4 (mocked), tokenizers, packing,
the cache, the split and the order."""

from __future__ import annotations

import gzip
import json
import time

import numpy as np
import pytest

import _pretrain_common  # noqa: F401  (sets LLM_REFINE_CACHE for the session)
from llm_refine.train.data import (
    DataConfig,
    PackedDataset,
    _embedded_docs,
    embedded_files,
    epoch_order,
    is_validation,
    pack,
    prepare_data,
    read_documents,
    shard_indices,
    validation_rows,
)
from llm_refine.errors import UserError

SMALL = dict(max_train_chars=300_000, max_val_chars=60_000, vocab_size=512, tokenizer_train_chars=150_000)


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_REFINE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _docs(n: int = 120) -> list[str]:
    """Real text: paragraphs of the standard library's sources."""
    out = []
    for _, path in embedded_files():
        for para in path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
            if len(para) > 200:
                out.append(para)
            if len(out) == n:
                return out
    return out


def test_embedded_corpus_is_real_fixed_and_split():
    files = embedded_files()
    assert len(files) > 100 and files == embedded_files()
    train, val = _embedded_docs(DataConfig())
    train_keys, val_keys = {k for k, _ in train}, {k for k, _ in val}
    assert not train_keys & val_keys and val_keys
    assert all(is_validation(k, 0.05) for k in val_keys) and not any(is_validation(k, 0.05) for k in train_keys)
    total = sum(len(t) for _, t in train)
    assert 4_000_000 <= total <= 6_000_000  # a few MB: cheap to tokenize, enough not to over-fit
    assert any("def " in t for _, t in train[:20])


def test_default_data_packs_and_loads_from_cache_fast():
    cfg = DataConfig()
    first = prepare_data(cfg)
    t = time.perf_counter()
    again = prepare_data(cfg)
    elapsed = time.perf_counter() - t
    assert elapsed < 1.5, f"cached load took {elapsed:.2f}s"
    assert first.train.shape[1] == 128 and first.train.dtype == np.uint16
    # ~1.7M tokens: far more than the tiny recipe's 600 × 8 × 128 = 614k, so no epoch repeats.
    assert first.train.size > 1_000_000
    assert first.val.shape == (48, 128)
    assert np.array_equal(first.val, again.val) and np.array_equal(first.train[:50], again.train[:50])
    assert int(first.train.max()) < first.vocab_size == 2048
    assert first.meta["key"] == again.meta["key"]


def test_tokenizer_roundtrips_code_with_whitespace(own_cache):
    data = prepare_data(DataConfig(**SMALL))
    tok = data.tokenizer
    text = "def f(x):\n    return {'a': 1}  # ünïcode ✓\n\n\tpass\n"
    assert tok.decode(tok.encode([text])[0]) == text
    assert tok.vocab_size == 512 and tok.eos_id == 2
    # Cached by content: a second preparation reuses the same model file.
    models = list((own_cache / "tokenizers").glob("*.model"))
    prepare_data(DataConfig(**SMALL), cache=False)
    assert list((own_cache / "tokenizers").glob("*.model")) == models and len(models) == 1


def test_cache_key_follows_settings(own_cache):
    a = prepare_data(DataConfig(**SMALL))
    b = prepare_data(DataConfig(**{**SMALL, "seq_len": 64}))
    assert a.meta["key"] != b.meta["key"] and b.train.shape[1] == 64
    assert len(list((own_cache / "data").iterdir())) == 2


def test_pack_separates_documents_and_drops_the_tail():
    rows = pack([[5, 6, 7], [8], [9, 10, 11, 12]], eos_id=2, seq_len=4, dtype=np.uint16)
    assert rows.tolist() == [[5, 6, 7, 2], [8, 2, 9, 10]]


def test_validation_rows_are_spread_and_fixed():
    idx = validation_rows(1000, 5)
    assert idx.tolist() == [0, 250, 500, 749, 999]
    assert validation_rows(3, 48).tolist() == [0, 1, 2]


def _write_formats(tmp_path, docs):
    d = tmp_path / "corpus"
    d.mkdir()
    q = len(docs) // 4
    with open(d / "a.jsonl", "w") as f:
        for t in docs[:q]:
            f.write(json.dumps({"text": t, "url": "x", "timestamp": "y"}) + "\n")
    with gzip.open(d / "c4-train.00000-of-01024.json.gz", "wt") as f:
        for t in docs[q: 2 * q]:
            f.write(json.dumps({"text": t}) + "\n")
    (d / "b.txt").write_text("\n\n".join(docs[2 * q: 3 * q]) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs[3 * q:]}), d / "d.parquet")
    return d


def test_local_files_every_format(tmp_path, own_cache):
    docs = [d.strip("\n") + "\n" for d in _docs()]
    docs = [d for d in docs if "\n\n" not in d]
    corpus = _write_formats(tmp_path, docs)
    q = len(docs) // 4
    assert list(read_documents(corpus / "a.jsonl")) == docs[:q]
    assert list(read_documents(corpus / "c4-train.00000-of-01024.json.gz")) == docs[q: 2 * q]
    assert list(read_documents(corpus / "b.txt")) == docs[2 * q: 3 * q]
    assert list(read_documents(corpus / "d.parquet")) == docs[3 * q:]

    cfg = DataConfig(source="files", path=str(corpus), vocab_size=512, val_fraction=0.2, val_sequences=4, seq_len=64)
    data = prepare_data(cfg)
    assert data.meta["train_documents"] + data.meta["val_documents"] == len(docs)
    assert data.meta["val_documents"] > 0 and data.val.shape == (4, 64)
    # Same files, same split and rows (from the cache or not).
    again = prepare_data(cfg, cache=False)
    assert np.array_equal(data.train, again.train) and np.array_equal(data.val, again.val)


def test_separate_validation_files_and_globs(tmp_path, own_cache):
    docs = _docs(80)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:60]))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"content": t}) + "\n" for t in docs[60:]))
    with pytest.raises(UserError, match="no 'text' field; set data.text_field"):
        prepare_data(DataConfig(source="files", path=str(tmp_path / "val.jsonl"), vocab_size=512))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[60:]))
    cfg = DataConfig(source="files", path=str(tmp_path / "tr*.jsonl"), val_path=str(tmp_path / "val.jsonl"),
                     vocab_size=512, seq_len=64, val_sequences=8)
    data = prepare_data(cfg)
    assert data.meta["train_documents"] == 60 and data.meta["val_documents"] == 20


def test_data_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        prepare_data(DataConfig(source="files", path=str(tmp_path / "missing")))
    with pytest.raises(UserError, match="needs data.path"):
        DataConfig(source="files")
    with pytest.raises(UserError, match="source: 'hub' is not allowed; choose one of embedded, files, c4"):
        DataConfig(source="hub")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(UserError, match="line 2 is not JSON"):
        list(read_documents(tmp_path / "bad.jsonl"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="has no .json"):
        prepare_data(DataConfig(source="files", path=str(tmp_path / "empty")))


def test_hf_tokenizer_from_local_directory(tmp_path, own_cache):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    docs = _docs(80)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>").save_pretrained(tmp_path / "tok")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    cfg = DataConfig(source="files", path=str(tmp_path / "docs.jsonl"), tokenizer=str(tmp_path / "tok"),
                     val_fraction=0.2, seq_len=64, val_sequences=4)
    data = prepare_data(cfg)
    assert data.tokenizer.kind == "hf" and data.vocab_size == 500 and data.tokenizer.eos_id == 1
    assert int(data.train.max()) < 500
    with pytest.raises(UserError, match="tokenizer directory .* does not exist"):
        prepare_data(DataConfig(source="files", path=str(tmp_path / "docs.jsonl"), tokenizer=str(tmp_path / "nope")))


def test_c4_streaming_path_with_a_stand_in_loader(monkeypatch, own_cache):
    """The real ``load_dataset("allenai/c4", "en", streaming=True)`` call, answered locally."""
    import datasets

    docs = _docs(100)
    calls = []

    def fake_load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        part = docs[:80] if split == "train" else docs[80:]
        return iter({"text": t, "url": "u", "timestamp": "t"} for t in part)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig(source="c4", max_train_chars=10_000_000, max_val_chars=1_000_000, vocab_size=512,
                     seq_len=64, val_sequences=4, tokenizer_train_chars=20_000)
    data = prepare_data(cfg)
    # One pass over the start of `train` for the tokenizer sample, then train + validation.
    assert calls == [("allenai/c4", "en", "train", True), ("allenai/c4", "en", "train", True),
                     ("allenai/c4", "en", "validation", True)]
    assert data.meta["train_documents"] == 80 and data.meta["val_documents"] == 20
    prepare_data(cfg)  # cached: no second download
    assert len(calls) == 3
    with pytest.raises(UserError, match="needs data.max_train_chars"):
        prepare_data(DataConfig(source="c4", max_train_chars=None))


def test_order_is_a_seeded_permutation_per_epoch():
    rows = np.arange(40, dtype=np.uint16).reshape(10, 4)
    ds = PackedDataset(rows, seed=3, length=25)
    firsts = [int(ds[i]["input_ids"][0]) // 4 for i in range(25)]
    assert sorted(firsts[:10]) == list(range(10)) and sorted(firsts[10:20]) == list(range(10))
    assert firsts[:10] != firsts[10:20]  # each epoch its own permutation
    assert firsts == [int(PackedDataset(rows, seed=3, length=25)[i]["input_ids"][0]) // 4 for i in range(25)]
    assert firsts[:10] != epoch_order(10, 4, 0).tolist()
    item = ds[0]
    assert item["input_ids"].dtype.is_floating_point is False and item["labels"] is item["input_ids"]
    with pytest.raises(IndexError):
        ds[25]
    val = PackedDataset(rows, shuffle=False)
    assert [int(val[i]["input_ids"][0]) for i in range(10)] == list(range(0, 40, 4))


def test_shard_indices_split_a_global_batch():
    assert [list(shard_indices(8, r, 2)) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError):
        shard_indices(6, 0, 4)


def test_row_writer_streams_exactly_what_pack_computes(tmp_path):
    from llm_refine.train.data import RowWriter

    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 500, size=int(rng.integers(1, 90))).tolist() for _ in range(200)]
    w = RowWriter(tmp_path / "rows.bin", eos_id=2, seq_len=16, dtype=np.uint16, flush_tokens=50)
    for d in docs:
        w.add(d)
    rows = w.close()
    written = np.fromfile(tmp_path / "rows.bin", dtype=np.uint16).reshape(-1, 16)
    assert rows == len(written) and np.array_equal(written, pack(docs, 2, 16, np.uint16))
    assert w.documents == 200


def test_sentencepiece_training_is_deterministic(tmp_path, monkeypatch):
    from llm_refine.train.tokenizer import train_sentencepiece

    texts = [t for _, t in _embedded_docs(DataConfig(max_train_chars=200_000))[0]]
    fps = []
    for d in ("one", "two"):
        monkeypatch.setenv("LLM_REFINE_CACHE", str(tmp_path / d))
        fps.append(train_sentencepiece(texts, 512, max_chars=150_000).fingerprint)
    assert fps[0] == fps[1]
