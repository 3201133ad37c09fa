"""Each alignment figure shows the run's numbers: for known synthetic runs, the data of every
line, bar, dot and heat map equals the run's tables (read here directly, not through the
figures' own reader), and the panels, titles, axis labels, legends and colour bars are those the
seed's report describes. Also: saving, the log₂ k axis, errors."""

from __future__ import annotations

import re

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection, PathCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from moelens import figures
from moelens.errors import ConfigError, RunDirectoryError
from moelens.figures.alignment_data import alignment_views, distribution_ks
from moelens.figures.style import k_axis_ticks
from moelens.results import Run
from moelens.testing.synthetic_runs import synthetic_alignment_run

#: The figures of the router-alignment analysis (the seed's, and two beyond it).
ALIGNMENT_FIGURES = ["comparison_panels", "cos_squared_per_expert", "shuffle_statistics", "z_decomposition",
                     "null_distribution", "layer_permutation_test", "per_expert_breakdown", "complete_analysis",
                     "layer_k_heatmap"]
ONE_RUN = ["complete_analysis", "layer_k_heatmap"]
#: Figures whose panels put k on a log₂ axis.
LOG2_K_FIGURES = ["comparison_panels", "shuffle_statistics", "z_decomposition", "layer_permutation_test", "complete_analysis"]
#: Figures with experts × k or layers × k heat maps, one column per stored k.
K_COLUMN_FIGURES = ["per_expert_breakdown", "complete_analysis", "layer_k_heatmap"]

LABEL = "synthetic-mixtral L5"  # the label of `one_run`: model name and layer
SIX_LABELS = ["base L5 · gate", "tuned L5 · gate", "base L5 · up", "tuned L5 · up", "base L5 · down", "tuned L5 · down"]
RANDOM = "random expectation k/d"
CAP = "√(E−1): ceiling of the mean z under a shuffle null"
NULL_LEGEND = ["mismatched pairs i ≠ j", "true pairs i = j (run colour; stacked for a shuffle null)",
               "mean align of the true pairs", "null mean μ", "μ ± σ"]


# --- reading a figure ------------------------------------------------------------------------

def data_axes(fig: Figure) -> list[Axes]:
    """Axes that show data (not colour bars, not hidden spare panels)."""
    return [ax for ax in fig.axes if ax.get_visible() and ax.axison and ax.get_label() != "<colorbar>"]


def colour_bar_labels(fig: Figure) -> list[str]:
    return [ax.get_xlabel() or ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]


def legend_entries(fig: Figure) -> list[str]:
    return [text.get_text() for legend in fig.legends for text in legend.get_texts()]


def line(ax: Axes, label: str) -> Line2D:
    found = [ln for ln in ax.get_lines() if ln.get_label() == label]
    assert len(found) == 1, f"{len(found)} lines labelled {label!r} in {ax.get_title()!r}"
    return found[0]


def horizontal_at(ax: Axes, y: float) -> bool:
    return any(np.allclose(ln.get_ydata(), y) for ln in ax.get_lines() if len(ln.get_ydata()))


def vertical_at(ax: Axes, x: float) -> bool:
    return any(np.allclose(np.asarray(ln.get_xdata(), float), x) for ln in ax.get_lines() if len(ln.get_xdata()))


def titles(fig: Figure) -> list[str]:
    return [ax.get_title() for ax in data_axes(fig)]


def the_image(ax: Axes) -> np.ndarray:
    images = ax.get_images()
    assert len(images) == 1, ax.get_title()
    return np.asarray(images[0].get_array(), float)


# --- the expected numbers, from the run's tables -----------------------------------------------

def by_k(run: Run, metric: str, table: str = "alignment_layers") -> pd.Series:
    """``metric`` against k: the layer table's value (mean over layers), or the expert table's
    mean over experts and layers."""
    return run[table].groupby("k")[metric].mean()


