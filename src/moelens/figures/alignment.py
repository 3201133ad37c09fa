"""Figures of the router–expert alignment analysis (seed 004, docs/methods.md §1).

Every function takes runs (or one run) and returns a :class:`~matplotlib.figure.Figure`; save
it with :func:`moelens.figures.save`. Across runs, each run keeps its colour and marker in
every figure (the order given). A run that covers several layers is drawn as one line, the
mean over its layers, with a shaded band from the lowest to the highest layer: six runs × six
layers stay six lines, and :func:`layer_k_heatmap` shows the layers one by one.
"""

from __future__ import annotations

import math
import textwrap
from typing import Iterable, Optional, Sequence, Union

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties

from moelens.errors import ConfigError
from moelens.figures.alignment_data import METRICS, AlignmentView, alignment_views
from moelens.figures.alignment_panels import (
    draw_cos_squared_bars,
    draw_energy_matrix,
    draw_expert_heatmap,
    draw_expert_lines,
    draw_null_distribution,
    draw_random_expectation,
    draw_runs_metric,
    draw_z_cap,
    draw_zero,
    expert_matrix,
    metric_norm,
)
from moelens.figures.style import (
    DIVERGING_CMAP,
    NULL_GREY,
    REFERENCE_GREY,
    SEQUENTIAL_CMAP,
    axes_width_inches,
    cell_font_size,
    fit_legend,
    k_column_ticks,
    label_colour_bar_ends,
    layer_block_ticks,
    layer_label_step,
    log2_k_axis,
    markevery_powers_of_two,
    new_figure,
    run_style,
    styled,
)
from moelens.results import Run

Runs = Union[Run, AlignmentView, Iterable[Union[Run, AlignmentView]]]
#: The k of the per-expert scatter and of the single-run detail panels (nearest stored k).
DETAIL_K = 128


def figure_legend(fig: Figure, axes: Iterable[Axes], max_columns: int = 3) -> None:
    """One legend under the figure with every distinct label of ``axes`` (it never covers data),
    in at most ``max_columns`` columns and never wider than the figure."""
    handles, labels = [], []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels and not label.startswith("_"):
                handles.append(handle)
                labels.append(label)
    if handles:
        columns = min(max_columns, len(labels))
        fit_legend(fig, lambda n: fig.legend(handles, labels, loc="outside lower center", ncols=n), columns)


def null_note(views: Sequence[AlignmentView]) -> str:
    """"null: derangement" (or the list of nulls when runs differ) for a figure title."""
    nulls = list(dict.fromkeys(v.null for v in views))
    return f"null: {nulls[0]}" if len(nulls) == 1 else f"nulls: {', '.join(nulls)}"


def _detail_k(view: AlignmentView, k: Optional[int]) -> int:
    return view.nearest_k(k if k is not None else DETAIL_K, below_d=True)


def _nearest_note(chosen: int, asked: int) -> str:
    return "" if chosen == asked else f" (nearest to {asked})"


def _metric_panels(views: Sequence[AlignmentView], size: tuple[float, float], grid: tuple[int, int],
                   panels: Sequence[tuple[str, str]], title: str) -> tuple[Figure, np.ndarray]:
    """A figure of panels against k (a shared x axis), each one metric of every run: ``panels``
    (metric, panel title) in reading order over the ``grid`` (rows, columns); ``title`` the
    figure's, the null named after it. The axes come back as the grid's array."""
    fig = new_figure(*size)
    axes = fig.subplots(*grid, sharex=True)
    for ax, (metric, panel_title) in zip(axes.flat, panels):
        draw_runs_metric(ax, views, metric)
        ax.set_title(panel_title)
    fig.suptitle(f"{title} ({null_note(views)})")
    return fig, axes


