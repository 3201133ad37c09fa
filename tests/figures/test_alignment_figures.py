"""Each alignment figure on its own: it draws the run's numbers, labels its axes, saves as
PNG, SVG and PDF, and keeps a run's colour across figures."""

from __future__ import annotations

import re

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from moelens import figures
from moelens.errors import ConfigError, RunDirectoryError
from moelens.figures.alignment_data import alignment_views, distribution_ks
from moelens.results import Run
from moelens.testing.synthetic_runs import synthetic_alignment_run

MULTI_RUN = [name for name, entry in figures.FIGURES.items() if not entry.one_run]
ONE_RUN = [name for name, entry in figures.FIGURES.items() if entry.one_run]


def data_axes(fig: Figure) -> list:
    """Axes that show data (not colour bars, not hidden spare panels)."""
    return [ax for ax in fig.axes if ax.get_visible() and ax.axison and ax.get_label() != "<colorbar>"]


def assert_labelled(fig: Figure) -> None:
    axes = data_axes(fig)
    assert axes, "the figure has no axes with data"
    for ax in axes:
        # Panels stacked on a shared x axis carry the label once, under the bottom panel.
        shared = ax.get_shared_x_axes().get_siblings(ax)
        assert any(a.get_xlabel().strip() for a in shared), f"axes {ax.get_title()!r} has no x label"
        assert ax.get_ylabel().strip(), f"axes {ax.get_title()!r} has no y label"
        assert ax.has_data(), f"axes {ax.get_title()!r} is empty"


@pytest.mark.parametrize("name", MULTI_RUN)
def test_multi_run_figures_draw_one_and_six_runs(name, one_run, six_runs):
    for runs in ([one_run], six_runs):
        fig = figures.draw(name, runs)
        assert isinstance(fig, Figure)
        assert_labelled(fig)
        assert fig.get_layout_engine() is not None, "figures use constrained layout"


@pytest.mark.parametrize("name", figures.FIGURES)
def test_every_figure_draws_a_layered_small_model_run(name, layered_run):
    """The demo's runs: several layers, d = 64, every k from 1 to d."""
    fig = figures.draw(name, [layered_run])
    assert_labelled(fig)


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".svg", b"<svg"), (".pdf", b"%PDF")])
@pytest.mark.parametrize("name", ["comparison_panels", "complete_analysis"])
def test_save_by_suffix(tmp_path, one_run, name, suffix, magic):
    fig = figures.draw(name, [one_run])
    path = figures.save(fig, tmp_path / f"fig{suffix}", dpi=60)
    data = path.read_bytes()
    assert data.startswith(magic)
    assert len(data) > 5_000


def test_svg_is_reproducible_and_names_no_resource(one_run):
    first = figures.figure_bytes(figures.shuffle_statistics([one_run]), "svg")
    second = figures.figure_bytes(figures.shuffle_statistics([one_run]), "svg")
    assert first == second, "the same figure must give the same SVG bytes (no dates, fixed ids)"
    text = first.decode()
    urls = re.findall(r"https?://[^\s\"'<>]+", text)
    # XML namespace names are identifiers, not resources a viewer fetches.
    namespaces = set(re.findall(r'xmlns(?::\w+)?="([^"]+)"', text))
    assert set(urls) <= namespaces
    assert "<!DOCTYPE" not in text and "<metadata" not in text


def test_save_rejects_an_unknown_suffix(tmp_path, one_run):
    with pytest.raises(ConfigError, match=r"\.png, \.svg or \.pdf"):
        figures.save(figures.shuffle_statistics([one_run]), tmp_path / "fig.jpg")


def test_k_axis_is_log2_with_power_of_two_ticks(one_run):
    fig = figures.comparison_panels([one_run])
    fig.draw_without_rendering()
    ax = fig.axes[2]  # bottom left: the top row shares its x axis and hides the tick labels
    assert ax.get_xscale() == "log"
    assert ax.xaxis.get_transform().base == 2
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks[0] == 1 and all(int(t) & (int(t) - 1) == 0 for t in ticks)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[:2] == ["1", "4"] and labels[-1] == "4096"  # 13 powers thinned to every other one


