"""A corpus of bad inputs through the real CLI, in-process (issue #12, acceptance).

Every history format (CSV, W&B CSV, TSV, JSONL, .npy) and the schedule file get malformed,
mis-encoded, mistyped and out-of-range inputs; each must exit 2 with exactly one stderr line that
names the file, without a traceback, and leave the output that already exists untouched (and no
new file, temp files included, in the directory).
"""

import io
import json

import numpy as np
import pytest

from llm_refine.cli import main


def rows(n=20, start=0):
    return "".join(f"{start + i},{1.0 + (i % 4) * 0.25}\n" for i in range(n))


def jl(*records):
    return "".join(json.dumps(r) + "\n" for r in records)


def good_records(n=20):
    return [{"step": i, "l1": 2.0 + i % 3, "l2": 0.5} for i in range(n)]


def npy_bytes(arr, allow_pickle=False):
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


# (file name, content, extra CLI args, text the error line must contain)
HISTORY_CORPUS = [
    # --- 2-column CSV
    ("empty.csv", b"", [], "empty"),
    ("blank.csv", b"\n\n  \n", [], "empty"),
    ("header_only.csv", b"step,value\n", [], "usable"),
    ("latin1.csv", "step,valeur é\n".encode("latin-1") + rows().encode(), [], "not UTF-8"),
    ("utf16.csv", ("step,value\n" + rows()).encode("utf-16"), [], "UTF-16"),
    ("utf16_nobom.csv", ("step,value\n" + rows()).encode("utf-16-le"), [], "NUL"),
    ("text_value.csv", b"step,val\n0,1\n1,x\n", [], "row 3"),
    ("frac_step.csv", b"0.5,1\n1.5,2\n", [], "whole number"),
    ("nan_step.csv", b"0,1\nnan,2\n", [], "whole number"),
    ("huge_step.csv", ("0,1\n1,1\n2,1\n3,1\n9223372036854775808,1\n").encode(), [], "below 2^53"),
    ("jump.csv", ("0,1\n1,1\n2,1\n3,1\n1000000000000,1\n").encode(), [], "limit"),
    ("one_col.csv", b"1\n2\n3\n4\n5\n6\n", [], "2 columns"),
    ("semicolon.csv", ("step;value\n" + rows().replace(",", ";")).encode(), [], "semicolons"),
    ("tabs.csv", rows().replace(",", "\t").encode(), [], ".tsv"),
    ("zero.csv", rows().replace("\n3,1.75\n", "\n3,0\n").encode(), [], "not positive"),
    ("negative.csv", rows().replace("\n3,1.75\n", "\n3,-1\n").encode(), [], "not positive"),
    ("unsorted.csv", b"0,1\n2,1\n1,1\n3,1\n4,1\n5,1\n", [], "increasing order"),
    ("short.csv", b"0,1\n1,2\n", [], "at least 5"),
    ("all_nan.csv", "".join(f"{i},nan\n" for i in range(10)).encode(), [], "usable"),
    ("all_inf.csv", "".join(f"{i},inf\n" for i in range(10)).encode(), [], "usable"),
    ("ragged.csv", b"step,a,b\n0,1,2\n1,1\n", ["--column", "b"], "row 3"),
    ("garbage.csv", bytes(range(256)) * 4, [], "latin1"),
    ("no_header_column.csv", rows().encode(), ["--column", "gnorm"], "no header"),
    # --- W&B export
    ("wandb.csv", ('"Step","run - gnorm"\n' + "".join(f'"{i}","{1 + i % 3}"\n' for i in range(20))).encode(), ["--column", "nope"], "no column named"),
    ("wandb_empty_col.csv", ('"Step","run - gnorm"\n' + "".join(f'"{i}",""\n' for i in range(20))).encode(), [], "usable"),
    ("wandb_text_step.csv", ('"Step","run - gnorm"\n"a","1"\n').encode(), [], "row 2"),
    ("wandb_latin1.csv", ('"Step","run - gnorm é"\n' + "".join(f'"{i}","{1 + i % 3}"\n' for i in range(9))).encode("latin-1"), [], "not UTF-8"),
    # --- TSV
    ("commas.tsv", rows().encode(), [], ".csv"),
    ("frac.tsv", b"0.5\t1\n1.5\t2\n", [], "whole number"),
    ("latin1.tsv", "step\tvaleur é\n".encode("latin-1") + rows().replace(",", "\t").encode(), [], "not UTF-8"),
    ("text.tsv", b"step\tval\n0\tabc\n", [], "not a number"),
    # --- JSONL (the recorder's format)
    ("frac_step.jsonl", jl(*good_records(5), {"step": 10.5, "l1": 1.0}).encode(), [], "whole number"),
    ("string_value.jsonl", jl(*good_records(5), {"step": 5, "l1": "12.0"}).encode(), [], "a string"),
    ("bool_value.jsonl", jl(*good_records(5), {"step": 5, "l1": True}).encode(), [], "a boolean"),
    ("list_value.jsonl", jl(*good_records(5), {"step": 5, "l1": [1.0]}).encode(), [], "a list"),
    ("object_value.jsonl", jl(*good_records(5), {"step": 5, "l1": {"v": 1}}).encode(), [], "an object"),
    ("string_step.jsonl", jl({"step": "3", "l1": 1.0}).encode(), [], "a string"),
    ("bool_step.jsonl", jl({"step": True, "l1": 1.0}).encode(), [], "a boolean"),
    ("null_step.jsonl", jl({"step": None, "l1": 1.0}).encode(), [], "not a number"),
    ("huge_step.jsonl", jl(*good_records(5), {"step": 2**63, "l1": 1.0}).encode(), [], "below 2^53"),
    ("huge_float_step.jsonl", jl(*good_records(5), {"step": 1e300, "l1": 1.0}).encode(), [], "below 2^53"),
    ("jump.jsonl", jl(*good_records(5), {"step": 10**12, "l1": 1.0}).encode(), [], "limit"),
    ("no_step.jsonl", jl({"l1": 1.0}).encode(), [], '"step"'),
    ("no_key.jsonl", jl({"step": 0, "l2": 1.0}).encode(), [], "has no 'l1'"),
    ("bad_line.jsonl", (jl(*good_records(5)) + "not json\n" + jl(*good_records(3))).encode(), [], "line 6"),
    ("list_line.jsonl", b"[1, 2]\n", [], "not a JSON object"),
    ("deep.jsonl", b"[" * 100000 + b"]" * 100000 + b"\n", [], "line 1"),
    ("all_skipped.jsonl", jl(*[{"step": i, "skipped": True, "reason": "fp16 overflow"} for i in range(30)]).encode(), [], "skipped by the engine"),
    ("header_only.jsonl", jl({"format": "llm-refine/gradnorms", "version": 1, "meta": {}}).encode(), [], "usable"),
    ("latin1.jsonl", ('{"step": 0, "l1": 1.0, "note": "é"}\n').encode("latin-1"), [], "not UTF-8"),
    ("utf16.jsonl", jl(*good_records()).encode("utf-16"), [], "UTF-16"),
    ("zero.jsonl", jl(*good_records(5), {"step": 5, "l1": 0.0}).encode(), [], "not positive"),
    # --- .npy
    ("strings.npy", npy_bytes(np.array(["1.0", "2.0", "3.0", "4.0", "5.0"])), [], "not numbers"),
    ("bytes.npy", npy_bytes(np.array([b"a", b"b"])), [], "not numbers"),
    ("bools.npy", npy_bytes(np.ones(10, dtype=bool)), [], "not numbers"),
    ("complex.npy", npy_bytes(np.ones(10, dtype=complex)), [], "not numbers"),
    ("objects.npy", npy_bytes(np.array([1.0, None, 2.0], dtype=object), allow_pickle=True), [], "not a readable .npy"),
    ("text.npy", b"0,1\n1,2\n", [], "not a .npy file"),
    ("truncated.npy", npy_bytes(np.ones(100))[:90], [], "not a readable .npy"),
    ("cube.npy", npy_bytes(np.ones((2, 3, 4))), [], "shape"),
    ("frac_steps.npy", npy_bytes(np.array([[0.5, 1.0], [1.5, 2.0]])), [], "whole number"),
    ("zeros.npy", npy_bytes(np.zeros(10)), [], "not positive"),
    ("npy_column.npy", npy_bytes(np.ones(10)), ["--column", "x"], "no named columns"),
    # --- anything else
    ("x.parquet", b"PAR1", [], "unknown history format"),
]


