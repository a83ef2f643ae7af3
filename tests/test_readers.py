"""Vectorised history readers (issue #11): with pyarrow and without it, the same results, the same
warnings and the same errors; pyarrow stays optional."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from llm_refine import history
from llm_refine.errors import UserError
from llm_refine.history import load_trace, write_history

from test_bad_inputs import HISTORY_CORPUS

pytest.importorskip("pyarrow")


def read_both(path, **kw):
    """(pyarrow result, pure-Python result), each as (trace or error message, warning messages)."""
    out = []
    for engine in ("", "python"):
        os.environ["LLM_REFINE_READER"] = engine
        try:
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                try:
                    res = load_trace(path, **kw)
                except UserError as e:
                    res = f"UserError: {e}"
            out.append((res, [str(x.message) for x in w]))
        finally:
            os.environ.pop("LLM_REFINE_READER", None)
    return out


def assert_same(path, **kw):
    (a, wa), (b, wb) = read_both(path, **kw)
    assert wa == wb
    if isinstance(a, str) or isinstance(b, str):
        assert a == b
        return a
    np.testing.assert_array_equal(a.steps, b.steps)
    np.testing.assert_array_equal(a.values, b.values)  # NaN == NaN here
    assert a.steps.dtype == b.steps.dtype == np.int64 and a.values.dtype == b.values.dtype == np.float64
    assert (a.source, a.column, a.meta, a.skipped_steps) == (b.source, b.column, b.meta, b.skipped_steps)
    return a


@pytest.fixture
def arrow_calls(monkeypatch):
    """Counts the answers the pyarrow path gives (so a test sees it really was used)."""
    calls = {"csv": 0, "jsonl": 0}
    real_csv, real_jsonl = history._read_csv_arrow, history._read_jsonl_arrow

    def csv_(*a, **k):
        r = real_csv(*a, **k)
        calls["csv"] += r is not None
        return r

    def jsonl_(*a, **k):
        r = real_jsonl(*a, **k)
        calls["jsonl"] += r is not None
        return r

    monkeypatch.setattr(history, "_read_csv_arrow", csv_)
    monkeypatch.setattr(history, "_read_jsonl_arrow", jsonl_)
    return calls


GOOD = [
    ("plain.csv", "".join(f"{i},{1.0 + i % 7 / 3}\n" for i in range(300)), {}),
    ("header.csv", "step,gnorm\n" + "".join(f"{i * 10},{2.5e-3 * (1 + i % 5)}\n" for i in range(300)), {}),
    ("special.csv", "step,v\n0,1\n1,nan\n2,inf\n3,1e3\n4,+.5\n5,1.\n6,-inf\n7, 2\n", {}),
    ("crlf.csv", "step,v\r\n" + "".join(f"{i},{i + 1}\r\n" for i in range(20)), {}),
    ("wandb.csv", '"Step","run - train/grad_norm","run - train/grad_norm__MIN","run - other"\n'
     + "".join(f'"{i}","{1 + i % 3}","{i % 3}","{"" if i % 4 else i}"\n' if i % 5 else f'"{i}","","",""\n' for i in range(200)),
     {"column": "train/grad_norm"}),
    ("wandb_other.csv", '"Step","run - a","run - other"\n' + "".join(f'"{i}","1","{"" if i % 4 else i + 1}"\n' for i in range(50)), {"column": "run - other"}),
    ("utf8_header.csv", "step,norme é\n" + "".join(f"{i},{i + 1}\n" for i in range(20)), {}),
    ("float_steps.csv", "0.0,1\n1.0,2\n2e0,3\n", {}),
    ("padded_cells.csv", "step,v\n 0 , 1 \n1,2\n", {}),
    ("t.tsv", "step\tv\n" + "".join(f"{i}\t{i + 1}\n" for i in range(20)), {}),
    ("dup.csv", "0,1\n1,2\n1,3\n2,4\n", {}),
]


@pytest.mark.parametrize("name,content,kw", GOOD, ids=[g[0] for g in GOOD])
def test_good_csv_same_result_with_and_without_pyarrow(tmp_path, arrow_calls, name, content, kw):
    p = tmp_path / name
    p.write_text(content, encoding="utf-8", newline="")
    assert_same(p, **kw)
    assert arrow_calls["csv"] == 1  # the vectorised reader answered


def jl(records, header=True, meta=None):
    text = json.dumps({"format": "llm-refine/gradnorms", "version": 1, "meta": meta or {"engine": "ddp"}}) + "\n" if header else ""
    return text + "".join((json.dumps(r, allow_nan=True) if not isinstance(r, str) else r) + "\n" for r in records)


GOOD_JSONL = [
    ("recorder.jsonl", jl([{"step": i, "l1": 10.0 + i, "l2": 1.0 + i} for i in range(300)]), {}),
    ("l2.jsonl", jl([{"step": i, "l1": 10.0 + i, "l2": 1.0 + i} for i in range(30)]), {"norm": "l2"}),
    ("noheader.jsonl", jl([{"step": i, "l1": 1 + i % 3} for i in range(30)], header=False), {}),
    ("skipped.jsonl", jl([{"step": i, "l1": 2.0} if i % 7 else {"step": i, "skipped": True, "reason": "fp16 overflow"} for i in range(60)]), {}),
    ("extras.jsonl", jl([{"step": i, "l1": 2.0, "groups": {"l2": {"decay": [1, 2]}}, "note": "x"} for i in range(20)]), {}),
    ("nonfinite.jsonl", jl([{"step": i, "l1": float("nan") if i == 3 else float("inf") if i == 4 else 1.0} for i in range(20)]), {}),
    ("column.jsonl", jl([{"step": i, "l1": 1.0, "loss_scale_norm": 3.0 + i} for i in range(20)]), {"column": "loss_scale_norm"}),
    ("float_steps.jsonl", jl([{"step": float(i), "l1": 1.0} for i in range(20)]), {}),
    ("torn.jsonl", jl([{"step": i, "l1": 1.0} for i in range(20)]) + '{"step": 20, "l1"', {}),
    ("torn_valid.jsonl", jl([{"step": i, "l1": 1.0} for i in range(20)]) + '{"step": 20, "l1": 5.0}', {}),
    ("bad_meta.jsonl", json.dumps({"format": "llm-refine/gradnorms", "meta": [1]}) + "\n" + jl([{"step": 0, "l1": 1.0}], header=False), {}),
]


@pytest.mark.parametrize("name,content,kw", GOOD_JSONL, ids=[g[0] for g in GOOD_JSONL])
def test_good_jsonl_same_result_with_and_without_pyarrow(tmp_path, arrow_calls, name, content, kw):
    p = tmp_path / name
    p.write_text(content)
    tr = assert_same(p, **kw)
    assert not isinstance(tr, str)
    assert arrow_calls["jsonl"] == 1


FALLBACK = [  # well-formed, but only the pure-Python reader can tell what they mean
    ("blank_lines.jsonl", jl([{"step": 0, "l1": 1.0}]) + "\n\n" + jl([{"step": 1, "l1": 2.0}], header=False)),
    ("two_headers.jsonl", jl([{"step": 0, "l1": 1.0}]) + jl([{"step": 1, "l1": 2.0}])),
    ("null_value.jsonl", jl([{"step": 0, "l1": 1.0}, {"step": 1, "l1": None}, {"step": 2, "l1": 3.0}])),
    ("bom.csv", "\ufeffstep,v\n0,1\n1,2\n"),
    ("blank_first.csv", "\nstep,v\n0,1\n1,2\n"),
    ("underscores.csv", "step,v\n0,1_000\n1,2\n"),
    ("ragged_ok.csv", "step,a,b\n0,1,2,3\n1,1,2\n"),
    ("formfeed.csv", "0,1\x0c1,2\n2,3\n"),
]


@pytest.mark.parametrize("name,content", FALLBACK, ids=[f[0] for f in FALLBACK])
def test_odd_files_go_to_the_pure_python_reader(tmp_path, arrow_calls, name, content):
    p = tmp_path / name
    p.write_text(content, newline="")
    assert_same(p)
    assert arrow_calls["csv"] + arrow_calls["jsonl"] == 0


@pytest.mark.parametrize("name,content,extra,needle", HISTORY_CORPUS, ids=[c[0] for c in HISTORY_CORPUS])
def test_bad_inputs_give_the_same_error_with_and_without_pyarrow(tmp_path, name, content, extra, needle):
    p = tmp_path / name
    p.write_bytes(content)
    kw = {"column": extra[1]} if extra[:1] == ["--column"] else {}
    (a, wa), (b, wb) = read_both(p, **kw)
    assert (a if isinstance(a, str) else "ok") == (b if isinstance(b, str) else "ok")
    assert wa == wb


def test_large_file_same_result(tmp_path, arrow_calls):
    rng = np.random.default_rng(0)
    v = rng.lognormal(0, 1, 200_000)
    p = tmp_path / "big.csv"
    p.write_text("step,v\n" + "".join(f"{i},{x!r}\n" for i, x in enumerate(v.tolist())))
    tr = assert_same(p)
    np.testing.assert_array_equal(tr.values, v)  # repr round-trips exactly
    q = tmp_path / "big.jsonl"
    write_history(q, ({"step": i, "l1": x} for i, x in enumerate(v.tolist())))
    np.testing.assert_array_equal(assert_same(q).values, v)
    assert arrow_calls == {"csv": 1, "jsonl": 1}


def test_without_pyarrow_installed(tmp_path):
    """pyarrow is optional: with it unimportable, the readers fall back (and say nothing)."""
    p = tmp_path / "h.csv"
    p.write_text("step,v\n" + "".join(f"{i},{1 + i % 3}\n" for i in range(50)))
    q = tmp_path / "h.jsonl"
    write_history(q, [{"step": i, "l1": 1.0 + i % 3} for i in range(50)])
    code = (
        "import sys; sys.modules['pyarrow'] = None\n"
        "from llm_refine import history\n"
        f"a = history.load_trace({str(p)!r}); b = history.load_trace({str(q)!r})\n"
        "assert history._arrow() is None\n"
        "print(a.values.size, b.values.size, a.values.sum(), b.values.sum())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["50", "50", "99.0", "99.0"]


@pytest.fixture
def small_chunks(monkeypatch):
    """Make the CSV reader split even a tiny file into 4 chunks parsed in 3 threads of its own."""
    monkeypatch.setattr(history, "_MIN_CHUNK_BYTES", 1)
    monkeypatch.setattr(history, "_cores", lambda: 4)
    seen = []
    real = history._map_chunks
    monkeypatch.setattr(history, "_map_chunks", lambda fn, chunks: seen.append(len(chunks)) or real(fn, chunks))
    return seen


GOOD_CSV = [g for g in GOOD if g[0].endswith((".csv", ".tsv"))]


@pytest.mark.parametrize("name,content,kw", GOOD_CSV, ids=[g[0] for g in GOOD_CSV])
def test_good_csv_read_in_chunks_same_result(tmp_path, arrow_calls, small_chunks, name, content, kw):
    p = tmp_path / name
    p.write_text(content, encoding="utf-8", newline="")
    assert_same(p, **kw)
    assert arrow_calls["csv"] == 1 and small_chunks and small_chunks[0] > 1


def test_large_csv_in_chunks_no_row_lost_or_doubled(tmp_path, arrow_calls, small_chunks):
    v = np.random.default_rng(1).lognormal(0, 1, 5000)
    p = tmp_path / "big.csv"
    p.write_text("step,v\n" + "".join(f"{i},{x!r}\n" for i, x in enumerate(v.tolist())))
    tr = assert_same(p)
    np.testing.assert_array_equal(tr.steps, np.arange(5000))
    np.testing.assert_array_equal(tr.values, v)
    assert small_chunks == [4]


CHUNK_FALLBACK = [  # one row over two lines, a skipped blank line, a byte only Python reads: the pure-Python reader
    ("quoted_newline.csv", 'step,v\n0,1\n1,"2\n"\n2,3\n3,4\n4,5\n'),
    ("blank_middle.csv", "step,v\n0,1\n1,2\n\n2,3\n3,4\n"),
    ("blank_end.csv", "step,v\n0,1\n1,2\n2,3\n\n"),
    ("formfeed_late.csv", "step,v\n0,1\n1,2\n2,3\n3,4\x0c4,5\n"),
    ("nul_late.csv", "step,v\n0,1\n1,2\n2,3\n3,4\x005\n"),
    ("latin1_late.csv", "step,v\n0,1\n1,2\n2,3\n3,4\n4,\xe9\n"),
    ("lone_cr.csv", "step,v\n0,1\n1,2\r2,3\n3,4\n"),
]


@pytest.mark.parametrize("name,content", CHUNK_FALLBACK, ids=[c[0] for c in CHUNK_FALLBACK])
def test_odd_csv_in_chunks_goes_to_the_pure_python_reader(tmp_path, arrow_calls, small_chunks, name, content):
    p = tmp_path / name
    p.write_bytes(content.encode("latin-1"))
    assert_same(p)
    assert arrow_calls["csv"] == 0


def test_csv_chunks_end_after_a_newline():
    data = b"step,v\n" + b"".join(b"%d,%d\n" % (i, i) for i in range(1000))
    for cores in (1, 2, 3, 8):
        history._cores, real = (lambda: cores), history._cores
        try:
            chunks = history._line_chunks(data, 7)
        finally:
            history._cores = real
        assert b"".join(bytes(c) for c in chunks) == data[7:]
        assert all(bytes(c).endswith(b"\n") for c in chunks)


JSONL_EDGES = [  # the pure-Python reader's answer (an error or a warning) must not change with pyarrow
    ("torn_cut_utf8.jsonl", jl([{"step": i, "l1": 1.0} for i in range(5)]).encode() + '{"step": 5, "note": "é'.encode()[:-1]),
    ("torn_formfeed.jsonl", jl([{"step": i, "l1": 1.0} for i in range(5)]).encode() + b'{"step": 5,\x0c "l1"'),
    ("header_formfeed.jsonl", b'{"format": "llm-refine/gradnorms", "meta": {"x": "a\x0cb"}}\n' + jl([{"step": 0, "l1": 1.0}], header=False).encode()),
    ("utf8_meta.jsonl", jl([{"step": i, "l1": 1.0 + i} for i in range(5)], meta={"run": "学习率"}).encode()),
    ("utf8_body.jsonl", jl([{"step": i, "l1": 1.0 + i, "note": "é"} for i in range(5)]).encode()),
]


@pytest.mark.parametrize("name,content", JSONL_EDGES, ids=[c[0] for c in JSONL_EDGES])
def test_jsonl_edges_same_with_and_without_pyarrow(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content)
    assert_same(p)


def test_large_jsonl_in_chunks_same_result(tmp_path, arrow_calls, small_chunks):
    v = np.random.default_rng(2).lognormal(0, 1, 3000)
    q = tmp_path / "big.jsonl"
    recs = [{"step": i, "l1": x} if i % 11 else {"step": i, "skipped": True, "reason": "fp16 overflow"} for i, x in enumerate(v.tolist())]
    q.write_text(jl(recs) + '{"step": 3000, "l1"')  # and a torn last line
    tr = assert_same(q)
    keep = np.arange(3000) % 11 != 0
    np.testing.assert_array_equal(tr.steps, np.arange(3000)[keep])
    np.testing.assert_array_equal(tr.values, v[keep])
    assert tr.skipped_steps == int((~keep).sum()) and arrow_calls["jsonl"] == 1 and small_chunks == [4]
