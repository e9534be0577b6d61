"""Figures for the report: matplotlib `Figure`s drawn without pyplot (no global state, no display) and saved
as PNG by the Agg renderer."""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:grey",
           "tab:olive", "tab:cyan")


def new_figure(width: float = 6.4, height: float = 4.0) -> Figure:
    """A blank figure of `width` x `height` inches, attached to an Agg canvas."""
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def to_png(figure: Figure) -> bytes:
    """The figure as PNG bytes (Agg; no timestamp or software metadata, so the same figure gives the same bytes)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def colour(index: int) -> str:
    """The `index`-th colour of the report's cycle."""
    return COLOURS[index % len(COLOURS)]
