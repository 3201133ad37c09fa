"""Figures to files and bytes: PNG, SVG or PDF chosen by the file's suffix.

Metadata that would change between two saves of the same figure (dates, the creator string,
which also carries a web address) is left out, so the same figure gives the same file and a
report names no external resource.
"""

from __future__ import annotations

import io
import math
import numbers
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
#: Resolutions a figure may be saved at: from a coarse preview to a print shop's finest.
DPI_RANGE = (10, 1200)
#: The largest raster a save may make: 100 megapixels is about 400 MB of RGBA while drawing.
MAX_PIXELS = 100_000_000
#: The XML prolog and DOCTYPE of matplotlib's SVG (the DOCTYPE names a DTD by URL).
_SVG_PROLOG = re.compile(r"\A\s*<\?xml[^>]*>\s*(<!DOCTYPE[^>]*>\s*)?", re.DOTALL)


def check_dpi(fig: Figure, dpi: object) -> int:
    """``dpi`` as an int if it is a whole number in :data:`DPI_RANGE` that keeps ``fig``'s raster
    within :data:`MAX_PIXELS`; else a :class:`ConfigError` (checked before anything is drawn: a
    dpi of 0 fails deep inside matplotlib, and a huge one exhausts memory)."""
    low, high = DPI_RANGE
    whole = isinstance(dpi, numbers.Integral) or (isinstance(dpi, numbers.Real) and math.isfinite(dpi) and float(dpi).is_integer())
    if isinstance(dpi, bool) or not whole or not low <= dpi <= high:
        raise ConfigError(f"dpi must be a whole number from {low} to {high}; got {dpi!r} (300 suits print)")
    dpi = int(dpi)
    width, height = fig.get_size_inches()
    pixels = (width * dpi) * (height * dpi)
    if pixels > MAX_PIXELS:
        most = max(low, math.floor(math.sqrt(MAX_PIXELS / (width * height))))
        raise ConfigError(
            f"dpi {dpi} makes this {width:g} × {height:g} inch figure {pixels / 1e6:.0f} megapixels, over the "
            f"{MAX_PIXELS // 1_000_000} allowed; use a dpi from {low} to {most}"
        )
    return dpi


def figure_bytes(fig: Figure, fmt: str, dpi: float = 150) -> bytes:
    """The figure encoded as ``fmt`` (png, svg or pdf); an SVG starts at its ``<svg>`` element.

    ``dpi`` is a whole number from 10 to 1200 that keeps the raster within 100 megapixels.
    """
    fmt = fmt.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ConfigError(f"cannot save a figure as {fmt!r}; use one of {', '.join(FORMATS)}")
    dpi = check_dpi(fig, dpi)
    buffer = io.BytesIO()
    with style_context():
        fig.savefig(buffer, format=fmt, dpi=dpi, metadata=_METADATA[fmt], facecolor="white")
    data = buffer.getvalue()
    if fmt == "svg":
        data = _SVG_PROLOG.sub("", data.decode("utf-8"), count=1).encode("utf-8")
    return data


def save(fig: Figure, path: str | os.PathLike[str], dpi: float = 300) -> Path:
    """Write ``fig`` to ``path``; the suffix (.png, .svg or .pdf) picks the format.

    ``dpi`` matters for PNG (and for raster parts such as heat maps inside SVG and PDF): a whole
    number from 10 to 1200 that keeps the raster within 100 megapixels. Nothing is written (no
    folder made) when the suffix or the dpi cannot be used.
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ConfigError(f"{path} has suffix {path.suffix or '(none)'!r}; name the file .png, .svg or .pdf")
    data = figure_bytes(fig, fmt, dpi)  # checks dpi before drawing: on error nothing is written
    from moelens.safe_files import atomic_write_bytes

    return atomic_write_bytes(path, data)  # a new file renamed into place: a link at path is replaced, never written through
