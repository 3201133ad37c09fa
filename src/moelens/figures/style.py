"""One look for every moelens figure: colours, fonts, the log₂ k axis, reference lines.

Colours follow Okabe & Ito (2008), distinguishable with every common colour-vision deficiency;
each run also gets its own marker so lines stay apart in greyscale print. Yellow comes last
because it is faint on white. Figures are built on :class:`matplotlib.figure.Figure` directly
(no pyplot), so nothing is shown and no global figure list grows; rasters go through Agg.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Iterator, Sequence, TypeVar

import matplotlib as mpl
from matplotlib.axes import Axes
from matplotlib.backend_bases import RendererBase
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.legend import Legend
from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter

RUN_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
RUN_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
RUN_LINESTYLES = ("-", "--", "-.", ":")

#: Neutral colours for what is not a run: experts drawn thin, the null, references.
EXPERT_GREY = "#9a9a9a"
REFERENCE_GREY = "#444444"
NULL_GREY = "#bdbdbd"

#: Sequential and diverging colour maps that stay readable for colour-blind readers.
SEQUENTIAL_CMAP = "cividis"
DIVERGING_CMAP = "PuOr_r"

#: Short enough to sit under one of three panels side by side: constrained layout counts only
#: the height of an x label wider than its axes, so a longer one would run off the figure.
K_AXIS_LABEL = "k (leading singular directions, log₂ scale)"
#: Blank space (inches) kept between two tick labels of a k axis.
TICK_LABEL_GAP = 0.08
#: How far a log₂ k axis reaches beyond its first and last k, in octaves on each side.
K_AXIS_MARGIN = 0.35

STYLE: dict[str, Any] = {
    "font.size": 9,
    "axes.titlesize": 9.5,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "figure.titlesize": 11,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e6e6e6",
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.6,
    "lines.markersize": 4,
    "svg.fonttype": "path",
    # Stable ids in SVG output: the same figure gives the same bytes.
    "svg.hashsalt": "moelens",
    "pdf.fonttype": 42,
    "image.interpolation": "nearest",
}

F = TypeVar("F", bound=Callable[..., Figure])


def styled(func: F) -> F:
    """Build the figure inside the moelens style (rcParams are read when artists are made)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Figure:
        with mpl.rc_context(STYLE):
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def style_context() -> Iterator[None]:
    """The moelens rcParams, for code that draws or saves outside a figure function."""
    with mpl.rc_context(STYLE):
        yield


def new_figure(width: float, height: float) -> Figure:
    """A figure with constrained layout (no overlapping labels), not registered with pyplot."""
    return Figure(figsize=(width, height), layout="constrained")


