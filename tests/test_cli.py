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


# --- issue #12: plot draws the file it is given; show prints the file's real shape -------------


def _capture_plot(monkeypatch):
    import llm_refine.plotting as plotting

    seen = {}
    real = plotting.plot_refinement

    def spy(info, m, out, **kw):
        seen.update(info=info, m=np.asarray(m), out=str(out))
        return real(info, m, out, **kw)

    monkeypatch.setattr(plotting, "plot_refinement", spy)
    return seen


def test_plot_of_a_schedule_draws_its_own_multipliers(tmp_path, history, monkeypatch, capsys):
    out = tmp_path / "s.json"
    assert main(["refine", str(history), "-o", str(out)]) == 0
    art = json.loads(out.read_text())
    edited = list(np.linspace(1.0, 0.0, len(art["multipliers"])))  # hand-edited to linear decay
    art["multipliers"] = edited
    out.write_text(json.dumps(art))
    seen = _capture_plot(monkeypatch)
    assert main(["plot", str(out), "-o", str(tmp_path / "p.pdf")]) == 0
    np.testing.assert_array_equal(seen["m"], edited)
    assert seen["out"] == str(tmp_path / "p.pdf") and (tmp_path / "p.pdf").read_bytes()[:5] == b"%PDF-"
    assert seen["info"]["diagnostics"]["peak_step"] == 0  # recomputed from the file, not the stored ones
    assert seen["info"]["width"] == art["provenance"]["median_width"]


