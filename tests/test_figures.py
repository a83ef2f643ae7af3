"""llm_refine.figures: one figure stack (object API, atomic save, format from the suffix)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from llm_refine.errors import UserError
from llm_refine.figures import FORMATS, figure_format, new_figure, save_figure

MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "pdf": b"%PDF-", "svg": b"<?xml"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_save_figure_writes_the_suffix_format(tmp_path, fmt):
    fig, ax = new_figure(figsize=(3, 2))
    ax.plot([0, 1], [1, 0])
    out = save_figure(fig, tmp_path / f"f.{fmt.upper() if fmt == 'pdf' else fmt}")
    assert out.read_bytes().startswith(MAGIC[fmt])
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # atomic: no temporary file left


def test_unknown_suffix_is_a_user_error_naming_the_allowed_ones(tmp_path):
    for name in ("f.jpg", "f"):
        with pytest.raises(UserError, match=r"\.png, \.pdf, \.svg"):
            figure_format(tmp_path / name)
    fig, _ = new_figure(figsize=(3, 2))
    with pytest.raises(UserError):
        save_figure(fig, tmp_path / "f.jpg")
    assert not list(tmp_path.iterdir())


def test_new_figure_grid_shapes():
    _, axes = new_figure(1, 2, figsize=(4, 2))
    assert len(axes) == 2
    _, axes = new_figure(1, 1, figsize=(4, 2), squeeze=False)
    assert axes.shape == (1, 1)


def test_plots_leave_process_state_alone(tmp_path):
    """No pyplot, no backend switch: a refinement plot in a fresh process (PDF from the suffix)."""
    code = f"""
import sys, matplotlib
backend = dict.__getitem__(matplotlib.rcParams, "backend")
import numpy as np
from llm_refine.plotting import plot_refinement
info = {{"steps": np.arange(50), "norms": np.ones(50), "smoothed": np.ones(50), "width": 5, "diagnostics": {{}}}}
p = plot_refinement(info, np.linspace(1, 0, 50), {str(tmp_path / 'r.pdf')!r})
assert p.read_bytes().startswith(b"%PDF-"), p.read_bytes()[:8]
assert "matplotlib.pyplot" not in sys.modules, "pyplot imported"
assert dict.__getitem__(matplotlib.rcParams, "backend") == backend, "backend changed"
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_plot_refinement_rejects_an_unknown_suffix_before_drawing(tmp_path):
    from llm_refine.plotting import plot_refinement

    info = {"steps": np.arange(5), "norms": np.ones(5), "smoothed": np.ones(5), "width": 1, "diagnostics": {}}
    with pytest.raises(UserError, match="jpg"):
        plot_refinement(info, np.linspace(1, 0, 5), tmp_path / "r.jpg")
    assert not list(tmp_path.iterdir())
