"""Figures of calibration and expert clustering (docs/methods.md §3).

- :func:`cluster_map`: experts × layers, each cell coloured by the expert's cluster in its layer
  (an expert alone in its cluster is light grey), the dominant expert of every cluster marked
  with a dot: each row has exactly G dots, the experts a merged layer keeps.
- :func:`expert_usage`: usage frequency per expert (the share of the layer's top-k selections)
  for up to four layers of a calibration, against the uniform share 1/E.
- :func:`cluster_usage`: the same bars for a clustering run, coloured by cluster, dominant
  experts outlined: M-SMoE's dominant experts are the G tallest bars of each layer.

Cluster colours cycle through a colour-blind-safe palette in the order of the cluster ids of a
layer (ids are ordered by each cluster's lowest expert), so two clusters of one layer share a
colour only beyond :data:`CLUSTER_COLOURS`' length; the dots and, for small layers, the cluster
ids written in the cells keep them apart.
"""

from __future__ import annotations

import textwrap
from typing import Optional, Sequence

import matplotlib as mpl
import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, MaxNLocator

from moelens.errors import ConfigError
from moelens.figures.distance import default_heatmap_layers
from moelens.figures.style import REFERENCE_GREY, fit_legend, new_figure, styled
from moelens.ranges import compact_ranges
from moelens.results import Run

#: Okabe & Ito, then Tol's "muted" and "light" sets: colour-blind safe, none of them grey.
CLUSTER_COLOURS = (
    "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7",
    "#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255", "#AA4499",
)
SINGLETON_GREY = "#dedede"
USAGE_GREY = "#7f7f7f"
#: Cells annotated with their cluster id up to this many experts and layers.
ANNOTATE_UP_TO = (16, 24)
MAX_PANELS = 4
METHOD_NAMES = {"hc-smoe": "HC-SMoE", "m-smoe": "M-SMoE"}


def _check_run(run: object, analyses: Sequence[str], figure: str, table: str) -> Run:
    if not isinstance(run, Run):
        raise ConfigError(f"{figure} draws a moelens run; got a {type(run).__name__} (load one with moelens.load_run)")
    analysis = run.manifest.get("analysis")
    if analysis not in analyses:
        raise ConfigError(f"run {run.label!r} is a {analysis or 'unnamed'} run; {figure} draws {' or '.join(analyses)} runs")
    if table not in run.tables or run.tables[table].empty:
        raise ConfigError(f"run {run.label!r} has no {table} table; run the {analysis} analysis again")
    return run


def cluster_colours(labels: Sequence[int]) -> list[str]:
    """A colour per expert: its cluster's (clusters of two or more, in id order) or grey alone."""
    labels = np.asarray(labels, dtype=np.int64)
    sizes = np.bincount(labels)
    shared = [c for c in range(sizes.size) if sizes[c] > 1]
    colour = {c: CLUSTER_COLOURS[i % len(CLUSTER_COLOURS)] for i, c in enumerate(shared)}
    return [colour.get(int(c), SINGLETON_GREY) for c in labels]


def _text_colour(hex_colour: str) -> str:
    r, g, b = mcolors.to_rgb(hex_colour)
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"


def _expert_axis(ax, n_experts: int) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(nbins=min(n_experts, 8), integer=True, steps=[1, 2, 4, 5, 8, 10]))


def _method_title(run: Run) -> str:
    o = run.manifest.get("options") or {}
    return METHOD_NAMES.get(str(o.get("method")), str(o.get("method")))


def _run_line(run: Run) -> str:
    """The run's label, with HC-SMoE's linkage and distance."""
    o = run.manifest.get("options") or {}
    extra = f" · {o.get('linkage')} linkage, {o.get('distance')}" if o.get("method") == "hc-smoe" else ""
    return run.label + extra


def _suptitle(fig: Figure, lines: Sequence[str]) -> None:
    size = FontProperties(size=mpl.rcParams["figure.titlesize"]).get_size_in_points()
    characters = int(fig.get_figwidth() * 72 / (0.6 * size))
    fig.suptitle("\n".join(textwrap.fill(line, characters, break_long_words=False) for line in lines))


