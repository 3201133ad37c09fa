"""Cluster map and usage figures: they draw the run's clusters and frequencies, mark the dominant
experts, refuse what they cannot draw, and keep every text on the canvas at zoo and real sizes."""

from __future__ import annotations

import matplotlib.colors as mcolors
import numpy as np
import pytest
from matplotlib.collections import PathCollection
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle

from moelens import figures
from moelens.errors import ConfigError
from moelens.figures.clusters import SINGLETON_GREY, cluster_colours, cluster_map, cluster_usage, expert_usage
from moelens.results import Run
from moelens.testing.synthetic_clusters import synthetic_calibration_run, synthetic_clustering_run

from .layout_checks import assert_no_text_overlaps, assert_nothing_clipped, drawn_texts


def assert_laid_out(fig) -> None:
    texts = drawn_texts(fig)  # one draw for both checks
    assert_nothing_clipped(fig, texts=texts)
    assert_no_text_overlaps(fig, texts=texts)


def synthetic_runs(n_layers: int = 4, n_experts: int = 8, groups: int = 4, seed: int = 0) -> tuple[Run, Run]:
    """A clustering run and a calibration run with its usage table."""
    run = synthetic_clustering_run(n_layers, n_experts, groups, seed=seed)
    calibration = synthetic_calibration_run(n_layers, n_experts, seed=seed)
    calibration.tables["calibration_usage"] = run["calibration_usage"]
    return run, calibration


@pytest.fixture(scope="module")
def small():
    return synthetic_runs()


@pytest.fixture(scope="module")
def large():
    """Qwen3-30B-A3B's size: 48 layers of 128 experts, G = 96."""
    return synthetic_runs(48, 128, 96, seed=1)


def test_the_cluster_map_colours_each_cluster_and_dots_the_dominant_experts(small):
    run, _ = small
    fig = cluster_map(run)
    ax = fig.axes[0]
    image = next(a for a in ax.get_children() if isinstance(a, AxesImage)).get_array()
    dots = next(c for c in ax.collections if isinstance(c, PathCollection)).get_offsets()
    table = run["clusters"]
    for row, (_, rows) in enumerate(table.groupby("layer", sort=True)):
        rows = rows.sort_values("expert")
        colours = cluster_colours(rows["cluster"].tolist())
        np.testing.assert_allclose(image[row], [mcolors.to_rgb(c) for c in colours])
        sizes = rows["cluster"].value_counts()
        for e, c in zip(rows["expert"], rows["cluster"]):
            assert (colours[e] == SINGLETON_GREY) == (sizes[c] == 1)
        on_row = sorted(int(x) for x, y in dots if int(y) == row)
        assert on_row == rows[rows["dominant"]]["expert"].tolist() and len(on_row) == 4  # G dots per row
    assert "M-SMoE" in fig._suptitle.get_text()
    assert_laid_out(fig)


def test_usage_bars_are_the_frequencies_coloured_by_cluster(small):
    run, calibration = small
    for fig, coloured in ((cluster_usage(run), True), (expert_usage(calibration), False)):
        axes = [ax for ax in fig.axes if ax.get_visible()]
        assert [ax.get_title() for ax in axes] == [f"Layer {i}" for i in range(4)]
        for layer, ax in enumerate(axes):
            bars = [p for p in ax.patches if isinstance(p, Rectangle)]
            rows = run["clusters"][run["clusters"]["layer"] == layer].sort_values("expert")
            np.testing.assert_allclose([b.get_height() for b in bars], rows["frequency"])
            assert any(line.get_ydata()[0] == pytest.approx(1 / 8) for line in ax.lines)  # uniform 1/E
            if coloured:
                assert [mcolors.to_hex(b.get_facecolor()) for b in bars] == [c.lower() for c in cluster_colours(rows["cluster"].tolist())]
                outlined = [tuple(mcolors.to_rgba(b.get_edgecolor())) == (0.0, 0.0, 0.0, 1.0) for b in bars]
                assert outlined == rows["dominant"].tolist()
        assert_laid_out(fig)


def test_real_sizes_keep_every_text_on_the_canvas(large):
    run, calibration = large
    the_map = cluster_map(run)
    for fig in (the_map, cluster_usage(run), expert_usage(calibration, layers=[0, 47])):
        assert_laid_out(fig)
    dots = next(c for c in the_map.axes[0].collections if isinstance(c, PathCollection)).get_offsets()
    assert len(dots) == 48 * 96


def test_what_cannot_be_drawn_is_refused_in_one_line(small):
    run, calibration = small
    with pytest.raises(ConfigError, match="draws clustering runs"):
        cluster_map(calibration)
    with pytest.raises(ConfigError, match="draws calibration runs"):
        expert_usage(run)
    with pytest.raises(ConfigError, match="at most 4"):
        cluster_usage(run, layers=[0, 1, 2, 3, 0])
    with pytest.raises(ConfigError, match="layer 9 is not in run"):
        expert_usage(calibration, layers=[9])
    with pytest.raises(ConfigError, match="cluster_map draws clustering runs, but run"):
        figures.draw("cluster_map", [calibration])
    fig = figures.draw("cluster_usage", [run], layers=[2])
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["Layer 2"]


def test_cluster_map_writes_each_cells_cluster_within_its_layer_and_says_ids_restart():
    from matplotlib.legend import Legend

    from moelens.figures.clusters import cluster_map
    from moelens.testing.synthetic_clusters import synthetic_clustering_run

    run = synthetic_clustering_run(method="hc-smoe", groups=3, seed=1)
    fig = cluster_map(run)
    ax = fig.axes[0]
    written = {(round(t.get_position()[0] + 0.27), round(t.get_position()[1] + 0.2)): int(t.get_text()) for t in ax.texts}
    layers = sorted(int(v) for v in run["clusters"]["layer"].unique())
    for r in run["clusters"].itertuples(index=False):
        assert written[(int(r.expert), layers.index(int(r.layer)))] == int(r.cluster)
    assert all(t.get_fontsize() >= 8 for t in ax.texts)
    [legend] = fig.findobj(Legend)
    assert any("restart in every layer" in t.get_text() for t in legend.get_texts())