def _run(capsys, tmp_path, argv, output):
    output.write_bytes(b"precious bytes")
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert output.read_bytes() == b"precious bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temp left
    return lines[0]


@pytest.mark.parametrize("command", ["refine", "plot"])
@pytest.mark.parametrize("name,content,extra,needle", HISTORY_CORPUS, ids=[c[0] for c in HISTORY_CORPUS])
def test_bad_history(tmp_path, capsys, command, name, content, extra, needle):
    p = tmp_path / name
    p.write_bytes(content)
    out = tmp_path / ("out.json" if command == "refine" else "out.png")
    line = _run(capsys, tmp_path, [command, str(p), *extra, "-o", str(out)], out)
    assert line.startswith(f"llm-refine {command}: error: ")
    assert name in line and needle in line, line


def schedule(**over):
    art = {"format": "llm-refine/schedule", "version": 1, "multipliers": [0.5, 1.0, 0.5, 0.0], "provenance": {}}
    art.update(over)
    return json.dumps(art).encode()


SCHEDULE_CORPUS = [
    ("notjson.json", b"{not json", "not valid JSON"),
    ("empty.json", b"", "not valid JSON"),
    ("list.json", b"[1, 0]", "top level"),
    ("other_format.json", json.dumps({"format": "something-else", "multipliers": [1, 0]}).encode(), "not a schedule file"),
    ("version.json", schedule(version=2), "version"),
    ("no_multipliers.json", schedule(multipliers=None), "multipliers"),
    ("one.json", schedule(multipliers=[1.0]), "at least 2"),
    ("zeros.json", schedule(multipliers=[0, 0, 0, 0]), "learning rate 0"),
    ("nested.json", schedule(multipliers=[[1.0], [0.5], [0.0]]), "a list"),
    ("strings.json", schedule(multipliers=["1", "0"]), "a string"),
    ("bools.json", schedule(multipliers=[True, False]), "a boolean"),
    ("nulls.json", schedule(multipliers=[1.0, None]), "not a number"),
    ("nan.json", b'{"format": "llm-refine/schedule", "version": 1, "multipliers": [1.0, NaN]}', "finite"),
    ("inf.json", b'{"format": "llm-refine/schedule", "version": 1, "multipliers": [1.0, 1e999]}', "finite"),
    ("above_one.json", schedule(multipliers=[1, 2]), "within [0, 1]"),
    ("negative.json", schedule(multipliers=[1, -0.5, 0]), "within [0, 1]"),
    ("prov_list.json", schedule(provenance=[1]), "provenance"),
    ("latin1.json", '{"format": "llm-refine/schedule", "note": "é"}'.encode("latin-1"), "not a text file"),
    ("deep.json", b"[" * 100000 + b"]" * 100000, "nested too deeply"),
]

