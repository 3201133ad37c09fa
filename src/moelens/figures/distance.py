"""Figures of the expert-distance analysis (docs/methods.md §2; seeds 000/001, after REAP's Fig. 4d).

:func:`expert_distance` draws one line per (run, pairing) against the layer: the mean
singular-vector alignment solid, the mean relative L2 distance dashed, each with a band from
the first to the third quartile over the layer's pairs. :func:`expert_distance_heatmap` shows
one ``within`` run pair by pair: an experts × experts matrix per layer.

A pairing keeps its colour in every figure (:data:`PAIRING_COLOURS`, Okabe & Ito): a reader
who learnt that orange is HC-SMoE in one figure reads it so in the next. When several runs
share a pairing, each gets a marker and its label in the legend. Lines that lie on top of each
other (HC-SMoE and M-SMoE when both clusterings agree) get markers of their own, the first
hollow and large, the next inside it, and the legend says "= M-SMoE".
"""

from __future__ import annotations

import textwrap
import zlib
from typing import Iterable, Optional, Sequence, Union

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.legend import Legend
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.transforms import offset_copy

from moelens.errors import ConfigError
from moelens.figures.style import (
    RUN_MARKERS,
    SEQUENTIAL_CMAP,
    _renderer,
    axes_width_inches,
    layer_axis,
    new_figure,
    styled,
    thin_tick_labels,
)
from moelens.ranges import compact_ranges
from moelens.results import Run

ANALYSIS = "expert_distance"
MATRICES = ("gate", "up", "down", "expert")
MEASURES = ("sv_align", "rel_l2")

#: How a pairing is named in a legend (REAP's Fig. 4d names; "IFT" = instruction fine-tuned).
PAIRING_NAMES = {
    "base-tuned": "Base to IFT",
    "within": "Within layer",
    "hc-smoe": "HC-SMoE",
    "m-smoe": "M-SMoE",
    "hc-smoe-permuted": "HC-SMoE – permuted",
    "m-smoe-permuted": "M-SMoE – permuted",
}
#: One colour per pairing, the same in every figure (Okabe & Ito; grey for the reference
#: pairing base→tuned as in the seed, so the clusterings stand out against it).
PAIRING_COLOURS = {
    "base-tuned": "#6E6E6E",
    "within": "#0072B2",
    "hc-smoe": "#E69F00",
    "m-smoe": "#56B4E9",
    "hc-smoe-permuted": "#D55E00",
    "m-smoe-permuted": "#CC79A7",
}
#: Colours of pairings not listed above, picked by a hash of the name (stable across figures
#: and sessions, unlike the order of appearance); Tol's colour-blind-safe "muted" set.
EXTRA_COLOURS = ("#009E73", "#882255", "#44AA99", "#332288", "#117733", "#999933")

MEASURE_AXIS = {"sv_align": "SV Align. ↑", "rel_l2": "L2 Distance ↓"}
MEASURE_NAMES = {"sv_align": "Singular-vector alignment", "rel_l2": "L2 distance"}
MEASURE_LINESTYLES = {"sv_align": "-", "rel_l2": "--"}
MATRIX_NAMES = {"expert": "whole expert", "gate": "gate matrix", "up": "up matrix", "down": "down matrix"}
#: An expert compared with itself: sv_align = 1, rel_l2 = 0 (the heat map's diagonal).
SELF_DISTANCE = {"sv_align": 1.0, "rel_l2": 0.0}

Y_LABEL = "SV Align. ↑ / L2 Distance ↓"
BAND_ALPHA = 0.16
#: Room above the highest value and below a negative lowest one (data units).
Y_MARGIN = 0.05
#: Characters per line of a legend entry; longer ones (a pairing with its run label) wrap.
LEGEND_WRAP = 30
#: Heat-map panels at most, and the heat map's cells annotated with their value up to this E.
MAX_PANELS = 4
ANNOTATE_UP_TO = 8

RunsArg = Union[Run, Iterable[Run]]