def experts_by_k(run: Run, metric: str) -> np.ndarray:
    """(expert, k) matrix of a per-expert metric, experts in order, k increasing."""
    return run["alignment"].pivot_table(index="expert", columns="k", values=metric).to_numpy()


def stored_ks(run: Run) -> list[int]:
    return sorted(int(k) for k in run["alignment"]["k"].unique())


def hidden_size(run: Run) -> int:
    return int(run.model["hidden_size"])


def assert_curve(ax: Axes, label: str, expected: pd.Series) -> None:
    shown = line(ax, label)
    np.testing.assert_array_equal(shown.get_xdata(), expected.index.to_numpy())
    np.testing.assert_allclose(shown.get_ydata(), expected.to_numpy(), rtol=1e-12)


# --- one figure at a time ----------------------------------------------------------------------

def test_the_catalog_holds_every_alignment_figure():
    assert set(ALIGNMENT_FIGURES) <= set(figures.FIGURES)
    assert [n for n in ALIGNMENT_FIGURES if figures.FIGURES[n].one_run] == ONE_RUN


def test_comparison_panels(one_run):
    fig = figures.comparison_panels([one_run])
    axes = data_axes(fig)
    assert titles(fig) == ["(a) Alignment", "(b) z-score vs the null", "(c) Effect over random", "(d) Delta vs the null"]
    for ax, metric, ylabel in zip(axes, ("align", "z_vs_shuffle", "effect_over_random", "delta_vs_shuffle"),
                                  ("align = A[e,e,k]", "z = Δ / σ", "align − k/d", "Δ = align − μ")):
        assert_curve(ax, LABEL, by_k(one_run, metric))
        assert ax.get_ylabel().startswith(ylabel)
    ks = np.array(stored_ks(one_run))
    np.testing.assert_allclose(line(axes[0], RANDOM).get_ydata(), ks / 4096)
    # The top row shares the bottom row's k axis: labelled once, under the bottom panels.
    assert [ax.get_xlabel() for ax in axes[:2]] == ["", ""]
    assert all(re.fullmatch(r"k \(.*log₂ scale\)", ax.get_xlabel()) for ax in axes[2:])
    assert not horizontal_at(axes[1], np.sqrt(7)), "a derangement null has no z ceiling"
    assert legend_entries(fig) == [LABEL, RANDOM]
    assert fig.get_suptitle() == "Router–expert alignment against k (null: derangement)"


def test_comparison_panels_of_six_runs(six_runs):
    fig = figures.comparison_panels(six_runs)
    align = data_axes(fig)[0]
    for run, label in zip(six_runs, SIX_LABELS):
        assert_curve(align, label, by_k(run, "align"))
    assert legend_entries(fig) == [*SIX_LABELS, RANDOM, CAP]
    assert horizontal_at(data_axes(fig)[1], np.sqrt(7))  # E = 8 under the three shuffle nulls
    assert fig.get_suptitle().endswith("(nulls: derangement, shuffle)")


def test_cos_squared_per_expert(one_run):
    fig = figures.cos_squared_per_expert([one_run])
    (ax,) = data_axes(fig)
    at_one = one_run["alignment"].query("k == 1").sort_values("expert")
    (dots,) = [c for c in ax.collections if isinstance(c, PathCollection)]
    offsets = np.asarray(dots.get_offsets())
    np.testing.assert_array_equal(offsets[:, 0], at_one["expert"])  # one run: no offset beside the expert
    np.testing.assert_allclose(offsets[:, 1], at_one["cos_squared"])
    assert horizontal_at(ax, 1 / 4096)
    assert legend_entries(fig) == [f"{LABEL} (mean {at_one['cos_squared'].mean():.3f})", "random expectation 1/d (d = 4096)"]
    assert ax.get_xlabel() == "expert e" and ax.get_ylabel().startswith("cos²θ = A[e,e,1]")
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(e) for e in range(8)]
    assert ax.get_title().startswith("cos²θ between router row e and the top singular direction of expert e")