@styled
def comparison_panels(runs: Runs) -> Figure:
    """Four panels against k: align, z vs shuffle, effect over random, Δ vs shuffle; one line per run."""
    views = alignment_views(runs)
    fig, axes = _metric_panels(views, (10.5, 7.4), (2, 2), [
        ("align", "(a) Alignment"), ("z_vs_shuffle", "(b) z-score vs the null"),
        ("effect_over_random", "(c) Effect over random"), ("delta_vs_shuffle", "(d) Delta vs the null"),
    ], "Router–expert alignment against k")
    draw_random_expectation(axes[0, 0], views)
    draw_z_cap(axes[0, 1], views)
    for ax in (axes[1, 0], axes[1, 1]):
        draw_zero(ax)
    for ax in axes[0]:
        ax.set_xlabel("")
    figure_legend(fig, axes.flat)
    return fig


@styled
def cos_squared_per_expert(runs: Runs) -> Figure:
    """cos²θ = A[e,e,1] for every expert, grouped by expert index, one colour per run (one dot
    per layer for a run with several layers)."""
    views = alignment_views(runs)
    fig = new_figure(10.5, 4.2)
    ax = fig.subplots()
    n = len(views)
    width = 0.8 / max(n, 1)
    max_experts = max(v.n_experts for v in views)
    for index, view in enumerate(views):
        table = view.cos_squared()
        if table is None:
            continue
        style = run_style(index)
        x = table["expert"].to_numpy(float) + (index - (n - 1) / 2) * width
        ax.scatter(x, table["cos_squared"], color=style["color"], marker=style["marker"], s=30, zorder=3,
                   edgecolors="white", linewidths=0.4,
                   label=f"{view.label} (mean {table['cos_squared'].mean():.3f})")
    for d in sorted({v.hidden_size for v in views}):
        ax.axhline(1.0 / d, color=REFERENCE_GREY, linestyle=":", linewidth=1.2, label=f"random expectation 1/d (d = {d})")
    for boundary in np.arange(0.5, max_experts - 1, 1.0):
        ax.axvline(boundary, color="#eeeeee", linewidth=0.8, zorder=0)
    ax.grid(axis="x", visible=False)
    step = max(1, math.ceil(max_experts / 32))
    ax.set_xticks(range(0, max_experts, step))
    ax.set_xlim(-0.6, max_experts - 0.4)
    ax.set_xlabel("expert e" + ("  (one dot per layer)" if any(v.multi_layer for v in views) else ""))
    ax.set_ylabel(METRICS["cos_squared"].axis)
    ax.set_ylim(bottom=0)
    ax.set_title("cos²θ between router row e and the top singular direction of expert e (k = 1)")
    figure_legend(fig, [ax])
    return fig


@styled
def shuffle_statistics(runs: Runs) -> Figure:
    """The shuffle null against k: its mean μ (beside k/d) and its standard deviation σ."""
    views = alignment_views(runs)
    fig, (ax_mean, ax_std) = _metric_panels(views, (10.5, 4.3), (1, 2), [
        ("shuffle_mean", "(a) Null mean μ"), ("shuffle_std", "(b) Null standard deviation σ"),
    ], "Statistics of the null")
    draw_random_expectation(ax_mean, views)
    ax_std.set_ylim(bottom=0)
    figure_legend(fig, [ax_mean, ax_std])
    return fig


@styled
def z_decomposition(runs: Runs) -> Figure:
    """z = Δ / σ taken apart: the numerator Δ, the denominator σ and their ratio, against k."""
    views = alignment_views(runs)
    fig, axes = _metric_panels(views, (11.5, 4.0), (1, 3), [
        ("delta_vs_shuffle", "(a) Numerator Δ = align − μ"), ("shuffle_std", "(b) Denominator σ"), ("z_vs_shuffle", "(c) z = Δ / σ"),
    ], "z-score decomposition")
    draw_zero(axes[0])
    axes[1].set_ylim(bottom=0)
    draw_z_cap(axes[2], views)
    figure_legend(fig, axes)
    return fig