def pairing_name(pairing: str) -> str:
    """The legend name of a pairing ("base-tuned" → "Base to IFT"); unknown ones as they are."""
    return PAIRING_NAMES.get(pairing, pairing)


def pairing_colour(pairing: str) -> str:
    """The fixed colour of a pairing."""
    if pairing in PAIRING_COLOURS:
        return PAIRING_COLOURS[pairing]
    return EXTRA_COLOURS[zlib.crc32(pairing.encode("utf-8")) % len(EXTRA_COLOURS)]


def _as_runs(runs: RunsArg) -> list[Run]:
    listed = [runs] if isinstance(runs, Run) else list(runs)
    if not listed:
        raise ConfigError("no runs to draw; give at least one expert_distance run")
    return listed


def _check_run(run: object, figure: str) -> Run:
    if not isinstance(run, Run):
        raise ConfigError(f"{figure} draws moelens runs; got a {type(run).__name__} (load one with moelens.load_run)")
    analysis = run.manifest.get("analysis")
    if analysis != ANALYSIS:
        raise ConfigError(f"run {run.label!r} is a {analysis or 'unnamed'} run; {figure} draws expert_distance runs "
                          "(moelens distance)")
    return run


def _table(run: Run, name: str) -> pd.DataFrame:
    if name not in run.tables:
        found = ", ".join(sorted(run.tables)) or "none"
        raise ConfigError(f"run {run.label!r} has no {name} table (it has {found}); run the expert_distance analysis again")
    return run.tables[name]


def _check_choice(value: str, choices: Sequence[str], what: str) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def _wrap(text: str) -> str:
    return textwrap.fill(text, LEGEND_WRAP, break_long_words=False, break_on_hyphens=False)


# ---------------------------------------------------------------------------------------------
# Lines against the layer


def _curves(runs: Sequence[Run], matrix: str) -> list[tuple[int, str, pd.DataFrame]]:
    """(run index, pairing, rows of ``expert_distance_layers`` for that matrix) per line pair."""
    per_run = []
    for run in runs:
        table = _table(run, "expert_distance_layers")
        per_run.append(table[table["matrix"] == matrix])
    lacking = [run.label for run, rows in zip(runs, per_run) if rows.empty]
    if len(lacking) == len(runs):
        found = sorted({m for run in runs for m in _table(run, "expert_distance_layers")["matrix"].unique()})
        raise ConfigError(f"no run has rows for matrix {matrix!r} (they have {', '.join(found) or 'none'}); choose one of those")
    if lacking:
        # A figure that silently left out a run would be read as the whole comparison.
        raise ConfigError(f"run(s) {', '.join(map(repr, lacking))} have no rows for matrix {matrix!r}; "
                          "draw them with a matrix they computed, or leave them out")
    curves = []
    for index, rows in enumerate(per_run):
        for pairing in dict.fromkeys(rows["pairing"]):
            curves.append((index, str(pairing), rows[rows["pairing"] == pairing]))
    return curves


def _measure_curve(rows: pd.DataFrame, measure: str) -> pd.DataFrame:
    """mean, q25 and q75 of ``measure`` indexed by layer (ascending)."""
    picked = rows[rows["measure"] == measure].sort_values("layer")
    return picked.set_index("layer")[["mean", "q25", "q75"]].astype(float)


