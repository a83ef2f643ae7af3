import json
import subprocess
import sys

import numpy as np
import pytest

from llm_refine.cli import main
from llm_refine.history import write_history


@pytest.fixture
def history(tmp_path):
    rng = np.random.default_rng(0)
    T = 400
    l1 = (1 + 3 * np.exp(-np.arange(T) / 20)) * rng.lognormal(0, 0.1, T)
    p = tmp_path / "gradnorms.jsonl"
    write_history(p, [{"step": s, "l1": float(l1[s]), "l2": float(l1[s] / 10)} for s in range(T)], {"engine": "single"})
    return p


def test_refine_show_plot(tmp_path, history, capsys):
    out = tmp_path / "s.json"
    png = tmp_path / "s.png"
    assert main(["refine", str(history), "--norm", "l1", "-o", str(out), "--plot", str(png)]) == 0
    art = json.loads(out.read_text())
    assert art["format"] == "llm-refine/schedule" and len(art["multipliers"]) == 400
    prov = art["provenance"]
    assert prov["source"] == str(history.resolve()) and len(prov["source_sha256"]) == 64
    assert prov["norm"] == "l1" and prov["tau"] == 0.1 and prov["T"] == 400 and prov["run_meta"] == {"engine": "single"}
    assert {"warmup_steps", "peak_step", "above_half_fraction", "final_anneal_steps", "degenerate"} <= set(art["diagnostics"])
    assert {"warmup_fraction", "power", "r2"} <= set(art["fit"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "peak at step" in shown and "R^2=" in shown
    png2 = tmp_path / "p.png"
    assert main(["plot", str(out), "-o", str(png2)]) == 0  # from the schedule's provenance
    assert png2.stat().st_size > 1000
    assert main(["plot", str(history), "--norm", "l2", "-o", str(tmp_path / "p2.png")]) == 0


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "llm_refine.cli", *args], capture_output=True, text=True)


def assert_user_error(r, *needles):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_error_missing_history(tmp_path):
    assert_user_error(run_cli("refine", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o.json")), "nope.jsonl", "no such file")


def test_error_bad_csv(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("step,val\n0,1\n1,x\n")
    assert_user_error(run_cli("refine", str(p), "-o", str(tmp_path / "o.json")), "bad.csv", "row 3")


def test_error_unknown_column(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("step,val\n" + "".join(f"{i},{i + 1}\n" for i in range(10)))
    assert_user_error(run_cli("refine", str(p), "--column", "gn", "-o", str(tmp_path / "o.json")), "a.csv", "--column")


def test_error_too_short_and_nonpositive(tmp_path):
    p = tmp_path / "short.csv"
    p.write_text("0,1\n1,2\n")
    assert_user_error(run_cli("refine", str(p), "-o", str(tmp_path / "o.json")), "short.csv", "at least 5")
    q = tmp_path / "zero.csv"
    q.write_text("".join(f"{i},{0 if i == 3 else 1}\n" for i in range(10)))
    assert_user_error(run_cli("refine", str(q), "-o", str(tmp_path / "o.json")), "zero.csv", "not positive")


def test_error_unsorted(tmp_path):
    p = tmp_path / "u.csv"
    p.write_text("0,1\n2,1\n1,1\n3,1\n4,1\n5,1\n")
    assert_user_error(run_cli("refine", str(p), "-o", str(tmp_path / "o.json")), "u.csv", "increasing order")


def test_error_negative_tau(tmp_path, history):
    assert_user_error(run_cli("refine", str(history), "--tau", "-1", "-o", str(tmp_path / "o.json")), "tau")


def test_error_show_bad_schedule(tmp_path):
    p = tmp_path / "s.json"
    p.write_text("{not json")
    assert_user_error(run_cli("show", str(p)), "s.json", "not valid JSON")
    p.write_text(json.dumps({"format": "llm-refine/gradnorms"}))
    assert_user_error(run_cli("show", str(p)), "s.json", "not a schedule file")
    p.write_text(json.dumps({"format": "llm-refine/schedule", "version": 1, "multipliers": [1, 2]}))
    assert_user_error(run_cli("show", str(p)), "s.json", "within [0, 1]")
    assert_user_error(run_cli("show", str(tmp_path / "none.json")), "none.json", "no such schedule file")


def test_error_plot_source_gone(tmp_path, history):
    out = tmp_path / "s.json"
    assert main(["refine", str(history), "-o", str(out)]) == 0
    history.unlink()
    assert_user_error(run_cli("plot", str(out), "-o", str(tmp_path / "x.png")), "s.json", "source history")


def test_error_output_not_written_on_bad_input(tmp_path):
    out = tmp_path / "keep.json"
    out.write_text("precious")
    p = tmp_path / "bad.csv"
    p.write_text("0,1\n")
    assert run_cli("refine", str(p), "-o", str(out)).returncode == 2
    assert out.read_text() == "precious"


def test_bad_option_is_usage_error():
    r = run_cli("refine")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_degenerate_warning_printed(tmp_path):
    t = np.linspace(0, 1, 500)
    p = tmp_path / "overfit.csv"
    p.write_text("".join(f"{i},{v}\n" for i, v in enumerate(np.exp(-12 * t**2))))
    r = run_cli("refine", str(p), "-o", str(tmp_path / "o.json"))
    assert r.returncode == 0
    assert "degenerate refinement" in r.stderr and "over-fits" in r.stderr
    assert "WARNING" in r.stdout