def test_cos_squared_per_expert_of_six_runs(six_runs):
    fig = figures.cos_squared_per_expert(six_runs)
    (ax,) = data_axes(fig)
    dots = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(dots) == 6
    for run, scatter in zip(six_runs, dots):
        offsets = np.asarray(scatter.get_offsets())
        np.testing.assert_allclose(offsets[:, 1], run["alignment"].query("k == 1").sort_values("expert")["cos_squared"])
        # Side by side within each expert's slot, never into the next expert's.
        assert np.all(np.abs(offsets[:, 0] - np.arange(8)) < 0.5)
    assert [e.split(" (mean")[0] for e in legend_entries(fig)[:6]] == SIX_LABELS


def test_shuffle_statistics(one_run):
    fig = figures.shuffle_statistics([one_run])
    mean_ax, std_ax = data_axes(fig)
    assert titles(fig) == ["(a) Null mean μ", "(b) Null standard deviation σ"]
    assert_curve(mean_ax, LABEL, by_k(one_run, "shuffle_mean"))
    assert_curve(std_ax, LABEL, by_k(one_run, "shuffle_std"))
    np.testing.assert_allclose(line(mean_ax, RANDOM).get_ydata(), np.array(stored_ks(one_run)) / 4096)
    assert mean_ax.get_ylabel().startswith("μ") and std_ax.get_ylabel().startswith("σ")
    assert std_ax.get_ylim()[0] == 0
    assert legend_entries(fig) == [LABEL, RANDOM]


def test_z_decomposition(one_run):
    fig = figures.z_decomposition([one_run])
    axes = data_axes(fig)
    assert titles(fig) == ["(a) Numerator Δ = align − μ", "(b) Denominator σ", "(c) z = Δ / σ"]
    for ax, metric in zip(axes, ("delta_vs_shuffle", "shuffle_std", "z_vs_shuffle")):
        assert_curve(ax, LABEL, by_k(one_run, metric))
        assert "log₂" in ax.get_xlabel()
    # z = Δ / σ per expert, then averaged: the panels agree where σ > 0.
    experts = one_run["alignment"]
    np.testing.assert_allclose(by_k(one_run, "z_vs_shuffle", "alignment").iloc[:-1],
                               (experts["delta_vs_shuffle"] / experts["shuffle_std"]).groupby(experts["k"]).mean().iloc[:-1])
    assert legend_entries(fig) == [LABEL]


def test_layer_permutation_test(one_run):
    fig = figures.layer_permutation_test([one_run])
    z_ax, z_layer_ax, p_ax = data_axes(fig)
    assert titles(fig) == ["(a) Mean expert z vs the null", "(b) Layer permutation test z_layer", "(c) Permutation p-value p_layer"]
    assert_curve(z_ax, LABEL, by_k(one_run, "z_vs_shuffle"))
    assert_curve(z_layer_ax, LABEL, by_k(one_run, "z_layer"))
    assert_curve(p_ax, LABEL, by_k(one_run, "p_layer"))
    assert p_ax.get_yscale() == "log" and horizontal_at(p_ax, 0.05)
    assert [ax.get_ylabel() for ax in (z_layer_ax, p_ax)] == ["z_layer  ↑", "p_layer  ↓"]
    assert legend_entries(fig) == [LABEL, "p = 0.05"]