def _draw_pairing(ax: Axes, rows: pd.DataFrame, colour: str, marker: Optional[str], gid: str, stagger: int = 0,
                  marker_style: Optional[dict] = None) -> list[float]:
    """The solid sv_align and dashed rel_l2 lines of one (run, pairing) with their quartile
    bands; returns every value drawn (for the y range). ``stagger`` shifts the markers along the
    line by that many thirds of their spacing, so lines drawn on top of each other show each
    one's markers."""
    values: list[float] = []
    for measure in MEASURES:
        curve = _measure_curve(rows, measure)
        if curve.empty:
            continue
        layers = curve.index.to_numpy(float)
        single = len(layers) == 1
        line_marker = marker or ("o" if single else None)
        step = max(1, len(layers) // 12)
        markevery = (stagger * max(1, step // 3) % step, step) if step > 1 else 1
        style = {"marker": line_marker, "markersize": 5 if single else 4, **(marker_style or {})}
        (line,) = ax.plot(layers, curve["mean"].to_numpy(), color=colour, linestyle=MEASURE_LINESTYLES[measure],
                          markevery=markevery, zorder=3, **style)
        line.set_gid(f"{gid}:{measure}")
        if single:
            # A band over one layer has no width: the quartiles become an error bar.
            mean, q25, q75 = curve.iloc[0]
            bar = ax.errorbar(layers, [mean], yerr=[[mean - q25], [q75 - mean]], color=colour, alpha=0.55,
                              linestyle="none", capsize=3, linewidth=1.2, zorder=2)
            bar.lines[2][0].set_gid(f"{gid}:{measure}:band")
        else:
            band = ax.fill_between(layers, curve["q25"].to_numpy(), curve["q75"].to_numpy(), color=colour,
                                   alpha=BAND_ALPHA, linewidth=0, zorder=1)
            band.set_gid(f"{gid}:{measure}:band")
        values.extend(curve.to_numpy().ravel().tolist())
    return values


#: Markers of lines that lie on top of each other, the first of a group hollow and large, the
#: next ones smaller inside it, so every line of the group shows.
COINCIDENT_MARKERS = (
    {"marker": "o", "markersize": 8, "markerfacecolor": "none", "markeredgewidth": 1.4},
    {"marker": "x", "markersize": 6, "markeredgewidth": 1.6},
    {"marker": "+", "markersize": 9, "markeredgewidth": 1.4},
    {"marker": "D", "markersize": 3},
)
#: Two lines closer than this share of the y range at every layer are drawn on top of each other.
COINCIDE_SHARE = 0.006


def coincident_with(curves: Sequence[tuple[int, str, pd.DataFrame]], span: float) -> dict[int, int]:
    """For each curve (by position) that another, earlier curve hides, that earlier curve's
    position: every mean of both measures, at every layer, within ``COINCIDE_SHARE × span``."""
    def means(rows: pd.DataFrame) -> pd.Series:
        return rows.set_index(["measure", "layer"])["mean"].astype(float).sort_index()

    tolerance = COINCIDE_SHARE * span
    found: dict[int, int] = {}
    series = [means(rows) for _i, _p, rows in curves]
    for later in range(len(curves)):
        for earlier in range(later):
            if earlier in found:
                continue  # compare with the first of a group only
            a, b = series[earlier], series[later]
            if a.index.equals(b.index) and np.allclose(a.to_numpy(), b.to_numpy(), rtol=0.0, atol=tolerance, equal_nan=True):
                found[later] = earlier
                break
    return found


def _stacked_legends(fig: Figure, ax: Axes, groups: Sequence[tuple[str, list]]) -> list[Legend]:
    """Legends right of ``ax``, top-aligned, each below the one before (a gap of one line): they
    never cover data. Offsets are in points, so they hold at any size and dpi."""
    renderer = _renderer(fig)
    gap_points = 0.8 * FontProperties(size=mpl.rcParams["legend.fontsize"]).get_size_in_points()
    legends: list[Legend] = []
    below = 0.0
    for number, (title, handles) in enumerate(groups):
        legend = ax.legend(handles=handles, title=title, loc="upper left", alignment="left", borderaxespad=0.0,
                           bbox_to_anchor=(1.03, 1.0),
                           bbox_transform=offset_copy(ax.transAxes, fig=fig, y=-below, units="points"))
        if number < len(groups) - 1:
            ax.add_artist(legend)  # the next ax.legend() replaces ax.legend_; keep this one drawn
            # add_artist clips an artist to the axes, and constrained layout then leaves out
            # what lies outside them: this legend would run off the figure.
            legend.set_clip_on(False)
        legends.append(legend)
        below += legend.get_window_extent(renderer).height * 72.0 / fig.dpi + gap_points
    # Grow the figure when the legends are taller than the axes would be (many runs).
    needed = below / 72.0 + 1.0
    if fig.get_figheight() < needed:
        fig.set_figheight(needed)
    return legends


@styled
def expert_distance(runs: Sequence[Run], matrix: str = "expert") -> Figure:
    """Expert distance against the layer: SV alignment solid, L2 distance dashed, a colour per
    pairing, bands over the pairs' quartiles (REAP Fig. 4d)."""
    runs = [_check_run(run, "expert_distance") for run in _as_runs(runs)]
    _check_choice(matrix, MATRICES, "matrix")
    curves = _curves(runs, matrix)

    runs_per_pairing: dict[str, list[int]] = {}
    for index, pairing, _rows in curves:
        runs_per_pairing.setdefault(pairing, []).append(index)

    fig = new_figure(7.2, 3.9)
    ax = fig.subplots()
    values: list[float] = []
    layers: set[int] = set()
    cluster_handles: dict[str, list] = {}  # by pairing: runs of one pairing stand together
    drawn = np.concatenate([rows[["mean", "q25", "q75"]].to_numpy(float).ravel() for _i, _p, rows in curves])
    drawn = drawn[np.isfinite(drawn)]
    hidden = coincident_with(curves, max(1.05, float(np.ptp(drawn)) if drawn.size else 1.0))
    group_of = {pos: hidden.get(pos, pos) for pos in range(len(curves))}
    members = {first: [p for p in range(len(curves)) if group_of[p] == first] for first in set(group_of.values())}

    def curve_name(pos: int) -> str:
        index, pairing, _rows = curves[pos]
        shared = runs_per_pairing[pairing]
        return pairing_name(pairing) + (f" ({runs[index].label})" if len(shared) > 1 else "")

    for pos, (index, pairing, rows) in enumerate(curves):
        shared = runs_per_pairing[pairing]
        colour = pairing_colour(pairing)
        marker = RUN_MARKERS[shared.index(index) % len(RUN_MARKERS)] if len(shared) > 1 else None
        group = members[group_of[pos]]
        rank = group.index(pos)
        style = COINCIDENT_MARKERS[rank % len(COINCIDENT_MARKERS)] if len(group) > 1 else None
        values += _draw_pairing(ax, rows, colour, marker, gid=f"{index}:{pairing}", stagger=rank, marker_style=style)
        layers.update(int(v) for v in rows["layer"])
        label = curve_name(pos)
        if rank > 0:  # drawn over the first of its group: say so, or the reader looks for a missing line
            label += f" (= {curve_name(group[0])})"
        if style is not None:
            handle = Line2D([], [], color=colour, linestyle="none", label=_wrap(label), **style)
        elif len(shared) > 1:
            handle = Line2D([], [], color=colour, marker=marker, markersize=6, linestyle="none", label=_wrap(label))
        else:
            handle = Patch(facecolor=colour, edgecolor="none", label=_wrap(label))
        cluster_handles.setdefault(pairing, []).append(handle)

    layer_axis(ax, sorted(layers), nbins=8, steps=(1, 2, 4, 5, 8, 10))
    finite = np.asarray(values, float)
    finite = finite[np.isfinite(finite)]
    top = max(1.05, float(finite.max()) + Y_MARGIN) if finite.size else 1.05
    bottom = min(0.0, float(finite.min()) - Y_MARGIN) if finite.size else 0.0
    ax.set_ylim(bottom, top)
    ax.set_ylabel(Y_LABEL)
    ax.set_title(f"Expert distance per layer ({MATRIX_NAMES[matrix]})")
    dist_handles = [Line2D([], [], color="black", linestyle=MEASURE_LINESTYLES[m], label=MEASURE_NAMES[m]) for m in MEASURES]
    _stacked_legends(fig, ax, [("Dist. Type", dist_handles), ("Expert clusters", sum(cluster_handles.values(), []))])
    return fig


# ---------------------------------------------------------------------------------------------
# Experts × experts heat map


def default_heatmap_layers(layers: Sequence[int]) -> list[int]:
    """Every layer when there are at most four; else the first, two in the middle and the last."""
    layers = sorted(layers)
    n = len(layers)
    if n <= MAX_PANELS:
        return layers
    picks = sorted({0, round((n - 1) / 3), round(2 * (n - 1) / 3), n - 1})
    return [layers[i] for i in picks]


def _chosen_layers(layers: Optional[Iterable[int]], available: Sequence[int], run: Run) -> list[int]:
    if layers is None:
        return default_heatmap_layers(available)
    chosen = [int(layer) for layer in layers]
    if not chosen:
        raise ConfigError(f"the layer list is empty; give 1 to {MAX_PANELS} of run {run.label!r}'s layers "
                          f"({compact_ranges(available)})")
    if len(chosen) > MAX_PANELS:
        raise ConfigError(f"{len(chosen)} layers asked; the heat map draws at most {MAX_PANELS} "
                          "(draw the rest in another figure)")
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"layers {chosen} name a layer twice; list each layer once")
    missing = [layer for layer in chosen if layer not in set(available)]
    if missing:
        raise ConfigError(f"layer {missing[0]} is not in run {run.label!r}; its within-layer pairs cover layers "
                          f"{compact_ranges(available)}")
    return chosen


def distance_matrix(rows: pd.DataFrame, measure: str, n_experts: int) -> np.ndarray:
    """The symmetric E × E matrix of ``measure`` from the i < j rows of one layer; the diagonal
    is an expert against itself (sv_align 1, rel_l2 0), a pair without a row is NaN."""
    matrix = np.full((n_experts, n_experts), np.nan)
    a = rows["expert_a"].to_numpy(int)
    b = rows["expert_b"].to_numpy(int)
    v = rows[measure].to_numpy(float)
    matrix[a, b] = v
    matrix[b, a] = v
    np.fill_diagonal(matrix, SELF_DISTANCE[measure])
    return matrix


def _heatmap_norm(matrices: Sequence[np.ndarray], measure: str) -> Normalize:
    """sv_align: [0, 1], or [−max|v|, 1] when a pair is negative; rel_l2: [0, max]. One
    linear scale for every panel, so equal colours mean equal values."""
    off = np.concatenate([m[~np.eye(len(m), dtype=bool)] for m in matrices])
    off = off[np.isfinite(off)]
    if measure == "sv_align":
        low = float(off.min()) if off.size else 0.0
        return Normalize(vmin=0.0 if low >= 0 else -float(np.abs(off).max()), vmax=1.0)
    return Normalize(vmin=0.0, vmax=max(float(off.max()) if off.size else 0.0, 1e-9))


def _expert_ticks(ax: Axes, n_experts: int) -> tuple[list[int], list[str]]:
    """Expert indices 0, s, 2s, … with s the smallest power of two that leaves at most eight
    labels, none nearer than a label's gap to the next (a regular step reads better than gaps
    left by thinning)."""
    size = FontProperties(size=mpl.rcParams["xtick.labelsize"]).get_size_in_points()
    inches_per_expert = axes_width_inches(ax) / max(n_experts, 1)
    step = 1
    while True:
        positions = list(range(0, n_experts, step))
        labels = [str(p) for p in positions]
        fits = len(thin_tick_labels(positions, labels, inches_per_expert, size)) == len(positions)
        if (len(positions) <= 8 and fits) or step >= n_experts:
            return positions, labels
        step *= 2


def _annotate(ax: Axes, matrix: np.ndarray, norm: Normalize, cmap) -> None:
    size = 7 if len(matrix) <= 4 else 5.5
    for (i, j), value in np.ndenumerate(matrix):
        if np.isfinite(value):
            r, g, b, _ = cmap(norm(value))
            colour = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"
            text = f"{value:.2f}".replace("-0.00", "0.00").replace("-", "−")
            ax.text(j, i, text, ha="center", va="center", fontsize=size, color=colour)


@styled
def expert_distance_heatmap(run: Run, layers: Optional[Sequence[int]] = None, measure: str = "sv_align",
                            matrix: str = "expert") -> Figure:
    """Experts × experts heat map of sv_align or rel_l2 for up to four layers of a within run."""
    run = _check_run(run, "expert_distance_heatmap")
    _check_choice(measure, MEASURES, "measure")
    _check_choice(matrix, MATRICES, "matrix")
    pairs = _table(run, "expert_distance")
    within = pairs[pairs["pairing"] == "within"]
    if within.empty:
        found = ", ".join(dict.fromkeys(pairs["pairing"])) or "no pairs"
        raise ConfigError(f"run {run.label!r} has no within pairing (it has {found}); the heat map needs every pair of a "
                          "layer's experts: run moelens distance MODEL --pairing within")
    rows = within[within["matrix"] == matrix]
    if rows.empty:
        found = ", ".join(dict.fromkeys(within["matrix"]))
        raise ConfigError(f"run {run.label!r} has no rows for matrix {matrix!r} (it has {found}); choose one of those")
    available = sorted(int(v) for v in rows["layer"].unique())
    chosen = _chosen_layers(layers, available, run)
    rows = rows[rows["layer"].isin(chosen)]
    n_experts = int(max(rows["expert_a"].max(), rows["expert_b"].max())) + 1
    matrices = [distance_matrix(rows[rows["layer"] == layer], measure, n_experts) for layer in chosen]
    norm = _heatmap_norm(matrices, measure)
    # Reversed for rel_l2, so that alike experts are bright for both measures.
    cmap = mpl.colormaps[SEQUENTIAL_CMAP if measure == "sv_align" else SEQUENTIAL_CMAP + "_r"].with_extremes(bad="#d9d9d9")

    n = len(chosen)
    panel = 2.4  # inches: square panels, the figure no wider than they need
    # At least 4.8 inches, so that the title of a single panel keeps to two lines.
    fig = new_figure(max(panel * n + 1.3, 4.8), panel + 1.3)
    # Square panels: "compressed" closes the space that constrained layout leaves between them
    # and keeps the colour bar beside the last one.
    fig.set_layout_engine("compressed")
    axes = np.atleast_1d(fig.subplots(1, n, sharex=True, sharey=True, squeeze=False)).ravel()
    image = None
    for ax, layer, values in zip(axes, chosen, matrices):
        image = ax.imshow(values, cmap=cmap, norm=norm, interpolation="nearest")
        ax.grid(False)
        ax.set_title(f"Layer {layer}")
        ax.set_xlabel("Expert j")
        if n_experts <= ANNOTATE_UP_TO:
            _annotate(ax, values, norm, cmap)
    ticks, labels = _expert_ticks(axes[0], n_experts)
    for ax in axes:
        ax.set_xticks(ticks, labels)
        ax.set_yticks(ticks, labels)
    axes[0].set_ylabel("Expert i")
    # fraction and pad are shares of the panels' width: about 0.12 inch of pad, 0.12 of bar.
    fig.colorbar(image, ax=list(axes), label=MEASURE_AXIS[measure], shrink=0.9,
                 fraction=0.12 / (panel * n), pad=0.12 / (panel * n), aspect=20)
    title_size = FontProperties(size=mpl.rcParams["figure.titlesize"]).get_size_in_points()
    characters = int(fig.get_figwidth() * 72 / (0.6 * title_size))  # a character is about 0.6 em wide
    lines = [f"{MEASURE_NAMES[measure]} of expert pairs ({MATRIX_NAMES[matrix]})", run.label]
    fig.suptitle("\n".join(textwrap.fill(line, characters, break_long_words=False) for line in lines))
    return fig


__all__ = [
    "PAIRING_COLOURS", "PAIRING_NAMES", "default_heatmap_layers", "distance_matrix", "expert_distance",
    "expert_distance_heatmap", "pairing_colour", "pairing_name",
]
