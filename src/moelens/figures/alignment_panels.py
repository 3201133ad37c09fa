"""Axes-level drawings of alignment results, shared by the comparison and single-run figures.

Each function draws on one :class:`~matplotlib.axes.Axes` and returns what a caller may need
(an image for a colour bar). Lines carry ``label`` only where a legend should list them; the
figure functions collect one legend per figure and place it outside the data.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle

from moelens.figures.alignment_data import METRICS, AlignmentView
from moelens.figures.style import (
    DIVERGING_CMAP,
    EXPERT_GREY,
    NULL_GREY,
    REFERENCE_GREY,
    SEQUENTIAL_CMAP,
    axes_width_inches,
    k_column_ticks,
    layer_block_ticks,
    log2_k_axis,
    markevery_powers_of_two,
    run_style,
)

RANDOM_LABEL = "random expectation k/d"
NULL_LABEL = "shuffle null mean μ"
CAP_LABEL = "√(E−1): ceiling of the mean z under a shuffle null"


def all_ks(views: Sequence[AlignmentView]) -> list[int]:
    return sorted({k for v in views for k in v.ks})


def draw_runs_metric(ax: Axes, views: Sequence[AlignmentView], metric: str, indices: Optional[Sequence[int]] = None) -> None:
    """One line per run (mean over its layers), a band over layers when a run has several."""
    indices = indices if indices is not None else range(len(views))
    for index, view in zip(indices, views):
        if not view.has(metric):
            continue
        curve = view.curve(metric)
        style = run_style(index)
        ks = list(curve.index)
        ax.plot(ks, curve["mean"], label=view.label, markevery=markevery_powers_of_two(ks), **style)
        if view.multi_layer:
            ax.fill_between(ks, curve["low"], curve["high"], color=style["color"], alpha=0.15, linewidth=0)
    log2_k_axis(ax, all_ks(views))
    ax.set_ylabel(METRICS[metric].axis)


def draw_random_expectation(ax: Axes, views: Sequence[AlignmentView], with_label: bool = True) -> None:
    """The dotted line k/d (one per distinct d)."""
    for d in sorted({v.hidden_size for v in views}):
        ks = np.array([k for k in all_ks(views) if k <= d])
        label = (RANDOM_LABEL if len({v.hidden_size for v in views}) == 1 else f"{RANDOM_LABEL} (d = {d})") if with_label else None
        ax.plot(ks, ks / d, color=REFERENCE_GREY, linestyle=":", linewidth=1.2, label=label, marker=None)


def draw_zero(ax: Axes) -> None:
    ax.axhline(0.0, color=REFERENCE_GREY, linewidth=0.7, zorder=0)


def draw_z_cap(ax: Axes, views: Sequence[AlignmentView], with_label: bool = True) -> None:
    """√(E−1) for each distinct E among runs whose null pools all E² pairs (shuffle): their
    mean z cannot rise above it. A derangement null has no such ceiling, so nothing is drawn."""
    caps = sorted({v.z_cap for v in views if v.null_pools_true_pairs})
    for cap in caps:
        label = (CAP_LABEL if len(caps) == 1 else f"{CAP_LABEL} = {cap:.2f}") if with_label else None
        ax.axhline(cap, color=REFERENCE_GREY, linestyle="-.", linewidth=1.0, label=label)


def draw_expert_lines(ax: Axes, view: AlignmentView, metric: str, colour: str) -> None:
    """Every (layer, expert) curve thin and grey, the mean over them bold."""
    ks = view.ks
    curves = [np.column_stack([rows["k"].to_numpy(float), rows[metric].to_numpy(float)])
              for _key, rows in view.experts.groupby(["layer", "expert"])]
    # Hundreds of curves (64 experts × 16 layers) would make a heavy vector file: raster them.
    ax.add_collection(LineCollection(curves, colors=EXPERT_GREY, linewidths=0.6, alpha=0.6,
                                     label="one expert (one layer)", rasterized=len(curves) > 64))
    mean = view.experts.groupby("k")[metric].mean()
    ax.plot(mean.index, mean.to_numpy(), color=colour, linewidth=2.0, marker="o", markevery=markevery_powers_of_two(list(mean.index)),
            label="mean over experts" + (" and layers" if view.multi_layer else ""))
    log2_k_axis(ax, ks)
    ax.set_ylabel(METRICS[metric].axis)


def expert_matrix(view: AlignmentView, metric: str) -> tuple[np.ndarray, list[int], list[int]]:
    """(rows = layer·expert, columns = k) values, and each row's layer and expert."""
    table = view.experts.pivot_table(index=["layer", "expert"], columns="k", values=metric, aggfunc="mean")
    table = table.reindex(columns=view.ks)
    return table.to_numpy(float), [int(i[0]) for i in table.index], [int(i[1]) for i in table.index]