def test_null_distribution(one_run):
    """The bars are the E² stored energies at k as shares (E(E − 1) mismatched, E true pairs);
    the lines are the stored null mean μ and the true pairs' mean align."""
    fig = figures.null_distribution([one_run], k=128)
    (ax,) = data_axes(fig)
    bars = [p for p in ax.patches if p.get_alpha() is None or p.get_alpha() > 0.5]  # not the faint μ ± σ span
    grey = [p for p in bars if mcolors.same_color(p.get_facecolor(), "#bdbdbd")]
    assert len(bars) == 50 and len(grey) == 25  # 25 bins, mismatched and true pairs
    assert sum(p.get_height() for p in grey) == pytest.approx(56 / 64)
    assert sum(p.get_height() for p in bars) == pytest.approx(1.0)
    energies = one_run["alignment_pairs"].query("k == 128")["energy"]
    assert min(p.get_x() for p in bars) == pytest.approx(energies.min())
    assert max(p.get_x() + p.get_width() for p in bars) == pytest.approx(energies.max())
    at_k = one_run["alignment"].query("k == 128")
    assert vertical_at(ax, at_k["align"].mean())
    assert vertical_at(ax, float(one_run["alignment_layers"].query("k == 128")["shuffle_mean"].iloc[0]))
    assert ax.get_title() == f"{LABEL}\nmean z = {at_k['z_vs_shuffle'].mean():.2f} (derangement), k/d = 0.0312"
    assert ax.get_xlabel() == "projection energy A[i,j,k = 128]" and ax.get_ylabel() == "share of the E² pairs"
    assert legend_entries(fig) == NULL_LEGEND
    assert fig.get_suptitle() == "Null distribution against the true pairs, k = 128 (null: derangement)"


def test_null_distribution_of_six_runs_is_a_grid_of_panels(six_runs):
    fig = figures.null_distribution(six_runs, k=128)
    axes = data_axes(fig)
    assert [ax.get_title().split("\n")[0] for ax in axes] == SIX_LABELS
    assert len({round(ax.get_position().x0, 3) for ax in axes}) == 3
    assert len({round(ax.get_position().y0, 3) for ax in axes}) == 2
    for run, ax in zip(six_runs, axes):
        assert vertical_at(ax, run["alignment"].query("k == 128")["align"].mean())
    assert legend_entries(fig) == NULL_LEGEND


def test_per_expert_breakdown(one_run):
    fig = figures.per_expert_breakdown([one_run])
    align_ax, delta_ax, scatter_ax = data_axes(fig)
    # The run's name heads the row once, over the middle panel.
    assert titles(fig) == ["align", f"{LABEL}\nΔ vs the null", "align at k = 128"]
    np.testing.assert_allclose(the_image(align_ax), experts_by_k(one_run, "align"))
    np.testing.assert_allclose(the_image(delta_ax), experts_by_k(one_run, "delta_vs_shuffle"))
    for ax in (align_ax, delta_ax):
        assert ax.get_ylabel() == "expert e" and ax.get_xlabel().startswith("k (")
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert labels[0] == "1" and labels[-1] == "4096"
    at_k = one_run["alignment"].query("k == 128").sort_values("expert")
    (dots,) = [c for c in scatter_ax.collections if isinstance(c, PathCollection)]
    np.testing.assert_allclose(np.asarray(dots.get_offsets())[:, 1], at_k["align"])
    assert horizontal_at(scatter_ax, 128 / 4096)
    assert scatter_ax.get_ylabel().startswith("align at k = 128")
    assert colour_bar_labels(fig) == ["align = A[e,e,k]  ↑", "Δ = align − μ  ↑"]
    assert legend_entries(fig) == ["align of one expert (run colour)", "null mean μ of the layer", "μ ± σ", RANDOM]


def test_per_expert_breakdown_of_six_runs_is_a_row_per_run(six_runs):
    fig = figures.per_expert_breakdown(six_runs)
    axes = data_axes(fig)
    assert len(axes) == 18 and len(colour_bar_labels(fig)) == 2  # one colour scale per column
    assert [ax.get_title() for ax in axes[1::3]] == [f"{label}\nΔ vs the null" for label in SIX_LABELS]
    for run, ax in zip(six_runs, axes[1::3]):
        np.testing.assert_allclose(the_image(ax), experts_by_k(run, "delta_vs_shuffle"))


