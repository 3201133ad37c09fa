"""Checks of a drawn figure's text: nothing runs off the canvas, no two labels collide.

Both draw the figure with Agg (as a PNG export does) and measure each piece of text that is
drawn: titles, axis labels, tick labels (only those of ticks inside the view limits: matplotlib
keeps spare tick objects whose labels are never drawn), legend entries, colour-bar labels and
figure titles.
"""

from __future__ import annotations

import itertools
from typing import Optional

import numpy as np
from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from moelens.figures.style import style_context

#: Drawn texts with their extents in pixels.
Texts = list[tuple[Text, Bbox]]


def _undrawn_axis_texts(axis: Axis, axis_drawn: bool) -> set[int]:
    """ids of the texts of ``axis`` that are not drawn: all of them when the axis is off (an
    axes turned off keeps its labels, merely undrawn), else the labels of hidden ticks and of
    ticks outside the view."""
    ticks = axis.get_major_ticks() + axis.get_minor_ticks()
    if not axis_drawn:
        return {id(t) for t in (axis.label, axis.get_offset_text())} | {id(lab) for t in ticks for lab in (t.label1, t.label2)}
    transform = axis.get_transform()
    low, high = sorted(transform.transform(np.asarray(axis.get_view_interval(), float)))
    tolerance = 1e-9 * max(abs(high - low), 1.0)
    hidden: set[int] = set()
    for tick in ticks:
        loc = float(transform.transform(np.array([tick.get_loc()], float))[0])
        if not tick.get_visible() or not np.isfinite(loc) or not low - tolerance <= loc <= high + tolerance:
            hidden.update({id(tick.label1), id(tick.label2)})
    return hidden


def drawn_texts(fig: Figure) -> Texts:
    """Every visible, non-empty text of ``fig`` with its extent in pixels, after a draw."""
    with style_context():
        FigureCanvasAgg(fig)
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        hidden: set[int] = set()
        for ax in fig.axes:
            for axis in (ax.xaxis, ax.yaxis):
                hidden |= _undrawn_axis_texts(axis, ax.axison and axis.get_visible())
        texts = []
        for text in fig.findobj(Text):
            if id(text) in hidden or not text.get_text().strip():
                continue
            # A text is drawn only if it and every artist above it are visible.
            if not text.get_visible() or any(not a.get_visible() for a in _parents(fig, text)):
                continue
            texts.append((text, text.get_window_extent(renderer)))
        return texts


def _parents(fig: Figure, text: Text) -> list:
    """The axes (and legend) holding ``text``, whose visibility decides whether it is drawn."""
    parents = [ax for ax in fig.axes if text.axes is ax]
    parents += [legend for legend in fig.legends if text in legend.get_texts() or text is legend.get_title()]
    return parents


def _describe(text: Text) -> str:
    where = f" in axes {text.axes.get_title()!r}" if text.axes is not None and text.axes.get_title() else ""
    return f"{text.get_text()!r}{where}"


def assert_nothing_clipped(fig: Figure, tolerance: float = 1.0, texts: Optional[Texts] = None) -> None:
    """Every drawn text lies within the figure's canvas (to ``tolerance`` pixels). ``texts``:
    what :func:`drawn_texts` gave, to check a figure drawn once already."""
    texts = drawn_texts(fig) if texts is None else texts
    assert texts, "the figure draws no text at all"
    width, height = fig.bbox.width, fig.bbox.height
    outside = []
    for text, box in texts:
        extents = box.extents
        if (not np.all(np.isfinite(extents)) or box.x0 < -tolerance or box.y0 < -tolerance
                or box.x1 > width + tolerance or box.y1 > height + tolerance):
            outside.append(f"{_describe(text)} at x {box.x0:.0f}..{box.x1:.0f}, y {box.y0:.0f}..{box.y1:.0f}")
    assert not outside, f"text beyond the {width:.0f} × {height:.0f} px canvas: " + "; ".join(outside)


def assert_no_text_overlaps(fig: Figure, tolerance: float = 0.5, texts: Optional[Texts] = None) -> None:
    """No two drawn labels (titles, axis and tick labels, legend entries, colour-bar labels)
    overlap by more than ``tolerance`` pixels. Text placed inside a panel's data area (numbers
    in heat-map cells, notes) is left out: it is meant to sit on the data."""
    inside = {id(t) for ax in fig.axes for t in ax.texts}
    texts = [(t, box) for t, box in (drawn_texts(fig) if texts is None else texts) if id(t) not in inside]
    clashes = []
    for (a, box_a), (b, box_b) in itertools.combinations(texts, 2):
        overlap_x = min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0)
        overlap_y = min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0)
        if overlap_x > tolerance and overlap_y > tolerance:
            clashes.append(f"{_describe(a)} and {_describe(b)}")
    assert not clashes, "overlapping text: " + "; ".join(clashes)
