"""Figures inside the HTML file: each one a ``data:`` URI, so the report needs no other file.

An SVG goes in as a base64 ``data:image/svg+xml`` image rather than inline markup: matplotlib
names its clip paths and glyphs with ids that repeat between figures, which would clash in
one document, and an ``<img>`` keeps each figure's styles to itself.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from matplotlib.figure import Figure

from moelens.figures import figure_bytes

MIME = {"svg": "image/svg+xml", "png": "image/png"}
#: Raster resolution for PNG figures (and heat maps inside SVG): sharp on a laptop, quick to draw.
REPORT_DPI = 110


@dataclass(frozen=True)
class EmbeddedFigure:
    """One figure of the report: its name (the figure function), an id, a title, alt text and
    the ``data:`` URI."""

    name: str
    id: str
    title: str
    alt: str
    uri: str


def data_uri(fig: Figure, fmt: str = "svg", dpi: float = REPORT_DPI) -> str:
    """``fig`` as a ``data:`` URI (svg or png)."""
    if fmt not in MIME:
        raise ValueError(f"report figures are svg or png, not {fmt!r}")
    payload = base64.b64encode(figure_bytes(fig, fmt, dpi)).decode("ascii")
    return f"data:{MIME[fmt]};base64,{payload}"


def embed(fig: Figure, name: str, id: str, title: str, alt: str, fmt: str = "svg") -> EmbeddedFigure:
    """Encode ``fig`` and let it go: the figure's memory is freed once it is in the report."""
    uri = data_uri(fig, fmt)
    fig.clear()
    return EmbeddedFigure(name=name, id=id, title=title, alt=alt, uri=uri)
