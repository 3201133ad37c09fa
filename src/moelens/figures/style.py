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
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

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

K_AXIS_LABEL = "k (leading singular directions of the expert, log₂ scale)"

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


def log2_k_axis(ax: Axes, ks: Sequence[int], label: bool = True, max_labels: int = 8) -> None:
    """A log₂ x axis over ``ks``: a tick at every power of two, integer labels (thinned when
    there are more than ``max_labels`` so they never collide)."""
    low, high = min(ks), max(ks)
    ax.set_xscale("log", base=2)
    ax.set_xlim(low / 2**0.35, high * 2**0.35)
    powers = powers_of_two_between(low, high) or sorted(set(ks))
    step = max(1, math.ceil(len(powers) / max_labels))
    labelled = powers[::step]
    ax.xaxis.set_major_locator(FixedLocator(labelled))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{round(v)}"))
    ax.xaxis.set_minor_locator(FixedLocator([p for p in powers if p not in labelled]))
    ax.xaxis.set_minor_formatter(NullFormatter())
    if label:
        ax.set_xlabel(K_AXIS_LABEL)


def markevery_powers_of_two(ks: Sequence[int]) -> list[int]:
    """Indices of ``ks`` that are powers of two: markers stay sparse when every k is kept."""
    return [i for i, k in enumerate(ks) if k > 0 and (k & (k - 1)) == 0] or list(range(len(ks)))



def k_column_ticks(ks: Sequence[int], max_labels: int = 8) -> tuple[list[int], list[str]]:
    """Tick positions and labels for heat-map columns that are the values ``ks``: the columns
    whose k is a power of two (thinned to at most ``max_labels``), else evenly spaced ones."""
    positions = markevery_powers_of_two(ks)
    step = max(1, math.ceil(len(positions) / max_labels))
    positions = positions[::step]
    return positions, [str(ks[i]) for i in positions]


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