def run_style(index: int) -> dict[str, Any]:
    """Colour, marker and line style of the ``index``-th run; beyond 8 runs the dash changes."""
    return {
        "color": RUN_COLOURS[index % len(RUN_COLOURS)],
        "marker": RUN_MARKERS[index % len(RUN_MARKERS)],
        "linestyle": RUN_LINESTYLES[(index // len(RUN_COLOURS)) % len(RUN_LINESTYLES)],
    }


def powers_of_two_between(low: float, high: float) -> list[int]:
    """Powers of two p with low ≤ p ≤ high."""
    if high < 1:
        return []
    first = max(0, math.ceil(math.log2(max(low, 1))))
    return [2**p for p in range(first, math.floor(math.log2(high)) + 1)]


def axes_width_inches(ax: Axes) -> float:
    """Width of ``ax`` in inches as placed now: an estimate when ticks are chosen, since
    constrained layout moves panels when the figure is drawn (for these figures, a little wider)."""
    return ax.get_position().width * ax.get_figure().get_figwidth()


def _tick_label_width(text: str, fontsize: float) -> float:
    """Width in inches of a tick label of digits (DejaVu Sans digits are 0.636 em wide)."""
    return 0.64 * len(text) * fontsize / 72.0


def thin_tick_labels(positions: Sequence[float], labels: Sequence[str], inches_per_unit: float,
                     fontsize: float, step: int = 1) -> list[int]:
    """Indices of the ticks to label, positions increasing: the first and the last always, every
    ``step``-th one between them, and none whose label would come nearer than
    :data:`TICK_LABEL_GAP` to a labelled neighbour (the last one wins over its neighbours)."""
    if len(positions) <= 2:
        return list(range(len(positions)))
    widths = [_tick_label_width(label, fontsize) for label in labels]

    def apart(a: int, b: int) -> bool:
        return (positions[b] - positions[a]) * inches_per_unit >= (widths[a] + widths[b]) / 2 + TICK_LABEL_GAP

    last = len(positions) - 1
    kept = [0]
    for i in range(step, last, step):
        if apart(kept[-1], i) and apart(i, last):
            kept.append(i)
    return kept + [last]


def _tick_fontsize() -> float:
    return FontProperties(size=mpl.rcParams["xtick.labelsize"]).get_size_in_points()


def k_axis_ticks(ks: Sequence[int], width_inches: float, max_labels: int = 8) -> tuple[list[int], list[int]]:
    """Labelled and unlabelled ticks of a log₂ k axis over ``ks`` drawn ``width_inches`` wide.

    There is a tick at every power of two between the smallest and the largest k and at those two
    ks themselves: the largest is d, which for most models is no power of two (2880, 5120, 7168).
    At most about ``max_labels`` are labelled, every n-th power, thinned further where labels
    would touch; the first k and d keep theirs.
    """
    low, high = min(ks), max(ks)
    ticks = sorted(set(powers_of_two_between(low, high)) | {low, high})
    octaves = math.log2(high) - math.log2(low) + 2 * K_AXIS_MARGIN
    step = max(1, math.ceil((len(ticks) - 1) / max(max_labels - 1, 1)))
    labelled = thin_tick_labels([math.log2(t) for t in ticks], [str(t) for t in ticks],
                                width_inches / octaves, _tick_fontsize(), step)
    return [ticks[i] for i in labelled], [t for i, t in enumerate(ticks) if i not in labelled]


def log2_k_axis(ax: Axes, ks: Sequence[int], label: bool = True, max_labels: int = 8) -> None:
    """A log₂ x axis over ``ks``: a tick at every power of two and at the first and last k (d),
    integer labels thinned so that they never collide (see :func:`k_axis_ticks`)."""
    low, high = min(ks), max(ks)
    ax.set_xscale("log", base=2)
    ax.set_xlim(low / 2**K_AXIS_MARGIN, high * 2**K_AXIS_MARGIN)
    labelled, unlabelled = k_axis_ticks(ks, axes_width_inches(ax), max_labels)
    ax.xaxis.set_major_locator(FixedLocator(labelled))
    ax.xaxis.set_major_formatter(FixedFormatter([str(k) for k in labelled]))
    ax.xaxis.set_minor_locator(FixedLocator(unlabelled))
    ax.xaxis.set_minor_formatter(NullFormatter())
    if label:
        ax.set_xlabel(K_AXIS_LABEL)


def markevery_powers_of_two(ks: Sequence[int]) -> list[int]:
    """Indices of ``ks`` that are powers of two: markers stay sparse when every k is kept."""
    return [i for i, k in enumerate(ks) if k > 0 and (k & (k - 1)) == 0] or list(range(len(ks)))



def k_column_ticks(ks: Sequence[int], width_inches: float, max_labels: int = 8) -> tuple[list[int], list[str]]:
    """Tick positions and labels for heat-map columns that are the values ``ks``, drawn
    ``width_inches`` wide: the columns whose k is a power of two and the last column (d), at
    most about ``max_labels``, thinned where labels would touch (the first and d always kept)."""
    positions = sorted(set(markevery_powers_of_two(ks)) | {0, len(ks) - 1})
    step = max(1, math.ceil((len(positions) - 1) / max(max_labels - 1, 1)))
    labels = [str(ks[i]) for i in positions]
    kept = thin_tick_labels(positions, labels, width_inches / max(len(ks), 1), _tick_fontsize(), step)
    return [positions[i] for i in kept], [labels[i] for i in kept]


def layer_block_ticks(layers: Sequence[int], max_labels: int = 16) -> tuple[list[int], list[float], list[str]]:
    """For rows (or bars) ordered by layer, one entry per (layer, expert): where each layer's
    block starts, and tick positions at block centres labelled "L<layer>" (every n-th block
    when there are more than ``max_labels``, so labels never overlap)."""
    layers = list(layers)
    starts = [i for i in range(len(layers)) if i == 0 or layers[i - 1] != layers[i]]
    ends = starts[1:] + [len(layers)]
    step = max(1, math.ceil(len(starts) / max_labels))
    centres = [(s + e - 1) / 2 for s, e in zip(starts, ends)][::step]
    labels = [f"L{layers[s]}" for s in starts][::step]
    return starts, centres, labels


def _renderer(fig: Figure) -> RendererBase:
    """A renderer to measure text with (the figure gets an Agg canvas if it has none that draws)."""
    canvas = fig.canvas if hasattr(fig.canvas, "get_renderer") else FigureCanvasAgg(fig)
    return canvas.get_renderer()


def fit_legend(fig: Figure, make: Callable[[int], Legend], columns: int) -> Legend:
    """The legend ``make(n)`` with the most columns, up to ``columns``, that fits in the figure's
    width: long entries go into more rows instead of running off both sides. (A legend lays out
    its entries once, when it is made, so a narrower one is made anew.)"""
    renderer = _renderer(fig)
    available = fig.bbox.width * 0.98  # constrained layout keeps a small pad at the edges
    legend = make(columns)
    while columns > 1 and legend.get_window_extent(renderer).width > available:
        legend.remove()
        columns -= 1
        legend = make(columns)
    return legend