def test_lines_are_the_runs_means_and_keep_their_colour(six_runs):
    views = alignment_views(six_runs)
    panels = figures.comparison_panels(six_runs)
    stats = figures.shuffle_statistics(six_runs)
    for view in views:
        align_line = next(line for line in panels.axes[0].get_lines() if line.get_label() == view.label)
        expected = view.experts.groupby("k")["align"].mean()
        np.testing.assert_allclose(align_line.get_ydata(), expected.to_numpy())
        mean_line = next(line for line in stats.axes[0].get_lines() if line.get_label() == view.label)
        assert mcolors.same_color(align_line.get_color(), mean_line.get_color())
    colours = {mcolors.to_hex(line.get_color()) for line in panels.axes[0].get_lines() if line.get_label() in {v.label for v in views}}
    assert len(colours) == 6


def test_legends_sit_outside_the_axes(six_runs):
    for name in ("comparison_panels", "shuffle_statistics", "z_decomposition", "layer_permutation_test", "null_distribution"):
        fig = figures.draw(name, six_runs)
        assert fig.legends, f"{name} has no figure legend"
        assert all(ax.get_legend() is None for ax in fig.axes), f"{name} puts a legend over its data"


def test_z_ceiling_drawn_only_for_a_shuffle_null(six_runs):
    derangement = [r for r in six_runs if r.manifest["options"]["null"] == "derangement"]
    shuffle = [r for r in six_runs if r.manifest["options"]["null"] == "shuffle"]
    cap = np.sqrt(7)

    def has_cap(runs: list[Run]) -> bool:
        ax = figures.comparison_panels(runs).axes[1]
        return any(np.allclose(line.get_ydata(), cap) for line in ax.get_lines())

    assert has_cap(shuffle) and not has_cap(derangement)


def test_null_distribution_is_the_stored_energies(one_run):
    """The bars are the E² stored energies at k (shares summing to 1), not a fitted curve."""
    fig = figures.null_distribution([one_run], k=128)
    ax = data_axes(fig)[0]
    # Histogram bars are opaque; the shaded μ ± σ band is not.
    bars = [p for p in ax.patches if p.get_alpha() is None or p.get_alpha() > 0.5]
    assert sum(p.get_height() for p in bars) == pytest.approx(1.0, abs=1e-9)
    pairs = one_run["alignment_pairs"]
    energies = pairs[pairs["k"] == 128]["energy"]
    low, high = ax.get_xlim()
    assert low <= energies.min() and energies.max() <= high
    assert "nearest" not in ax.get_title()


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


def test_layer_k_heatmap_shows_the_mean_over_experts(layered_run):
    fig = figures.layer_k_heatmap(layered_run, "delta_vs_shuffle")
    image = fig.axes[0].get_images()[0]
    values = np.asarray(image.get_array())
    table = layered_run["alignment"].groupby(["layer", "k"])["delta_vs_shuffle"].mean().unstack()
    np.testing.assert_allclose(values, table.to_numpy())
    assert values.shape == (5, 64)
    with pytest.raises(ConfigError, match="layer_k_heatmap draws one of"):
        figures.layer_k_heatmap(layered_run, "bogus")


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
    assert len([line for line in fig.axes[0].get_lines() if line.get_label().startswith("synthetic")]) == 3


def test_a_run_without_pairs_still_draws(one_run):
    bare = Run(manifest=one_run.manifest, tables={k: v for k, v in one_run.tables.items() if k != "alignment_pairs"})
    fig = figures.null_distribution([bare])
    assert "no alignment_pairs table" in fig.axes[0].get_title()
    complete = figures.complete_analysis(bare)
    assert any("no alignment_pairs table" in ax.get_title() for ax in complete.axes)


def test_errors_name_the_problem(tmp_path, one_run):
    unfinished = Run(manifest={**one_run.manifest, "status": "running", "completed_layers": []}, tables={}, path=tmp_path)
    with pytest.raises(RunDirectoryError, match="unfinished"):
        figures.comparison_panels([unfinished])
    other = Run(manifest={"analysis": "expert_distance"}, tables={"distance": pd.DataFrame({"x": [1]})})
    with pytest.raises(RunDirectoryError, match="no 'alignment' table"):
        figures.comparison_panels([other])
    with pytest.raises(ConfigError, match="no figure named"):
        figures.draw("bogus", [one_run])