def test_plot_of_a_schedule_refuses_a_changed_source_and_history_options(tmp_path, history, capsys):
    out = tmp_path / "s.json"
    assert main(["refine", str(history), "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["plot", str(out), "--tau", "0.3", "-o", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--tau" in err and "s.json" in err
    with open(history, "a") as f:
        f.write(json.dumps({"step": 400, "l1": 1.0}) + "\n")
    assert main(["plot", str(out), "-o", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "has changed since the refinement" in err
    assert not (tmp_path / "p.png").exists()


def test_show_prints_the_real_shape_not_stored_diagnostics(tmp_path, history, capsys):
    out = tmp_path / "s.json"
    assert main(["refine", str(history), "-o", str(out)]) == 0
    art = json.loads(out.read_text())
    T = len(art["multipliers"])
    art["multipliers"] = list((T - 1 - np.arange(T)) / (T - 1))
    art["diagnostics"] = {"warmup_steps": 999, "peak_step": 123, "peak_fraction": 0.5, "above_half_fraction": 0.5,
                          "final_anneal_steps": 1, "final_anneal_fraction": 0.1, "start_multiplier": 0.1, "degenerate": True}
    art["fit"] = {"warmup_fraction": "nonsense"}
    out.write_text(json.dumps(art))
    capsys.readouterr()
    assert main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "peak at step 0 (0.0%)" in shown and "warm-up 0 steps" in shown and "WARNING" not in shown
    assert "then (1-progress)^1;" in shown


def test_warning_handling_is_scoped_to_main(tmp_path, capsys):
    import logging
    import warnings

    before = warnings.showwarning
    p = tmp_path / "d.csv"
    p.write_text("".join(f"{i},{1.0 + i % 3}\n" for i in range(0, 100, 2)) + "100,1\n100,2\n")  # a duplicate -> warning
    assert main(["refine", str(p), "-o", str(tmp_path / "o.json")]) == 0
    err = capsys.readouterr().err
    assert err.count("duplicated step") == 1 and all(ln.startswith("warning: ") for ln in err.splitlines())
    assert warnings.showwarning is before
    # No handler of the CLI's own is left behind (pytest >= 9.2 attaches its own capture handler to
    # non-propagating loggers, so the list is not simply empty under pytest).
    from llm_refine.cli import _StderrLine

    assert not any(isinstance(h, _StderrLine) for h in logging.getLogger("llm_refine.cli.warnings").handlers)


def test_jsonl_and_csv_share_one_numeric_policy(tmp_path):
    from llm_refine.history import load_trace

    a = tmp_path / "a.csv"
    a.write_text("0,1\n1.0,2\n2,3\n")
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps(r) + "\n" for r in [{"step": 0, "l1": 1}, {"step": 1.0, "l1": 2.0}, {"step": 2, "l1": 3.0}]))
    ta, tb = load_trace(a), load_trace(b)
    np.testing.assert_array_equal(ta.steps, tb.steps)
    np.testing.assert_array_equal(ta.values, tb.values)


def test_library_modules_do_not_print():
    import inspect

    import llm_refine.artifact
    import llm_refine.fileio
    import llm_refine.history
    import llm_refine.refine

    for mod in (llm_refine.artifact, llm_refine.fileio, llm_refine.history, llm_refine.refine):
        assert "print(" not in inspect.getsource(mod), mod.__name__


@pytest.mark.parametrize("value,norm", [("1e308", "l1"), ("1e-300", "l1"), ("1e100", "l2")])
def test_extreme_constant_norms_refine_through_the_cli(tmp_path, capsys, value, norm):
    p = tmp_path / "c.csv"
    p.write_text("".join(f"{i},{value}\n" for i in range(100)))
    out = tmp_path / "s.json"
    assert main(["refine", str(p), "--norm", norm, "-o", str(out)]) == 0, capsys.readouterr().err
    m = np.array(json.loads(out.read_text())["multipliers"])
    np.testing.assert_allclose(m, (99 - np.arange(100)) / 99, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# llm-refine pretrain: the packaged entry point (python -m llm_refine.train) under the CLI


def _option_table(parser):
    return sorted((tuple(a.option_strings), a.dest, a.nargs, a.default) for a in parser._actions if a.dest != "help")


def test_pretrain_has_exactly_the_entry_points_arguments():
    from llm_refine.cli import build_parser
    from llm_refine.train.__main__ import build_parser as train_parser

    sub = next(a for a in build_parser()._actions if getattr(a, "choices", None) and "pretrain" in a.choices)
    assert _option_table(sub.choices["pretrain"]) == _option_table(train_parser())


@pytest.mark.parametrize("args,needles", [
    (["nope.yaml"], ["nope.yaml", "no such config file"]),
    (["{cfg}", "--set", "train.bogus=1"], ["train.bogus", "unknown key"]),
    (["{cfg}", "--set", "train.max_steps=abc"], ["train.max_steps", "not an integer"]),
    (["{cfg}", "--set", "novalue"], ["novalue"]),
    ([], ["required: config"]),
    # found while preparing the data, after the config loaded: the same prefix, one line
    (["{cfg}", "--set", "data.source=files", "data.path={tmp}/missing.txt", "--prepare-only"], ["missing.txt", "does not exist"]),
])
def test_pretrain_bad_input_is_one_line(tmp_path, args, needles):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("model: {size: cpu-0.5m}\ntrain: {max_steps: 5}\n")
    r = run_cli("pretrain", *[a.format(cfg=cfg, tmp=tmp_path) for a in args])
    assert_user_error(r, "llm-refine pretrain: error:", *needles)
    assert not (tmp_path / "runs").exists() and r.stdout == ""


def test_pretrain_runs_the_entry_point(tmp_path, monkeypatch, capsys):
    """--prepare_only through `llm-refine pretrain`: the entry point's own run (tokenizer, packed data)."""
    import _pretrain_common  # noqa: F401  (the session's test cache)

    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "p.yaml"
    cfg.write_text("model: {size: cpu-0.5m}\ndata: {val_sequences: 16}\ntrain: {max_steps: 5}\n")
    assert main(["pretrain", str(cfg), "--output_dir", "run", "--prepare_only"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["train_sequences"] > 0 and info["val_sequences_available"] >= 16
    assert not (tmp_path / "run").exists()  # prepared only: nothing trained


def test_broken_pipe_is_not_an_error(tmp_path):
    """`llm-refine examples list | head -1`: the reader closing the pipe early is not a bad path."""
    import subprocess
    import sys

    p = subprocess.run(f"{sys.executable} -m llm_refine.cli examples list | head -1", shell=True,
                       capture_output=True, text=True, cwd=tmp_path)
    assert len(p.stdout.splitlines()) == 1
    assert "error" not in p.stderr and "Traceback" not in p.stderr, p.stderr