def draw_expert_heatmap(ax: Axes, view: AlignmentView, metric: str, norm: Optional[Normalize] = None) -> AxesImage:
    """Experts (per layer) × k heat map of ``metric``; layers separated by white lines."""
    values, row_layers, row_experts = expert_matrix(view, metric)
    diverging = metric != "align"
    norm = norm or metric_norm([values], diverging)
    image = ax.imshow(values, aspect="auto", cmap=DIVERGING_CMAP if diverging else SEQUENTIAL_CMAP, norm=norm, interpolation="nearest")
    ax.grid(False)
    ax.set_xticks(*k_column_ticks(view.ks, axes_width_inches(ax), max_labels=7))
    ax.set_xlabel("k (leading singular directions)")
    if view.multi_layer:
        height = ax.get_position().height * ax.get_figure().get_figheight()
        starts, centres, names = layer_block_ticks(row_layers, span_inches=height, along="y")
        ax.set_yticks(centres, names)
        # White parts layers on the dark sequential map, dark grey on the white-centred diverging one;
        # where a layer's rows are thinner than a few points the lines would hide them: thinner lines
        # between the labelled layers only.
        block_pt = height * 72.0 / max(len(starts), 1)
        every = 1 if block_pt >= 6.0 else max(1, round(len(starts) / max(len(names), 1)))
        for s in starts[every::every]:
            ax.axhline(s - 0.5, color="#333333" if diverging else "white", linewidth=1.0 if block_pt >= 6.0 else 0.6)
        ax.set_ylabel("layer (experts within)")
    else:
        step_y = max(1, int(np.ceil(len(row_experts) / 16)))
        ax.set_yticks(range(0, len(row_experts), step_y), [str(e) for e in row_experts[::step_y]])
        ax.set_ylabel("expert e")
    return image


def metric_norm(arrays: Sequence[np.ndarray], diverging: bool) -> Normalize:
    """One colour scale for several heat maps: centred on 0 for a signed metric."""
    finite = np.concatenate([a[np.isfinite(a)].ravel() for a in arrays]) if arrays else np.array([0.0])
    if finite.size == 0:
        finite = np.array([0.0, 1.0])
    low, high = float(finite.min()), float(finite.max())
    if diverging:
        bound = max(abs(low), abs(high), 1e-9)
        return TwoSlopeNorm(vcenter=0.0, vmin=-bound, vmax=bound)
    return Normalize(vmin=min(low, 0.0), vmax=max(high, 1e-9))


def draw_energy_matrix(ax: Axes, view: AlignmentView, k: int) -> AxesImage:
    """A[i, j, k] over routers i (rows) and experts j (columns), averaged over the run's layers;
    true pairs (the diagonal) outlined."""
    matrix = np.nanmean([view.energies(layer, k) for layer in view.layer_ids], axis=0)
    low, high = float(np.nanmin(matrix)), float(np.nanmax(matrix))
    image = ax.imshow(matrix, cmap=SEQUENTIAL_CMAP, vmin=low, vmax=max(high, low + 1e-9), interpolation="nearest")
    ax.grid(False)
    e = view.n_experts
    # Outlines help the eye find the diagonal among few experts; among many they would hide it.
    for i in range(e if e <= 16 else 0):
        ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#D55E00", linewidth=1.0))
    step = max(1, int(np.ceil(e / 8)))
    ax.set_xticks(range(0, e, step))
    ax.set_yticks(range(0, e, step))
    ax.set_xlabel("expert j (subspace)")
    ax.set_ylabel("router row i")
    return image