def test_complete_analysis(one_run):
    fig = figures.complete_analysis(one_run)
    axes = data_axes(fig)
    assert [t[:3] for t in titles(fig)] == [f"({c})" for c in "abcdefghijkl"]
    a_align, a_effect, a_delta, a_z, a_mu, a_sigma, a_cos, a_acc, a_null, a_hal, a_hde, a_energy = axes
    for ax, metric in ((a_align, "align"), (a_effect, "effect_over_random"), (a_delta, "delta_vs_shuffle"), (a_z, "z_vs_shuffle")):
        assert_curve(ax, "mean over experts", by_k(one_run, metric, "alignment"))
        (experts,) = [c for c in ax.collections if isinstance(c, LineCollection)]
        assert len(experts.get_segments()) == 8  # one thin curve per expert
    assert_curve(a_z, "layer permutation z_layer", by_k(one_run, "z_layer"))
    assert_curve(a_mu, "layer statistic", by_k(one_run, "shuffle_mean"))
    assert_curve(a_sigma, "layer statistic", by_k(one_run, "shuffle_std"))
    assert_curve(a_acc, "layer statistic", by_k(one_run, "argmax_accuracy"))
    assert horizontal_at(a_acc, 1 / 8)
    np.testing.assert_allclose([p.get_height() for p in a_cos.patches],
                               one_run["alignment"].query("k == 1").sort_values("expert")["cos_squared"])
    assert a_null.get_title().startswith("(i) Null distribution at k = 128\n")
    np.testing.assert_allclose(the_image(a_hal), experts_by_k(one_run, "align"))
    np.testing.assert_allclose(the_image(a_hde), experts_by_k(one_run, "delta_vs_shuffle"))
    energies = one_run["alignment_pairs"].query("k == 128").pivot(index="router", columns="expert", values="energy")
    np.testing.assert_allclose(the_image(a_energy), energies.to_numpy())
    assert (a_energy.get_xlabel(), a_energy.get_ylabel()) == ("expert j (subspace)", "router row i")
    assert colour_bar_labels(fig) == ["align = A[e,e,k]  ↑", "Δ = align − μ  ↑", "A[i,j,k = 128]"]
    assert fig.get_suptitle() == f"Complete analysis: {LABEL}"
    assert {"mean over experts", RANDOM, "chance 1/E", "cos²θ per expert"} <= set(legend_entries(fig))


def test_layer_k_heatmap_of_a_layered_run(layered_run):
    fig = figures.layer_k_heatmap(layered_run, "align")
    (ax,) = data_axes(fig)
    expected = layered_run["alignment_layers"].pivot(index="layer", columns="k", values="align")
    np.testing.assert_allclose(the_image(ax), expected.to_numpy())
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2", "3", "4"]
    assert not ax.texts, "64 columns: no numbers written in the cells"
    assert ax.get_title() == "zoo-base L0-4: Alignment per layer and k"
    assert ax.get_ylabel() == "layer" and ax.get_xlabel().startswith("k (")
    assert colour_bar_labels(fig) == ["align = A[e,e,k]  ↑"]


def test_layer_k_heatmap_writes_each_cell_value(one_run):
    fig = figures.layer_k_heatmap(one_run, "z_layer")
    (ax,) = data_axes(fig)
    values = by_k(one_run, "z_layer")
    assert np.isnan(values.loc[4096]), "z_layer is undefined at k = d"
    assert [t.get_text() for t in ax.texts] == [f"{v:.2f}" for v in values.dropna()]  # the undefined cell left blank
    assert colour_bar_labels(fig) == ["z_layer  ↑"]


def test_layer_k_heatmap_shows_the_mean_over_experts(layered_run):
    fig = figures.layer_k_heatmap(layered_run, "delta_vs_shuffle")
    values = the_image(fig.axes[0])
    table = layered_run["alignment"].groupby(["layer", "k"])["delta_vs_shuffle"].mean().unstack()
    np.testing.assert_allclose(values, table.to_numpy())
    assert values.shape == (5, 64)
    with pytest.raises(ConfigError, match="layer_k_heatmap draws one of"):
        figures.layer_k_heatmap(layered_run, "bogus")


