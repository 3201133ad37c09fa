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
from matplotlib.ticker import FixedFormatter, FixedLocator, MaxNLocator, NullFormatter

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


#: The steps at which layers are labelled: every layer up to :data:`EVERY_LAYER_UP_TO` layers (and
#: while the labels fit), then every 2nd, 4th, 8th, … (seed 001: 0, 8, …, 40).
LAYER_STEPS = (1, 2, 4, 8, 16, 32, 64, 128)
EVERY_LAYER_UP_TO = 16


def layer_label_step(n_layers: int, inches_per_layer: float, label_inches: float) -> int:
    """Label every n-th layer: the smallest n of :data:`LAYER_STEPS` (at least 2 above
    :data:`EVERY_LAYER_UP_TO` layers) whose labels, each ``label_inches`` long along the axis,
    keep :data:`TICK_LABEL_GAP` apart."""
    need = label_inches + TICK_LABEL_GAP
    for step in LAYER_STEPS:
        if step * inches_per_layer >= need and (step >= 2 or n_layers <= EVERY_LAYER_UP_TO):
            return step
    return max(1, math.ceil(n_layers * need / max(inches_per_layer * n_layers, 1e-9)))


def layer_block_ticks(layers: Sequence[int], max_labels: int = 16, span_inches: float | None = None,
                      along: str = "x") -> tuple[list[int], list[float], list[str]]:
    """For rows (or bars) ordered by layer, one entry per (layer, expert): where each layer's
    block starts, and tick positions at block centres labelled "L<layer>": every n-th block
    (n = 1, 2, 4, 8, …) where there are more than ``max_labels`` or, with ``span_inches`` (the
    axis's length), where the labels would otherwise touch (``along`` x: their width; y: their height)."""
    layers = list(layers)
    starts = [i for i in range(len(layers)) if i == 0 or layers[i - 1] != layers[i]]
    ends = starts[1:] + [len(layers)]
    n = len(starts)
    step = next(s for s in LAYER_STEPS + (n,) if math.ceil(n / s) <= max_labels)
    if span_inches is not None and n:
        fontsize = _tick_fontsize()
        longest = max(len(f"L{layers[s]}") for s in starts)
        size = _tick_label_width("0" * longest, fontsize) if along == "x" else 1.25 * fontsize / 72.0
        step = max(step, layer_label_step(n, span_inches / n, size))
    chosen = [k for k in range(n) if k % step == 0]
    centres = [(starts[k] + ends[k] - 1) / 2 for k in chosen]
    labels = [f"L{layers[starts[k]]}" for k in chosen]
    return starts, centres, labels


#: The report draws every figure across its content width (1152 CSS px) and keeps text at 11 px
#: or more at 100 % zoom: a figure w inches wide needs text of 11 · 72 · w / 1152 pt.
REPORT_WIDTH_PX = 1152
MIN_TEXT_PX = 11.0


def report_min_pt(figure_width_inches: float) -> float:
    """The smallest font size (points) that stays ≥ 11 px in the report for a figure this wide."""
    return MIN_TEXT_PX * 72.0 * figure_width_inches / REPORT_WIDTH_PX


def cell_font_size(figure_width_inches: float, cell_width_inches: float, cell_height_inches: float, characters: int,
                   largest: float = 7.0) -> float | None:
    """The font size for a number of ``characters`` written in a heat-map cell: the largest, up to
    ``largest``, that fits the cell (digits 0.64 em wide, a line 1.25 em high, a little margin);
    None when even the report's minimum (:func:`report_min_pt`, and at least 6 pt) does not fit,
    and the colour bar alone tells the value."""
    fits = min(largest, 0.9 * cell_width_inches * 72.0 / (0.64 * max(characters, 1)),
               0.9 * cell_height_inches * 72.0 / 1.25)
    return fits if fits >= max(report_min_pt(figure_width_inches), 6.0) else None


def _bar_number(value: float, decimals: int) -> str:
    text = f"{value:.{decimals}f}"
    return ("0" if float(text) == 0 else text).replace("-", "−")


def label_colour_bar_ends(bar: Any, length_inches: float) -> None:
    """Ticks at both ends of a colour bar (its lowest and highest value, so the reader sees the
    range) and round values between them, none nearer an end than a label's height."""
    from matplotlib.ticker import MaxNLocator

    low, high = float(bar.norm.vmin), float(bar.norm.vmax)
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return
    fontsize = FontProperties(size=mpl.rcParams["ytick.labelsize"]).get_size_in_points()
    label = 1.6 * fontsize / 72.0  # inches a label needs along the bar, gap included
    bins = max(1, int(length_inches / (2.0 * label)))
    inner = [float(t) for t in MaxNLocator(nbins=bins).tick_values(low, high)]
    margin = (high - low) * label / max(length_inches, 1e-9)
    inner = [t for t in inner if low + margin < t < high - margin]
    step = min((b - a for a, b in zip(inner, inner[1:])), default=(high - low) / 2)
    decimals = max(0, min(6, -math.floor(math.log10(step)))) if step > 0 else 3
    # round values between, the ends as they are: one decimal more where rounding would move them
    ends = [e for e in (low, high)]
    end_decimals = [decimals + (abs(round(e, decimals) - e) > 1e-9 * max(abs(e), 1.0)) for e in ends]
    ticks = [low, *inner, high]
    labels = ([_bar_number(low, end_decimals[0])] + [_bar_number(t, decimals) for t in inner]
              + [_bar_number(high, end_decimals[1])])
    while len(set(labels)) < len(labels) and decimals < 6:
        decimals += 1
        labels = [_bar_number(t, decimals + 1) for t in ticks]
    bar.set_ticks(ticks, labels=labels)
    bar.ax.minorticks_off()


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


def layer_axis(ax: Axes, layers: Sequence[int], nbins: int, steps: Sequence[int]) -> None:
    """An x axis of layers: padded by half a layer (or 2 % of the span), whole-layer ticks
    (at most ``nbins``, spaced by one of ``steps`` × a power of ten), labelled "Layer"."""
    low, high = min(layers), max(layers)
    pad = max(0.5, 0.02 * (high - low))
    ax.set_xlim(low - pad, high + pad)
    if low == high:
        ax.xaxis.set_major_locator(FixedLocator([low]))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=nbins, integer=True, steps=list(steps)))
    ax.set_xlabel("Layer")
