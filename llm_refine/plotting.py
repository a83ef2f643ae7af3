"""Plots of a refinement: raw and smoothed norms; the refined schedule beside linear and cosine."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .figures import figure_format, new_figure, save_figure

MAX_PLOT_POINTS = 5000


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At most MAX_PLOT_POINTS points (every k-th), so plots of million-step runs stay small."""
    k = max(1, x.size // MAX_PLOT_POINTS)
    return x[::k], y[::k]


def _draw_norms(ax, info: dict, title: str) -> None:
    steps = np.asarray(info["steps"])
    ax.plot(*_thin(steps, np.asarray(info["norms"])), lw=0.6, alpha=0.5, label="raw")
    ax.plot(*_thin(steps, np.asarray(info["smoothed"])), lw=1.5, label=f"median filter (width {info['width']})")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("gradient norm")
    ax.set_title(f"gradient norms {title}".strip())
    ax.legend()


def _draw_schedules(ax, info: dict, multipliers: np.ndarray) -> None:
    from .schedules import cosine, linear_decay

    T = multipliers.size
    xs, ms = _thin(np.arange(T), multipliers)
    ax.plot(xs, ms, lw=1.8, label="refined")
    ax.plot(xs, [linear_decay(int(s), T) for s in xs], "--", label="linear decay")
    ax.plot(xs, [cosine(int(s), T) for s in xs], ":", label="cosine")
    d = info.get("diagnostics", {})
    if d.get("degenerate"):
        ax.text(0.02, 0.05, "DEGENERATE: " + d.get("degenerate_reason", ""), transform=ax.transAxes, color="red", fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("LR multiplier")
    ax.set_ylim(0, 1.05)
    ax.set_title("schedules")
    ax.legend()


def plot_refinement(info: dict, multipliers: np.ndarray, out: str | os.PathLike, *, title: str = "") -> Path:
    """Two panels: raw + smoothed norms (log scale), and refined vs linear vs cosine multipliers.

    The format follows ``out``'s suffix (.png, .pdf, .svg); the file is written atomically.
    """
    figure_format(out)  # an unknown suffix fails before anything is drawn
    fig, (ax1, ax2) = new_figure(1, 2, figsize=(11, 4))
    _draw_norms(ax1, info, title)
    _draw_schedules(ax2, info, multipliers)
    return save_figure(fig, out)
