"""Outputs never destroy what sits at their path (issue #12, "Data loss"): every case keeps the old
bytes and the old file type, and a command's outputs are all-or-nothing."""

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from llm_refine.cli import main
from llm_refine.errors import UserError
from llm_refine.fileio import atomic_write_bytes, atomic_write_text, output_transaction


@pytest.fixture
def good_csv(tmp_path):
    p = tmp_path / "good.csv"
    rng = np.random.default_rng(0)
    p.write_text("step,gnorm\n" + "".join(f"{i},{v}\n" for i, v in enumerate(1 + rng.random(200))))
    return p


def one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_device_node_is_refused_and_stays_a_device(tmp_path, good_csv, capsys):
    dev = tmp_path / "full"  # a clone of /dev/full (1, 7), so a regression cannot damage the real one
    try:
        os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    except (PermissionError, OSError):
        pytest.skip("cannot create a device node here")
    assert main(["refine", str(good_csv), "-o", str(dev)]) == 2
    one_error_line(capsys, str(dev), "a device", "regular file")
    assert stat.S_ISCHR(os.lstat(dev).st_mode)


def test_real_dev_full_is_refused(good_csv, capsys):
    if not os.path.exists("/dev/full") or not stat.S_ISCHR(os.stat("/dev/full").st_mode):
        pytest.skip("no /dev/full")
    assert main(["refine", str(good_csv), "-o", "/dev/full"]) == 2
    one_error_line(capsys, "/dev/full", "a device")
    assert stat.S_ISCHR(os.lstat("/dev/full").st_mode)


def test_fifo_is_refused_and_stays_a_fifo(tmp_path, good_csv, capsys):
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    assert main(["refine", str(good_csv), "-o", str(fifo)]) == 2
    one_error_line(capsys, "pipe.json", "a FIFO")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_directory_output_is_refused(tmp_path, good_csv, capsys):
    d = tmp_path / "adir"
    d.mkdir()
    assert main(["refine", str(good_csv), "-o", str(d)]) == 2
    one_error_line(capsys, "adir", "a directory")
    assert d.is_dir() and not list(d.iterdir())


def test_symlink_is_written_through_to_its_target(tmp_path, good_csv, capsys):
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert main(["refine", str(good_csv), "-o", str(link)]) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert json.loads(target.read_text())["format"] == "llm-refine/schedule"


def test_output_equal_to_input_is_refused(tmp_path, good_csv, capsys):
    h = tmp_path / "h.jsonl"
    h.write_text("".join(json.dumps({"step": i, "l1": 1.0 + i % 3}) + "\n" for i in range(50)))
    before = h.read_bytes()
    assert main(["refine", str(h), "-o", str(h)]) == 2
    one_error_line(capsys, "h.jsonl", "input")
    assert h.read_bytes() == before
    csv_before = good_csv.read_bytes()
    assert main(["plot", str(good_csv), "-o", str(good_csv)]) == 2
    one_error_line(capsys, "good.csv", "input")
    assert good_csv.read_bytes() == csv_before
    # the same file through another name (a hard link) is the input too
    alias = tmp_path / "alias.json"
    os.link(h, alias)
    assert main(["refine", str(h), "-o", str(alias)]) == 2
    one_error_line(capsys, "alias.json", "input")
    assert h.read_bytes() == before


def test_plot_of_a_schedule_refuses_to_overwrite_its_source_history(tmp_path, good_csv, capsys):
    s = tmp_path / "s.json"
    assert main(["refine", str(good_csv), "-o", str(s)]) == 0
    before = good_csv.read_bytes()
    capsys.readouterr()
    assert main(["plot", str(s), "-o", str(good_csv)]) == 2
    one_error_line(capsys, "good.csv")
    assert good_csv.read_bytes() == before
    alias = tmp_path / "alias.png"  # the history under a figure's name (a hard link)
    os.link(good_csv, alias)
    assert main(["plot", str(s), "-o", str(alias)]) == 2
    one_error_line(capsys, "alias.png", "source history")
    assert good_csv.read_bytes() == before


def test_same_path_for_two_outputs_is_refused(tmp_path, good_csv, capsys):
    out = tmp_path / "x.png"
    out.write_bytes(b"keep")
    assert main(["refine", str(good_csv), "-o", str(out), "--plot", str(out)]) == 2
    one_error_line(capsys, "x.png", "both")
    assert out.read_bytes() == b"keep"


