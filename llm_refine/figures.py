"""One figure stack for every plot llm-refine draws.

Figures are built with matplotlib's object API (`matplotlib.figure.Figure` on an Agg canvas), so
library code never selects a backend, never touches pyplot and never changes process-wide state.
`save_figure` writes atomically, at one dpi, in the format the path's suffix names.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from .errors import UserError
from .fileio import atomic_write_bytes

DPI = 100
FORMATS = ("png", "pdf", "svg")


def figure_format(path: str | os.PathLike) -> str:
    """The format a figure file's suffix names; a UserError for any other suffix."""
    suffix = Path(path).suffix
    fmt = suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        allowed = ", ".join(f".{f}" for f in FORMATS)
        raise UserError(f"{path}: cannot write a figure as {suffix or '(no suffix)'!r}; name the file {allowed}")
    return fmt


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], squeeze: bool = True) -> tuple[Any, Any]:
    """(figure, axes) like ``pyplot.subplots``, but a figure no global registry holds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def figure_bytes(fig, fmt: str = "png") -> bytes:
    """The laid-out figure encoded as ``fmt`` (one of FORMATS)."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=DPI)
    return buf.getvalue()


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` to ``path`` atomically, in the format of its suffix (png, pdf, svg)."""
    return atomic_write_bytes(path, figure_bytes(fig, figure_format(path)))
