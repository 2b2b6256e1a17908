"""Figures for reports (PNG), drawn the same way everywhere."""

from __future__ import annotations

import io
import os
from pathlib import Path

from adafocus.files import atomic_write


def new_figure(*, figsize, dpi: int = 100, cols: int = 1):
    """A figure and its axes on matplotlib's Agg canvas, without pyplot: no display needed, no
    process-wide backend switch, and a caller's own matplotlib settings are left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig, (fig.subplots(1, cols) if cols > 1 else fig.subplots())


def save_png(fig, path: str | os.PathLike) -> Path:
    """The figure as a PNG at `path`, written atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write(path, buffer.getvalue())
