"""Figures inside the HTML file: each one a ``data:`` URI, so the report needs no other file.

An SVG goes in as a base64 ``data:image/svg+xml`` image rather than inline markup: matplotlib
names its clip paths and glyphs with ids that repeat between figures, which would clash in
one document, and an ``<img>`` keeps each figure's styles to itself.

While :func:`collecting_files` is active, every embedded figure is also kept as PNG and SVG bytes
under a file name (:func:`file_stem`), so a folder of figure files holds exactly the report's
figures, each the very figure the report shows (same function, same inputs, same SVG bytes).
"""

from __future__ import annotations

import base64
import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

from matplotlib.figure import Figure

from moelens.figures import figure_bytes
from moelens.results import Run

MIME = {"svg": "image/svg+xml", "png": "image/png"}
#: Raster resolution for PNG figures (and heat maps inside SVG): sharp on a laptop, quick to draw.
REPORT_DPI = 110
#: Resolution of the PNG files written beside a report (the SVG files are the report's own bytes).
FILE_DPI = 150


@dataclass(frozen=True)
class EmbeddedFigure:
    """One figure of the report: its name (the figure function), an id, a title, alt text,
    the ``data:`` URI, the stem of its file name, and what the browser needs to check that its
    text stays legible: the figure's width in inches and its smallest font size in points."""

    name: str
    id: str
    title: str
    alt: str
    uri: str
    file: str = ""
    width_in: float = 0.0
    smallest_pt: float = 0.0


@dataclass(frozen=True)
class FigureFile:
    """One figure of the report as files: the stem and the bytes of each format."""

    stem: str
    data: dict[str, bytes]


_collector: list[FigureFile] | None = None


@contextlib.contextmanager
def collecting_files() -> Iterator[list[FigureFile]]:
    """Keep every figure embedded inside the ``with`` block as PNG and SVG bytes (in report order)."""
    global _collector
    previous, _collector = _collector, []
    try:
        yield _collector
    finally:
        _collector = previous


def collecting_active() -> bool:
    """Whether figures are being kept as files (inside :func:`collecting_files`)."""
    return _collector is not None


def collected_stems() -> set[str]:
    """The file stems kept so far (none outside :func:`collecting_files`)."""
    return {f.stem for f in _collector} if _collector is not None else set()


def add_collected(files: list[FigureFile]) -> None:
    """Keep ``files`` (another process's, in report order) as if their figures had been embedded here."""
    if _collector is not None:
        _collector.extend(files)


@contextlib.contextmanager
def _layout_fixed(fig: Figure) -> Iterator[None]:
    """Save ``fig`` again without laying it out again: each save runs the layout engine in a draw
    of its own before the real one, and after the first save the panels are where they belong (the
    layout is in fractions of the figure, so another dpi or format keeps it)."""
    engine = fig.get_layout_engine()
    if engine is None:
        yield
        return
    fig.set_layout_engine("none")
    try:
        yield
    finally:
        fig.set_layout_engine(engine)


def file_stem(name: str, id: str, run_name: str = "") -> str:
    """The file name (without suffix) of figure ``name`` embedded as ``id``: the figure's registry
    name, then ``--`` and what tells this one apart (its run, layer or option), taken from the id
    with the figure's own words left out, and the report's run number replaced by the run's
    directory name: ``trace_heatmap`` + ``trace-run-2-heatmap`` of ``runs/trace-tuned`` →
    ``trace_heatmap--trace-tuned``."""
    own = set(name.split("_")) | {"fig", "heat", "lines", "map", "usage", "complete", "indirect", "effect", "layers"}

    def kept(text: str) -> list[str]:
        return [w for w in re.split(r"[^A-Za-z0-9.]+", text) if w and w.lower() not in own]

    found = re.search(r"(?:[a-z]+-)?run-\d+", id) if run_name else None
    words = kept(id) if found is None else kept(id[:found.start()]) + [run_name] + kept(id[found.end():])
    variant = "-".join(words)
    return f"{name}--{variant}" if variant else name


def smallest_font_pt(fig: Figure, drawn: bool = False) -> float:
    """The smallest size (points) of any visible, non-empty text in ``fig`` (tick labels get their
    text when the figure is drawn: ``drawn`` says it has been)."""
    from matplotlib.text import Text

    if not drawn:
        fig.draw_without_rendering()
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and str(t.get_text()).strip()]
    return float(min(sizes)) if sizes else 0.0


def data_uri(fig: Figure, fmt: str = "svg", dpi: float = REPORT_DPI) -> str:
    """``fig`` as a ``data:`` URI (svg or png)."""
    if fmt not in MIME:
        raise ValueError(f"report figures are svg or png, not {fmt!r}")
    payload = base64.b64encode(figure_bytes(fig, fmt, dpi)).decode("ascii")
    return f"data:{MIME[fmt]};base64,{payload}"


def embed(fig: Figure, name: str, id: str, title: str, alt: str, fmt: str = "svg", run: Run | None = None) -> EmbeddedFigure:
    """Encode ``fig`` and let it go: the figure's memory is freed once it is in the report.
    ``run``: the one run the figure draws, whose directory name goes into the figure's file name."""
    if fmt not in MIME:
        raise ValueError(f"report figures are svg or png, not {fmt!r}")
    stem = file_stem(name, id, run.path.name if run is not None and run.path else "")
    width_in = float(fig.get_size_inches()[0])
    data = {fmt: figure_bytes(fig, fmt, REPORT_DPI)}
    smallest = smallest_font_pt(fig, drawn=True)
    if _collector is not None:
        taken = {f.stem for f in _collector}
        unique, n = stem, 2
        while unique in taken:  # the same figure twice in one report: number the later ones
            unique, n = f"{stem}-{n}", n + 1
        stem = unique
        with _layout_fixed(fig):  # laid out by the report's save above
            files = {"svg": data["svg"] if fmt == "svg" else figure_bytes(fig, "svg", REPORT_DPI),
                     "png": figure_bytes(fig, "png", FILE_DPI)}
        _collector.append(FigureFile(stem, files))
    uri = f"data:{MIME[fmt]};base64,{base64.b64encode(data[fmt]).decode('ascii')}"
    fig.clear()
    return EmbeddedFigure(name=name, id=id, title=title, alt=alt, uri=uri, file=stem, width_in=width_in, smallest_pt=smallest)