@styled
def null_distribution(runs: Runs, k: int = DETAIL_K) -> Figure:
    """The shuffle null at k drawn from the stored E×E energies (not a fitted normal): one panel
    per run; each run uses its stored k nearest to ``k`` (never k = d)."""
    views = alignment_views(runs)
    n = len(views)
    columns = min(n, 3)
    rows = math.ceil(n / columns)
    fig = new_figure(min(max(6.8, 3.9 * columns + 0.6), 11.5), 3.1 * rows + 0.9)  # ≤ 11.5 in: 8 pt text ≥ 11 px in a report
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for index, (ax, view) in enumerate(zip(axes, views)):
        chosen = view.nearest_k(k, below_d=True)
        summary = "no alignment_pairs table in this run"
        if view.pairs is None:
            ax.set_axis_off()
        else:
            summary = draw_null_distribution(ax, view, chosen, run_style(index)["color"], with_labels=True)
        nearest = f"k = {chosen}{_nearest_note(chosen, k)}, " if chosen != k else ""
        ax.set_title(textwrap.fill(view.label, 44, break_long_words=True) + f"\n{nearest}{summary}", fontsize=8.5)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(f"Null distribution against the true pairs, k = {k} ({null_note(views)})")
    _neutral_legend(fig, columns=5)
    return fig