def test_a_layered_run_is_drawn_as_a_mean_with_a_band(layered_run):
    """Five layers: one line (the mean over layers), shaded from the lowest to the highest layer."""
    fig = figures.comparison_panels([layered_run])
    ax = data_axes(fig)[0]
    align = layered_run["alignment_layers"].groupby("k")["align"]
    assert_curve(ax, "zoo-base L0-4", align.mean())
    (band,) = [c for c in ax.collections if not isinstance(c, (LineCollection, PathCollection))]
    vertices = np.concatenate([path.vertices for path in band.get_paths()])
    assert vertices[:, 1].min() == pytest.approx(align.min().min())
    assert vertices[:, 1].max() == pytest.approx(align.max().max())


# --- the log₂ k axis -------------------------------------------------------------------------

def k_axes(fig: Figure) -> list[Axes]:
    """Panels with k on a log₂ x axis whose tick labels are drawn (not hidden by a shared axis)."""
    fig.draw_without_rendering()
    return [ax for ax in data_axes(fig) if ax.get_xscale() == "log"
            and any(t.get_visible() and t.get_text() for t in ax.get_xticklabels())]


@pytest.mark.parametrize("name", LOG2_K_FIGURES)
def test_log2_k_axes_label_the_first_k_and_d(name, d48_run):
    """d = 48 is no power of two: it still gets its label, beside every power of two as a tick."""
    axes = k_axes(figures.draw(name, [d48_run]))
    assert axes
    for ax in axes:
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert labels[0] == "1" and labels[-1] == "48", (ax.get_title(), labels)
        ticks = set(ax.xaxis.get_majorticklocs()) | set(ax.xaxis.get_minorticklocs())
        assert {1, 2, 4, 8, 16, 32, 48} <= ticks, ax.get_title()


@pytest.mark.parametrize("name", K_COLUMN_FIGURES)
def test_heat_map_k_columns_label_the_first_k_and_d(name, d48_run):
    fig = figures.draw(name, [d48_run])
    heat_maps = [ax for ax in data_axes(fig) if ax.get_images() and ax.get_xlabel().startswith("k")]
    assert heat_maps
    for ax in heat_maps:
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert labels[0] == "1" and labels[-1] == "48", (ax.get_title(), labels)
        assert ax.get_xticks()[-1] == len(stored_ks(d48_run)) - 1


def test_k_axis_is_log2_with_power_of_two_ticks(one_run):
    ax = k_axes(figures.comparison_panels([one_run]))[0]
    assert ax.xaxis.get_transform().base == 2
    ticks = list(ax.get_xticks()) + list(ax.xaxis.get_minorticklocs())
    assert sorted(ticks) == [2**p for p in range(13)]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["1", "4", "16", "64", "256", "1024", "4096"]  # 13 powers: every other one labelled


@pytest.mark.parametrize("d, labelled, unlabelled", [
    (48, [1, 2, 4, 8, 16, 32, 48], []),
    (2880, [1, 4, 16, 64, 256, 1024, 2880], [2, 8, 32, 128, 512, 2048]),
    # 4096 would crowd 5120: d keeps its label, 4096 stays a tick.
    (5120, [1, 4, 16, 64, 256, 1024, 5120], [2, 8, 32, 128, 512, 2048, 4096]),
])
def test_k_axis_ticks(d, labelled, unlabelled):
    ks = [2**p for p in range(d.bit_length()) if 2**p < d] + [d]
    assert k_axis_ticks(ks, width_inches=4.5) == (labelled, unlabelled)


def test_k_axis_ticks_thin_labels_on_a_narrow_axis():
    labelled, unlabelled = k_axis_ticks([2**p for p in range(13)], width_inches=1.5)
    assert labelled[0] == 1 and labelled[-1] == 4096 and len(labelled) < 7
    assert sorted(labelled + unlabelled) == [2**p for p in range(13)]