@styled
def cluster_map(run: Run) -> Figure:
    """Experts × layers coloured by cluster, the dominant expert of each cluster marked."""
    run = _check_run(run, ("clustering",), "cluster_map", "clusters")
    table = run["clusters"]
    layers = sorted(int(v) for v in table["layer"].unique())
    n_experts = int(table["expert"].max()) + 1
    n_layers = len(layers)
    image = np.ones((n_layers, n_experts, 3))
    fig = new_figure(min(max(1.6 + 0.32 * n_experts, 5.2), 11.0), min(max(1.9 + 0.3 * n_layers, 3.0), 9.5))
    ax = fig.subplots()
    annotate = n_experts <= ANNOTATE_UP_TO[0] and n_layers <= ANNOTATE_UP_TO[1]
    dots_x, dots_y = [], []
    for row, layer in enumerate(layers):
        rows = table[table["layer"] == layer].sort_values("expert")
        experts = rows["expert"].to_numpy(int)
        labels = rows["cluster"].to_numpy(int)
        colours = cluster_colours(labels)
        image[row, experts] = [mcolors.to_rgb(c) for c in colours]
        for e, dominant in zip(experts, rows["dominant"].to_numpy(bool)):
            if dominant:
                dots_x.append(e)
                dots_y.append(row)
        if annotate:
            for e, c, colour in zip(experts, labels, colours):
                # the cluster's id within this layer, in the cell's upper left (the dominant dot sits in its centre)
                ax.text(e - 0.27, row - 0.2, str(c), ha="center", va="center", fontsize=8, fontweight="bold", color=_text_colour(colour))
    ax.imshow(image, aspect="auto", interpolation="nearest")
    ax.grid(False)
    # white lines between cells: neighbours of one colour still read as separate experts
    ax.set_xticks(np.arange(-0.5, n_experts, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, n_layers, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.8 if n_experts <= 64 else 0.3)
    ax.tick_params(which="minor", length=0)
    size = 22 if n_experts <= 16 else max(3.0, 700.0 / n_experts)
    ax.scatter(dots_x, dots_y, s=size, c="black", edgecolors="white", linewidths=0.6, zorder=3)
    _expert_axis(ax, n_experts)
    step = max(1, int(np.ceil(n_layers / 16)))
    ax.yaxis.set_major_locator(FixedLocator(list(range(0, n_layers, step))))
    ax.set_yticklabels([str(layers[i]) for i in range(0, n_layers, step)])
    ax.set_xlabel("Expert")
    ax.set_ylabel("Layer")
    handles = [
        Line2D([], [], marker="o", linestyle="none", markerfacecolor="black", markeredgecolor="white", markersize=6, label="dominant expert (kept)"),
        Patch(facecolor=SINGLETON_GREY, edgecolor="none", label="alone in its cluster"),
        Patch(facecolor=CLUSTER_COLOURS[0], edgecolor="none",
              label=("colour and number = cluster within its layer (ids and colours restart in every layer)" if annotate else
                     "colour = cluster within its layer (colours restart in every layer: compare within a row)")),
    ]
    fit_legend(fig, lambda n: fig.legend(handles=handles, loc="outside lower center", ncols=n), 3)
    _suptitle(fig, [f"Expert clusters per layer ({_method_title(run)})", _run_line(run)])
    return fig


def _chosen(layers: Optional[Sequence[int]], available: Sequence[int], run: Run) -> list[int]:
    if layers is None:
        return default_heatmap_layers(available)
    chosen = [int(v) for v in layers]
    if not chosen:
        raise ConfigError(f"the layer list is empty; give 1 to {MAX_PANELS} of run {run.label!r}'s layers ({compact_ranges(available)})")
    if len(chosen) > MAX_PANELS:
        raise ConfigError(f"{len(chosen)} layers asked; the usage figure draws at most {MAX_PANELS} (draw the rest in another figure)")
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"layers {chosen} name a layer twice; list each layer once")
    missing = [v for v in chosen if v not in set(available)]
    if missing:
        raise ConfigError(f"layer {missing[0]} is not in run {run.label!r} (it has layers {compact_ranges(available)})")
    return chosen