def _neutral_legend(fig: Figure, columns: int) -> None:
    """A figure legend whose run-coloured entries are shown in a neutral colour (they stand for
    "this run's colour" in every panel)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(color=NULL_GREY, label="mismatched pairs i ≠ j"),
               Patch(color="#777777", label="true pairs i = j (run colour; stacked for a shuffle null)"),
               Line2D([], [], color="#777777", linewidth=2.0, label="mean align of the true pairs"),
               Line2D([], [], color=REFERENCE_GREY, linestyle="--", linewidth=1.0, label="null mean μ"),
               Patch(color=REFERENCE_GREY, alpha=0.15, label="μ ± σ")]
    fit_legend(fig, lambda n: fig.legend(handles=handles, loc="outside lower center", ncols=n), columns)


@styled
def layer_permutation_test(runs: Runs) -> Figure:
    """The GaleMoE z beside the layer-level permutation test (z_layer and its p-value)."""
    views = alignment_views(runs)
    fig, (ax_z, ax_zl, ax_p) = _metric_panels(views, (11.5, 4.0), (1, 3), [
        ("z_vs_shuffle", "(a) Mean expert z vs the null"), ("z_layer", "(b) Layer permutation test z_layer"),
        ("p_layer", "(c) Permutation p-value p_layer"),
    ], "Expert z beside the layer permutation test")
    draw_z_cap(ax_z, views)
    ax_p.set_yscale("log")
    ax_p.axhline(0.05, color=REFERENCE_GREY, linestyle=":", linewidth=1.2, label="p = 0.05")
    for ax, metric in ((ax_zl, "z_layer"), (ax_p, "p_layer")):
        if not any(v.has(metric) for v in views):
            ax.text(0.5, 0.5, f"{metric} not in these runs", ha="center", va="center", transform=ax.transAxes)
    figure_legend(fig, [ax_z, ax_zl, ax_p])
    return fig


def _draw_expert_scatter(ax: Axes, view: AlignmentView, k: int, colour: str, marker: str) -> None:
    """align at k per expert, against the shuffle null of its layer (μ dashed, μ ± σ shaded)."""
    rows = view.at_k(k).sort_values(["layer", "expert"], ignore_index=True)
    x = np.arange(len(rows))
    for _layer, group in rows.groupby("layer", sort=True):
        lo, hi = group.index.min() - 0.4, group.index.max() + 0.4
        mu, sigma = float(group["shuffle_mean"].iloc[0]), float(group["shuffle_std"].iloc[0])
        ax.fill_between([lo, hi], mu - sigma, mu + sigma, color=REFERENCE_GREY, alpha=0.12, linewidth=0,
                        label="null μ ± σ of the layer")
        ax.plot([lo, hi], [mu, mu], color=REFERENCE_GREY, linestyle="--", linewidth=1.0, marker=None, label="null mean μ")
    ax.axhline(k / view.hidden_size, color=REFERENCE_GREY, linestyle=":", linewidth=1.2, label="random expectation k/d")
    ax.scatter(x, rows["align"], color=colour, marker=marker, s=28, zorder=3, edgecolors="white", linewidths=0.4,
               label="align of one expert")
    if view.multi_layer:
        _starts, centres, names = layer_block_ticks(rows["layer"], max_labels=10)
        ax.set_xticks(centres, names)
        ax.set_xlabel("layer (experts within)")
    else:
        step = max(1, math.ceil(len(rows) / 16))
        ax.set_xticks(x[::step], rows["expert"].iloc[::step].astype(int).astype(str))
        ax.set_xlabel("expert e")
    ax.grid(axis="x", visible=False)
    ax.set_ylabel(f"align at k = {k}  ↑")


@styled
def per_expert_breakdown(runs: Runs, k: Optional[int] = None) -> Figure:
    """Per run (one row each): align and Δ vs shuffle as experts × k heat maps (one colour scale
    per column across runs) and align per expert at k = 128 (or nearest) against the null."""
    views = alignment_views(runs)
    n = len(views)
    row_height = 2.5 if not any(v.multi_layer for v in views) else 3.2
    fig = new_figure(11.5, row_height * n + 1.6)  # 11.5 in: 8 pt text stays ≥ 11 px across a report's width
    axes = np.atleast_2d(fig.subplots(n, 3, squeeze=False, width_ratios=[1.0, 1.0, 1.15]))
    align_norm = metric_norm([expert_matrix(v, "align")[0] for v in views], diverging=False)
    delta_norm = metric_norm([expert_matrix(v, "delta_vs_shuffle")[0] for v in views], diverging=True)
    image_align = image_delta = None
    for index, (row, view) in enumerate(zip(axes, views)):
        image_align = draw_expert_heatmap(row[0], view, "align", norm=align_norm)
        image_delta = draw_expert_heatmap(row[1], view, "delta_vs_shuffle", norm=delta_norm)
        chosen = _detail_k(view, k)
        style = run_style(index)
        _draw_expert_scatter(row[2], view, chosen, style["color"], style["marker"])
        # The run's name once per row, centred over the middle panel, above the three panel
        # names: repeated in each panel's title, a long name would run into the next panel.
        row[0].set_title("align")
        row[1].set_title(f"{view.label}\nΔ vs the null")
        asked = k if k is not None else DETAIL_K
        row[2].set_title(f"align at k = {chosen}{_nearest_note(chosen, asked)}")
    # Under their columns: beside the heat maps the colour-bar labels would crowd the next panel.
    for column, image, metric in ((0, image_align, "align"), (1, image_delta, "delta_vs_shuffle")):
        fig.colorbar(image, ax=list(axes[:, column]), location="bottom", label=METRICS[metric].axis, shrink=0.85, aspect=25)
    _scatter_legend(fig)
    return fig


def _scatter_legend(fig: Figure) -> None:
    """The scatter's legend under the figure, its point in a neutral colour (each row has its own)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Line2D([], [], color="#777777", marker="o", linestyle="none", label="align of one expert (run colour)"),
               Line2D([], [], color=REFERENCE_GREY, linestyle="--", linewidth=1.0, label="null mean μ of the layer"),
               Patch(color=REFERENCE_GREY, alpha=0.15, label="μ ± σ"),
               Line2D([], [], color=REFERENCE_GREY, linestyle=":", linewidth=1.2, label="random expectation k/d")]
    fit_legend(fig, lambda n: fig.legend(handles=handles, loc="outside lower center", ncols=n), 4)