def draw_null_distribution(ax: Axes, view: AlignmentView, k: int, colour: str, with_labels: bool = True) -> str:
    """The null at ``k`` from the stored E×E energies: mismatched pairs grey, true pairs in the
    run's colour, both as shares of the E² pairs. Under a shuffle null the true pairs belong to
    the null and are stacked on it; under a derangement null they are drawn beside it. μ, σ and
    z are the run's stored values (means over layers for several layers). Returns a one-line
    summary (mean z, null, k/d) for the panel's title."""
    true, mismatched = view.true_and_mismatched(k)
    total = true.size + mismatched.size
    low, high = float(min(true.min(), mismatched.min())), float(max(true.max(), mismatched.max()))
    if high - low < 1e-12:
        low, high = low - 0.01, high + 0.01
    bins = np.linspace(low, high, 26)
    labels = ["mismatched pairs i ≠ j", "true pairs i = j"] if with_labels else [None, None]
    if view.null_pools_true_pairs:
        ax.hist([mismatched, true], bins=bins, weights=[np.full(mismatched.size, 1.0 / total), np.full(true.size, 1.0 / total)],
                stacked=True, color=[NULL_GREY, colour], edgecolor="white", linewidth=0.4, label=labels)
    else:
        ax.hist(mismatched, bins=bins, weights=np.full(mismatched.size, 1.0 / total), color=NULL_GREY,
                edgecolor="white", linewidth=0.4, label=labels[0])
        ax.hist(true, bins=bins, weights=np.full(true.size, 1.0 / total), color=colour, alpha=0.85,
                edgecolor="white", linewidth=0.4, label=labels[1])
    mu, sigma, z = view.null_at(k)
    ax.axvspan(mu - sigma, mu + sigma, color=REFERENCE_GREY, alpha=0.08, linewidth=0, label="μ ± σ" if with_labels else None)
    ax.axvline(mu, color=REFERENCE_GREY, linestyle="--", linewidth=1.0, label="null mean μ" if with_labels else None)
    ax.axvline(true.mean(), color=colour, linewidth=2.0, label="mean align (true pairs)" if with_labels else None)
    ax.set_xlabel(f"projection energy A[i,j,k = {k}]")
    ax.set_ylabel("share of the E² pairs")
    # Returned for the panel title: a note inside the axes would hide bars.
    return f"mean z = {z:.2f} ({view.null}), k/d = {k / view.hidden_size:.3g}"


def draw_cos_squared_bars(ax: Axes, view: AlignmentView, colour: str) -> None:
    """cos²θ per expert (bars; one group of bars per layer when the run has several)."""
    table = view.cos_squared()
    if table is None:
        ax.text(0.5, 0.5, "k = 1 not computed", ha="center", va="center", transform=ax.transAxes)
        return
    x = np.arange(len(table))
    ax.bar(x, table["cos_squared"], color=colour, width=0.8, label="cos²θ per expert")
    ax.axhline(1.0 / view.hidden_size, color=REFERENCE_GREY, linestyle=":", linewidth=1.2, label="random expectation 1/d")
    if view.multi_layer:
        starts, centres, names = layer_block_ticks(table["layer"], max_labels=12,
                                                   span_inches=ax.get_position().width * ax.get_figure().get_figwidth())
        ax.set_xticks(centres, names)
        for s in starts[1:]:
            ax.axvline(s - 0.5, color="#cccccc", linewidth=0.8)
        ax.set_xlabel("layer (experts within)")
    else:
        step = max(1, int(np.ceil(len(table) / 16)))
        ax.set_xticks(x[::step], table["expert"].iloc[::step].astype(int).astype(str))
        ax.set_xlabel("expert e")
    ax.set_ylabel(METRICS["cos_squared"].axis)