@pytest.mark.parametrize("plot", ["some_dir/", "a_file/x.png", "x.txt"])
def test_outputs_are_all_or_nothing(tmp_path, good_csv, capsys, plot):
    (tmp_path / "some_dir").mkdir()
    (tmp_path / "a_file").write_text("I am a file")
    out = tmp_path / "x.json"
    out.write_text("precious")
    assert main(["refine", str(good_csv), "-o", str(out), "--plot", str(tmp_path / plot) + ("/" if plot.endswith("/") else "")]) == 2
    one_error_line(capsys)
    assert out.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "good.csv", "some_dir", "x.json"]


def test_failure_while_writing_the_second_output_keeps_the_first(tmp_path, good_csv, capsys, monkeypatch):
    out = tmp_path / "x.json"
    out.write_text("precious")
    png = tmp_path / "x.png"
    import llm_refine.plotting as plotting

    def boom(*a, **k):
        raise UserError("x.png: drawing failed")

    monkeypatch.setattr(plotting, "plot_refinement", boom)
    assert main(["refine", str(good_csv), "-o", str(out), "--plot", str(png)]) == 2
    one_error_line(capsys, "drawing failed")
    assert out.read_text() == "precious" and not png.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.csv", "x.json"]  # no temp file left


def test_transaction_commits_together_or_not_at_all(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("old a")
    with pytest.raises(RuntimeError):
        with output_transaction():
            atomic_write_text(a, "new a")
            atomic_write_text(b, "new b")
            assert a.read_text() == "old a" and not b.exists()  # staged, not yet renamed
            raise RuntimeError("later step failed")
    assert a.read_text() == "old a" and not b.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    with output_transaction():
        atomic_write_text(a, "new a")
        atomic_write_text(b, "new b")
    assert a.read_text() == "new a" and b.read_text() == "new b"


def test_permissions_of_a_replaced_file_are_kept(tmp_path, good_csv):
    out = tmp_path / "x.json"
    out.write_text("old")
    os.chmod(out, 0o600)
    assert main(["refine", str(good_csv), "-o", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    os.chmod(out, 0o640)
    atomic_write_bytes(out, b"again")
    assert stat.S_IMODE(out.stat().st_mode) == 0o640


def test_stale_temp_from_a_killed_writer_is_removed_by_the_next_run(tmp_path, good_csv):
    out = tmp_path / "x.json"
    out.write_text("old")
    code = textwrap.dedent(
        f"""
        import os, time
        import llm_refine.fileio as f
        def hang(fd):
            print("writing", flush=True)
            time.sleep(60)
        os.fsync = hang
        f.atomic_write_bytes({str(out)!r}, b"new")
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        temps = [p for p in tmp_path.iterdir() if p.name.startswith(".x.json.") and p.name.endswith(".tmp")]
        assert len(temps) == 1
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert temps[0].exists() and out.read_text() == "old"  # the kill left the temp, not a torn target
    assert main(["refine", str(good_csv), "-o", str(out)]) == 0
    assert not temps[0].exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_temp_of_a_live_writer_is_left_alone(tmp_path):
    out = tmp_path / "x.json"
    live = tmp_path / f".x.json.llm-refine-{os.getppid()}-abcd1234.tmp"  # our parent is alive
    live.write_text("in progress")
    atomic_write_text(out, "new")
    assert live.exists()


@pytest.mark.parametrize("bad", ["", "parent_is_file/x.json"])
def test_unusable_output_paths(tmp_path, good_csv, capsys, bad):
    (tmp_path / "parent_is_file").write_text("a file")
    path = "" if bad == "" else str(tmp_path / bad)
    assert main(["refine", str(good_csv), "-o", path]) == 2
    line = one_error_line(capsys, "empty" if bad == "" else "is a file")
    assert ".tmp" not in line
    assert (tmp_path / "parent_is_file").read_text() == "a file"


def test_write_error_names_the_output_not_the_temp_file(tmp_path, good_csv, capsys, monkeypatch):
    out = tmp_path / "x.json"
    out.write_text("precious")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    assert main(["refine", str(good_csv), "-o", str(out)]) == 2
    line = one_error_line(capsys, str(out), "No space left", "free some space")
    assert ".tmp" not in line
    assert out.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.csv", "x.json"]


def test_plot_writes_the_format_of_its_suffix(tmp_path, good_csv):
    pdf = tmp_path / "x.pdf"
    assert main(["plot", str(good_csv), "-o", str(pdf)]) == 0
    assert pdf.read_bytes()[:5] == b"%PDF-"
    s = tmp_path / "s.json"
    assert main(["refine", str(good_csv), "-o", str(s), "--plot", str(tmp_path / "r.svg")]) == 0
    assert b"<svg" in (tmp_path / "r.svg").read_bytes()[:500]