@styled
def complete_analysis(run: Union[Run, AlignmentView], k: Optional[int] = None) -> Figure:
    """Twelve panels of one run: curves against k (align, effect, Δ, z, null μ and σ, argmax
    accuracy), cos²θ per expert, the null distribution, experts × k heat maps and the E×E
    energy matrix at k = 128 (or nearest)."""
    views = alignment_views(run)
    if len(views) != 1:
        raise ConfigError(f"complete_analysis draws one run; got {len(views)}")
    view = views[0]
    colour = run_style(0)["color"]
    chosen = _detail_k(view, k)
    fig = new_figure(11.5, 13.5)  # 11.5 in: 8 pt text stays ≥ 11 px across a report's width
    axes = fig.subplots(4, 3)
    (a_align, a_effect, a_delta), (a_z, a_mu, a_sigma), (a_cos, a_acc, a_null), (a_hal, a_hde, a_energy) = axes

    draw_expert_lines(a_align, view, "align", colour)
    draw_random_expectation(a_align, [view])
    a_align.set_title("(a) Alignment per expert")
    draw_expert_lines(a_effect, view, "effect_over_random", colour)
    draw_zero(a_effect)
    a_effect.set_title("(b) Effect over random")
    draw_expert_lines(a_delta, view, "delta_vs_shuffle", colour)
    draw_zero(a_delta)
    a_delta.set_title("(c) Delta vs the null")

    draw_expert_lines(a_z, view, "z_vs_shuffle", colour)
    if view.has("z_layer"):
        curve = view.curve("z_layer")
        a_z.plot(curve.index, curve["mean"], color="#000000", linestyle="--", linewidth=1.4, marker="s",
                 markevery=markevery_powers_of_two(list(curve.index)), label="layer permutation z_layer")
    draw_z_cap(a_z, [view])
    a_z.set_ylabel("z  ↑")
    a_z.set_title(f"(d) z vs the null ({view.null}) and z_layer")
    _draw_layer_curve(a_mu, view, "shuffle_mean", colour)
    draw_random_expectation(a_mu, [view])
    a_mu.set_title("(e) Null mean μ")
    _draw_layer_curve(a_sigma, view, "shuffle_std", colour)
    a_sigma.set_ylim(bottom=0)
    a_sigma.set_title("(f) Null std σ")

    draw_cos_squared_bars(a_cos, view, colour)
    a_cos.set_title("(g) cos²θ per expert (k = 1)")
    _draw_layer_curve(a_acc, view, "argmax_accuracy", colour)
    a_acc.axhline(1.0 / view.n_experts, color=REFERENCE_GREY, linestyle=":", linewidth=1.2, label="chance 1/E")
    a_acc.set_ylim(-0.03, 1.05)
    a_acc.set_title("(h) Router finds its own expert (argmax)")
    summary = "no alignment_pairs table in this run"
    if view.pairs is not None:
        summary = draw_null_distribution(a_null, view, chosen, colour, with_labels=True)
    else:
        a_null.set_axis_off()
    a_null.set_title(f"(i) Null distribution at k = {chosen}\n{summary}")

    image = draw_expert_heatmap(a_hal, view, "align")
    label_colour_bar_ends(fig.colorbar(image, ax=a_hal, label=METRICS["align"].axis, shrink=0.9), 2.2)
    a_hal.set_title("(j) align, experts × k")
    image = draw_expert_heatmap(a_hde, view, "delta_vs_shuffle")
    label_colour_bar_ends(fig.colorbar(image, ax=a_hde, label=METRICS["delta_vs_shuffle"].axis, shrink=0.9), 2.2)
    a_hde.set_title("(k) Δ vs the null, experts × k")
    if view.pairs is not None:
        image = draw_energy_matrix(a_energy, view, chosen)
        label_colour_bar_ends(fig.colorbar(image, ax=a_energy, label=f"A[i,j,k = {chosen}]", shrink=0.9), 2.2)
        a_energy.set_title(f"(l) Energy of router i in expert j, k = {chosen}" + ("\n(mean over layers)" if view.multi_layer else ""))
    else:
        a_energy.text(0.5, 0.5, "no alignment_pairs table", ha="center", va="center", transform=a_energy.transAxes)
        a_energy.set_axis_off()
    fig.suptitle(f"Complete analysis: {view.label}")
    figure_legend(fig, [a_align, a_effect, a_z, a_mu, a_cos, a_acc, a_null], max_columns=4)
    return fig


