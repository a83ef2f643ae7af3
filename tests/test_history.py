
import numpy as np
import pytest

from llm_refine.errors import UserError
from llm_refine.history import HistoryWriter, load_trace, read_jsonl, write_history


def recs(steps):
    return [{"step": s, "l1": 10.0 + s, "l2": 1.0 + s} for s in steps]


def test_writer_roundtrip_and_meta(tmp_path):
    p = tmp_path / "g.jsonl"
    with HistoryWriter(p, {"engine": "ddp", "world_size": 2}) as w:
        w.write(recs(range(5)))
        w.write([{"step": 5, "skipped": True, "reason": "fp16 overflow"}])
    meta, records = read_jsonl(p)
    assert meta == {"engine": "ddp", "world_size": 2}
    assert [r["step"] for r in records] == list(range(6))
    tr = load_trace(p, norm="l2")
    np.testing.assert_array_equal(tr.steps, np.arange(5))
    np.testing.assert_allclose(tr.values, 1.0 + np.arange(5))
    assert tr.skipped_steps == 1 and tr.meta["engine"] == "ddp"


def test_resume_drops_records_past_checkpoint(tmp_path):
    p = tmp_path / "g.jsonl"
    with HistoryWriter(p, {"a": 1}) as w:
        w.write(recs(range(10)))  # ran to step 9, but the checkpoint is at step 6 (steps 0..5)
    with HistoryWriter(p, {"a": 1}, resume_after_step=5) as w:
        w.write(recs(range(6, 12)))
    _, records = read_jsonl(p)
    assert [r["step"] for r in records] == list(range(12))


def test_torn_last_line_is_dropped(tmp_path):
    p = tmp_path / "g.jsonl"
    with HistoryWriter(p) as w:
        w.write(recs(range(3)))
    with open(p, "a") as f:
        f.write('{"step": 3, "l1": 1')  # crash mid-write
    with pytest.warns(UserWarning, match="torn"):
        tr = load_trace(p)
    assert list(tr.steps) == [0, 1, 2]
    with pytest.warns(UserWarning, match="torn"):
        with HistoryWriter(p) as w:
            w.write(recs([3]))
    assert [r["step"] for r in read_jsonl(p)[1]] == [0, 1, 2, 3]


def test_csv_two_columns_with_and_without_header(tmp_path):
    a = tmp_path / "a.csv"
    a.write_text("0,1.5\n1,2.5\n2,3.5\n")
    tr = load_trace(a)
    assert list(tr.steps) == [0, 1, 2] and list(tr.values) == [1.5, 2.5, 3.5]
    b = tmp_path / "b.csv"
    b.write_text("step,gnorm\n0,1.5\n1,2.5\n")
    assert load_trace(b).column == "gnorm"


def test_wandb_export(tmp_path):
    p = tmp_path / "w.csv"
    p.write_text(
        '"Step","run - sched/gnorm_l1","run - sched/gnorm_l1__MIN","run - sched/gnorm_l1__MAX","run - other"\n'
        '"0","5.0","5.0","5.0","1"\n"1","4.0","4.0","4.0",""\n"2","","","","3"\n"3","3.0","3.0","3.0","4"\n'
    )
    tr = load_trace(p)
    assert list(tr.steps) == [0, 1, 3] and list(tr.values) == [5.0, 4.0, 3.0]
    assert load_trace(p, column="sched/gnorm_l1").column == "run - sched/gnorm_l1"
    assert list(load_trace(p, column="run - other").values) == [1.0, 3.0, 4.0]
    with pytest.raises(UserError, match="no column named 'nope'"):
        load_trace(p, column="nope")


def test_npy(tmp_path):
    p = tmp_path / "n.npy"
    np.save(p, np.array([3.0, 2.0, 1.0]))
    assert list(load_trace(p).steps) == [0, 1, 2]
    q = tmp_path / "n2.npy"
    np.save(q, np.array([[10, 3.0], [20, 2.0]]))
    assert list(load_trace(q).steps) == [10, 20]
    r = tmp_path / "n3.npy"
    np.save(r, np.zeros((2, 3, 4)))
    with pytest.raises(UserError, match="shape"):
        load_trace(r)


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("bad.jsonl", '{"step": 0, "l1": 1}\nnot json\n', "line 2 is not valid JSON"),
        ("nostep.jsonl", '{"l1": 1}\n', 'no "step"'),
        ("empty.csv", "", "empty"),
        ("text.csv", "step,val\n0,abc\n", "not a number"),
        ("frac.csv", "0.5,1\n1.5,2\n", "whole numbers"),
        ("x.parquet", "x", "unknown history format"),
    ],
)
def test_reader_errors(tmp_path, name, content, match):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(UserError, match=match):
        load_trace(p)


def test_missing_key_and_file(tmp_path):
    p = tmp_path / "g.jsonl"
    write_history(p, [{"step": 0, "l2": 1.0}])
    with pytest.raises(UserError, match="has no 'l1'"):
        load_trace(p, norm="l1")
    with pytest.raises(UserError, match="no such file"):
        load_trace(tmp_path / "missing.jsonl")


def test_directory_with_gradnorms(tmp_path):
    write_history(tmp_path / "gradnorms.jsonl", recs(range(3)))
    assert load_trace(tmp_path).steps.size == 3


def test_tsv_is_tab_separated_and_a_utf8_bom_is_fine(tmp_path):
    t = tmp_path / "h.tsv"
    t.write_text("step\tgnorm\n0\t1.5\n1\t2.5\n")
    tr = load_trace(t)
    assert list(tr.steps) == [0, 1] and list(tr.values) == [1.5, 2.5] and tr.column == "gnorm"
    b = tmp_path / "bom.csv"
    b.write_bytes("\ufeffstep,gnorm\n0,1.5\n1,2.5\n".encode("utf-8"))
    assert load_trace(b).column == "gnorm"


def test_jsonl_null_norm_is_a_missing_value(tmp_path):
    p = tmp_path / "g.jsonl"
    write_history(p, [{"step": 0, "l1": 1.0}, {"step": 1, "l1": None}, {"step": 2, "l1": 3.0}])
    v = load_trace(p).values
    assert v[0] == 1.0 and np.isnan(v[1]) and v[2] == 3.0


@pytest.mark.parametrize(
    "record,match",
    [
        ({"step": 10.5, "l1": 1.0}, "whole number"),
        ({"step": 1, "l1": "12.0"}, "a string"),
        ({"step": 1, "l1": True}, "a boolean"),
        ({"step": 1, "l1": [1.0]}, "a list"),
        ({"step": 2**63, "l1": 1.0}, "below 2\\^53"),
    ],
)
def test_jsonl_numeric_policy(tmp_path, record, match):
    p = tmp_path / "g.jsonl"
    write_history(p, [{"step": 0, "l1": 1.0}, record])
    with pytest.raises(UserError, match=match):
        load_trace(p)
