"""Figures to files and bytes: PNG, SVG or PDF chosen by the file's suffix.

Metadata that would change between two saves of the same figure (dates, the creator string,
which also carries a web address) is left out, so the same figure gives the same file and a
report names no external resource.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

from matplotlib.figure import Figure

from moelens.errors import ConfigError
from moelens.figures.style import style_context

FORMATS = ("png", "svg", "pdf")
_METADATA = {
    "png": {"Software": None},
    "svg": {"Date": None, "Creator": None, "Format": None, "Type": None},
    "pdf": {"CreationDate": None, "Creator": None, "Producer": None},
}
#: The XML prolog and DOCTYPE of matplotlib's SVG (the DOCTYPE names a DTD by URL).
_SVG_PROLOG = re.compile(r"\A\s*<\?xml[^>]*>\s*(<!DOCTYPE[^>]*>\s*)?", re.DOTALL)


def figure_bytes(fig: Figure, fmt: str, dpi: float = 150) -> bytes:
    """The figure encoded as ``fmt`` (png, svg or pdf); an SVG starts at its ``<svg>`` element."""
    fmt = fmt.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ConfigError(f"cannot save a figure as {fmt!r}; use one of {', '.join(FORMATS)}")
    buffer = io.BytesIO()
    with style_context():
        fig.savefig(buffer, format=fmt, dpi=dpi, metadata=_METADATA[fmt], facecolor="white")
    data = buffer.getvalue()
    if fmt == "svg":
        data = _SVG_PROLOG.sub("", data.decode("utf-8"), count=1).encode("utf-8")
    return data


def save(fig: Figure, path: str | os.PathLike[str], dpi: float = 300) -> Path:
    """Write ``fig`` to ``path``; the suffix (.png, .svg or .pdf) picks the format.

    ``dpi`` matters for PNG (and for raster parts such as heat maps inside SVG and PDF).
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ConfigError(f"{path} has suffix {path.suffix or '(none)'!r}; name the file .png, .svg or .pdf")
    data = figure_bytes(fig, fmt, dpi)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