def _draw_layer_curve(ax: Axes, view: AlignmentView, metric: str, colour: str) -> None:
    """A per-layer metric: mean over layers, band from lowest to highest layer."""
    curve = view.curve(metric)
    ks = list(curve.index)
    ax.plot(ks, curve["mean"], color=colour, marker="o", markevery=markevery_powers_of_two(ks),
            label="layer statistic" + (" (mean over layers; band: min–max)" if view.multi_layer else ""))
    if view.multi_layer:
        ax.fill_between(ks, curve["low"], curve["high"], color=colour, alpha=0.15, linewidth=0)
    log2_k_axis(ax, view.ks)
    ax.set_ylabel(METRICS[metric].axis)


LAYER_HEATMAP_METRICS = ("align", "effect_over_random", "delta_vs_shuffle", "z_vs_shuffle", "z_layer",
                         "argmax_accuracy", "shuffle_mean", "shuffle_std")


@styled
def layer_k_heatmap(run: Union[Run, AlignmentView], metric: str = "align") -> Figure:
    """Layers × k heat map of ``metric`` (a per-expert metric averaged over the layer's experts)."""
    if metric not in LAYER_HEATMAP_METRICS:
        raise ConfigError(f"layer_k_heatmap draws one of {', '.join(LAYER_HEATMAP_METRICS)}; got {metric!r}")
    views = alignment_views(run)
    if len(views) != 1:
        raise ConfigError(f"layer_k_heatmap draws one run; got {len(views)}")
    view = views[0]
    table = view.per_layer(metric).pivot_table(index="layer", columns="k", values=metric).reindex(columns=view.ks)
    values = table.to_numpy(float)
    n_layers, n_ks = values.shape
    # a row per layer: 0.34 in where cells carry numbers, down to 0.16 in (48 layers in 9 in)
    row = 0.34 if n_layers <= 16 else max(0.12, min(0.34, 7.5 / n_layers))
    plot_height = max(1.0, row * n_layers)
    width = min(max(5.5, 0.62 * n_ks + 2.6), 11.5)
    fig = new_figure(width, plot_height + 1.6)
    ax = fig.subplots()
    diverging = metric not in ("align", "argmax_accuracy", "shuffle_mean", "shuffle_std")
    norm = metric_norm([values], diverging)
    cmap = DIVERGING_CMAP if diverging else SEQUENTIAL_CMAP
    image = ax.imshow(values, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    ax.grid(False)
    ax.set_xticks(*k_column_ticks(view.ks, axes_width_inches(ax), max_labels=16))
    step_y = layer_label_step(n_layers, row, 1.25 * FontProperties(size=mpl.rcParams["ytick.labelsize"]).get_size_in_points() / 72.0)
    ax.set_yticks(range(0, n_layers, step_y), [str(layer) for layer in table.index[::step_y]])
    ax.set_xlabel("k (leading singular directions of the expert)")
    ax.set_ylabel("layer")
    # numbers in the cells only where they fit at a size the report keeps readable
    size = cell_font_size(width, (width - 2.6) / max(n_ks, 1), row, 4, largest=8.0) if n_ks <= 16 else None
    if size is not None:
        cm = image.get_cmap()
        for (i, j), value in np.ndenumerate(values):
            if np.isfinite(value):
                r, g, b, _ = cm(norm(value))
                text_colour = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=size, color=text_colour)
    bar = fig.colorbar(image, ax=ax, label=METRICS[metric].axis + ("" if metric in view.layers.columns else " (mean over experts)"))
    label_colour_bar_ends(bar, plot_height)
    ax.set_title(f"{view.label}: {METRICS[metric].title} per layer and k")
    return fig