def _usage_figure(run: Run, layers: Optional[Sequence[int]], clusters: Optional[pd.DataFrame], title: str, subtitle: str) -> Figure:
    usage = run["calibration_usage"]
    available = sorted(int(v) for v in usage["layer"].unique())
    chosen = _chosen(layers, available, run)
    n_experts = int(usage["expert"].max()) + 1
    n = len(chosen)
    cols = 2 if n > 1 and n_experts <= 32 else 1
    rows_n = int(np.ceil(n / cols))
    width = min(max(1.4 + (0.28 if cols == 2 else 0.12) * n_experts * cols, 5.6), 11.0)
    fig = new_figure(width, 1.0 + 1.9 * rows_n)
    axes = np.atleast_1d(fig.subplots(rows_n, cols, sharey=True, squeeze=False)).ravel()
    top = float(usage[usage["layer"].isin(chosen)]["frequency"].max())
    for ax, layer in zip(axes, chosen):
        rows = usage[usage["layer"] == layer].sort_values("expert")
        experts = rows["expert"].to_numpy(int)
        freq = rows["frequency"].to_numpy(float)
        colours: list[str] = [USAGE_GREY] * len(experts)
        edges = ["none"] * len(experts)
        if clusters is not None:
            c = clusters[clusters["layer"] == layer].sort_values("expert")
            colours = cluster_colours(c["cluster"].to_numpy(int))
            edges = ["black" if d else "none" for d in c["dominant"].to_numpy(bool)]
        ax.bar(experts, freq, width=0.8, color=colours, edgecolor=edges, linewidth=1.1)
        uniform = 1.0 / len(experts)
        ax.axhline(uniform, color=REFERENCE_GREY, linestyle="--", linewidth=1.0)
        ax.set_title(f"Layer {layer}")
        ax.set_xlim(-0.7, n_experts - 0.3)
        _expert_axis(ax, n_experts)
        ax.grid(axis="x", visible=False)
    for ax in axes[n:]:
        ax.set_visible(False)
    for ax in axes[:n]:
        ax.set_ylim(0, top * 1.12 if top > 0 else 1.0)
    for i, ax in enumerate(axes[:n]):
        if i % cols == 0:
            ax.set_ylabel("Usage frequency")
        if i >= n - cols:
            ax.set_xlabel("Expert")
    handles = [Line2D([], [], color=REFERENCE_GREY, linestyle="--", label="uniform 1/E")]
    if clusters is not None:
        handles += [Patch(facecolor="white", edgecolor="black", linewidth=1.1, label="dominant expert"),
                    Patch(facecolor=SINGLETON_GREY, edgecolor="none", label="alone in its cluster")]
    else:
        handles.insert(0, Patch(facecolor=USAGE_GREY, edgecolor="none", label="f_e = share of the layer's top-k selections"))
    fit_legend(fig, lambda k: fig.legend(handles=handles, loc="outside lower center", ncols=k), len(handles))
    _suptitle(fig, [title, subtitle])
    return fig


@styled
def expert_usage(run: Run, layers: Optional[Sequence[int]] = None) -> Figure:
    """Usage frequency per expert (share of the layer's top-k selections) in up to four layers."""
    run = _check_run(run, ("calibration",), "expert_usage", "calibration_usage")
    return _usage_figure(run, layers, None, "Expert usage frequency", run.label)


@styled
def cluster_usage(run: Run, layers: Optional[Sequence[int]] = None) -> Figure:
    """Usage frequency per expert coloured by cluster, dominant experts outlined (up to four layers)."""
    run = _check_run(run, ("clustering",), "cluster_usage", "clusters")
    return _usage_figure(run, layers, run["clusters"], f"Expert usage by cluster ({_method_title(run)})", _run_line(run))


__all__ = ["CLUSTER_COLOURS", "SINGLETON_GREY", "cluster_colours", "cluster_map", "cluster_usage", "expert_usage"]