# --- across figures ----------------------------------------------------------------------------

def test_lines_are_the_runs_means_and_keep_their_colour(six_runs):
    views = alignment_views(six_runs)
    panels = figures.comparison_panels(six_runs)
    stats = figures.shuffle_statistics(six_runs)
    for view in views:
        align_line = line(panels.axes[0], view.label)
        mean_line = line(stats.axes[0], view.label)
        assert mcolors.same_color(align_line.get_color(), mean_line.get_color())
    colours = {mcolors.to_hex(ln.get_color()) for ln in panels.axes[0].get_lines() if ln.get_label() in SIX_LABELS}
    assert len(colours) == 6


def test_legends_sit_outside_the_axes(six_runs):
    for name in ("comparison_panels", "shuffle_statistics", "z_decomposition", "layer_permutation_test", "null_distribution"):
        fig = figures.draw(name, six_runs)
        assert fig.legends, f"{name} has no figure legend"
        assert all(ax.get_legend() is None for ax in fig.axes), f"{name} puts a legend over its data"


def test_null_distribution_takes_the_nearest_stored_k(layered_run):
    fig = figures.null_distribution([layered_run], k=2048)
    title = data_axes(fig)[0].get_title()
    assert "k = 63 (nearest to 2048)" in title  # never k = d = 64, where every energy is 1


@pytest.mark.parametrize("d, ks, expected", [
    (4096, None, [32, 128, 512, 2048]),
    (128, None, [1, 4, 16, 64]),
    (64, range(1, 65), [1, 2, 8, 32]),
])
def test_distribution_ks(d, ks, expected):
    run = synthetic_alignment_run(hidden_size=d, ks=ks, n_experts=4)
    assert distribution_ks(alignment_views(run)) == expected


def test_one_run_figures_refuse_several_runs(six_runs):
    for name in ONE_RUN:
        with pytest.raises(ConfigError, match="draws one run"):
            figures.draw(name, six_runs[:2])


def test_a_matrix_all_run_becomes_one_labelled_view_per_matrix():
    run = synthetic_alignment_run(matrices=("gate", "up", "down"), hidden_size=256, n_experts=4)
    views = alignment_views([run, run])
    assert len(views) == 6 and len({v.label for v in views}) == 6
    assert [v.matrix for v in views[:3]] == ["gate", "up", "down"]
    fig = figures.comparison_panels([run])
    lines = [ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("synthetic")]
    assert [ln.get_label() for ln in lines] == [f"synthetic-mixtral L5 · {m}" for m in ("gate", "up", "down")]
    experts = run["alignment"]
    for ln, matrix in zip(lines, ("gate", "up", "down")):
        np.testing.assert_allclose(ln.get_ydata(), experts[experts["matrix"] == matrix].groupby("k")["align"].mean())


def test_a_run_without_pairs_still_draws(one_run):
    bare = Run(manifest=one_run.manifest, tables={k: v for k, v in one_run.tables.items() if k != "alignment_pairs"})
    fig = figures.null_distribution([bare])
    assert "no alignment_pairs table" in fig.axes[0].get_title()
    complete = figures.complete_analysis(bare)
    assert any("no alignment_pairs table" in ax.get_title() for ax in complete.axes)


def test_errors_name_the_problem(tmp_path, one_run):
    unfinished = Run(manifest={**one_run.manifest, "status": "running", "completed_units": []}, tables={}, path=tmp_path)
    with pytest.raises(RunDirectoryError, match="unfinished"):
        figures.comparison_panels([unfinished])
    other = Run(manifest={"analysis": "expert_distance"}, tables={"distance": pd.DataFrame({"x": [1]})})
    with pytest.raises(RunDirectoryError, match="no 'alignment' table"):
        figures.comparison_panels([other])
    with pytest.raises(ConfigError, match="no figure named"):
        figures.draw("bogus", [one_run])
