"""PNG plots of a refinement: raw and smoothed norms; the refined schedule beside linear and cosine."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .fileio import atomic_write_bytes

MAX_PLOT_POINTS = 5000


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At most MAX_PLOT_POINTS points (every k-th), so plots of million-step runs stay small."""
    k = max(1, x.size // MAX_PLOT_POINTS)
    return x[::k], y[::k]


def _figure_bytes(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plot_refinement(info: dict, multipliers: np.ndarray, out: str | os.PathLike, *, title: str = "") -> Path:
    """Two panels: raw + smoothed norms (log scale), and refined vs linear vs cosine multipliers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .schedules import cosine, linear_decay

    steps = np.asarray(info["steps"])
    T = multipliers.size
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(*_thin(steps, np.asarray(info["norms"])), lw=0.6, alpha=0.5, label="raw")
    ax1.plot(*_thin(steps, np.asarray(info["smoothed"])), lw=1.5, label=f"median filter (width {info['width']})")
    ax1.set_yscale("log")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("gradient norm")
    ax1.set_title(f"gradient norms {title}".strip())
    ax1.legend()
    x = np.arange(T)
    xs, ms = _thin(x, multipliers)
    ax2.plot(xs, ms, lw=1.8, label="refined")
    ax2.plot(xs, [linear_decay(int(s), T) for s in xs], "--", label="linear decay")
    ax2.plot(xs, [cosine(int(s), T) for s in xs], ":", label="cosine")
    d = info.get("diagnostics", {})
    if d.get("degenerate"):
        ax2.text(0.02, 0.05, "DEGENERATE: " + d.get("degenerate_reason", ""), transform=ax2.transAxes, color="red", fontsize=8)
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("LR multiplier")
    ax2.set_ylim(0, 1.05)
    ax2.set_title("schedules")
    ax2.legend()
    data = _figure_bytes(fig)
    plt.close(fig)
    return atomic_write_bytes(out, data)