# Valid for training and `show`, but `plot` needs the history the schedule came from.
PLOT_ONLY_CORPUS = [
    ("prov_null.json", schedule(provenance=None), "no provenance"),
    ("prov_missing.json", json.dumps({"format": "llm-refine/schedule", "version": 1, "multipliers": [1.0, 0.0]}).encode(), "no provenance"),
    ("source_gone.json", schedule(provenance={"source": "/nonexistent/h.csv"}), "is gone"),
]


@pytest.mark.parametrize("command", ["show", "plot"])
@pytest.mark.parametrize("name,content,needle", SCHEDULE_CORPUS, ids=[c[0] for c in SCHEDULE_CORPUS])
def test_bad_schedule(tmp_path, capsys, command, name, content, needle):
    p = tmp_path / name
    p.write_bytes(content)
    out = tmp_path / "out.png"
    argv = ["show", str(p)] if command == "show" else ["plot", str(p), "-o", str(out)]
    line = _run(capsys, tmp_path, argv, out)
    assert name in line and needle in line, line


@pytest.mark.parametrize("name,content,needle", PLOT_ONLY_CORPUS, ids=[c[0] for c in PLOT_ONLY_CORPUS])
def test_schedule_plot_needs_its_source(tmp_path, capsys, name, content, needle):
    p = tmp_path / name
    p.write_bytes(content)
    out = tmp_path / "out.png"
    line = _run(capsys, tmp_path, ["plot", str(p), "-o", str(out)], out)
    assert name in line and needle in line, line
    capsys.readouterr()
    assert main(["show", str(p)]) == 0  # the schedule itself is fine
    shown = capsys.readouterr().out
    assert ("source     ?" in shown) == (needle == "no provenance")


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["refine"], "required"),
        (["refine", "x.csv", "--tau", "abc", "-o", "o.json"], "invalid float"),
        (["nosuchcommand"], "invalid choice"),
        (["plot", "x.csv", "--norm", "l3", "-o", "o.png"], "invalid choice"),
    ],
)
def test_usage_errors_are_one_line(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and needle in err and "--help" in err, err
