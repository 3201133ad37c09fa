"""Every per-layer figure reads well from 12 to 48 layers: layer labels never touch (every layer
up to 16, then every 2nd, 4th, …), no text leaves the canvas, numbers sit in cells only where
they fit at the report's smallest readable size, and every colour bar is labelled at both ends."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
from matplotlib.figure import Figure

from moelens import figures
from moelens.figures.style import (
    cell_font_size,
    label_colour_bar_ends,
    layer_block_ticks,
    layer_label_step,
    report_min_pt,
)
from moelens.results import Run
from moelens.testing.synthetic_clusters import synthetic_clustering_run
from moelens.testing.synthetic_runs import synthetic_alignment_run
from moelens.testing.synthetic_trace import synthetic_trace_run

from .layout_checks import assert_no_text_overlaps, assert_nothing_clipped, drawn_texts
from .test_expert_distance_figures import synthetic_distance_run
from .test_module_figures import module_run


def _alignment(n: int) -> Run:
    return synthetic_alignment_run(layers=range(n), hidden_size=64, ks=range(1, 65), seed=n)


#: Each per-layer figure, drawn for a model of n layers.
DRAW: dict[str, Callable[[int], Figure]] = {
    "trace_heatmap": lambda n: figures.trace_heatmap(synthetic_trace_run("block", layers=range(n), n_prompts=4)),
    "trace_knockout": lambda n: figures.trace_knockout(synthetic_trace_run("knockout", layers=range(n), n_prompts=4)),
    "trace_indirect_effect": lambda n: figures.trace_indirect_effect(synthetic_trace_run("restore", layers=range(n), n_prompts=2)),
    "module_heatmap": lambda n: figures.module_heatmap(module_run(range(n), metrics=(("corr", "pair"),))),
    "expert_distance": lambda n: figures.expert_distance([synthetic_distance_run(layers=range(n), matrices=("expert",))]),
    "layer_k_heatmap": lambda n: figures.layer_k_heatmap(_alignment(n)),
    "complete_analysis": lambda n: figures.complete_analysis(_alignment(n)),
    "cluster_map": lambda n: figures.cluster_map(synthetic_clustering_run(n, 8, 4)),
}


def colour_bars(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def cell_texts(fig: Figure) -> list:
    """Numbers written inside heat-map cells (text placed in a panel's data area)."""
    return [t for ax in fig.axes for t in ax.texts if t.get_text().strip() and t.get_text().strip()[-1].isdigit()]


@pytest.mark.parametrize("n_layers", [12, 48])
@pytest.mark.parametrize("name", sorted(DRAW))
def test_every_per_layer_figure_reads_well_at_12_and_48_layers(name, n_layers):
    fig = DRAW[name](n_layers)
    texts = drawn_texts(fig)
    assert_nothing_clipped(fig, texts=texts)
    assert_no_text_overlaps(fig, texts=texts)
    smallest = report_min_pt(fig.get_figwidth())
    for text in cell_texts(fig):  # a number in a cell is never smaller than the report can show
        assert text.get_fontsize() >= smallest - 1e-9, (name, text.get_text(), text.get_fontsize(), smallest)
    for bar in colour_bars(fig):  # both ends of every colour bar carry their value
        low, high = sorted(bar.get_ylim())
        ticks = [t for t in bar.get_yticks() if low - 1e-12 <= t <= high + 1e-12]
        assert np.isclose(ticks[0], low) and np.isclose(ticks[-1], high), (name, ticks, low, high)
        labels = [t.get_text() for t in bar.get_yticklabels() if t.get_text()]
        assert len(labels) == len(set(labels)) >= 2, (name, labels)


@pytest.mark.parametrize("name", ["trace_heatmap", "trace_knockout", "module_heatmap"])
def test_cells_carry_numbers_at_12_layers_and_none_at_48(name):
    assert cell_texts(DRAW[name](12)), f"{name}: 12 layers leave room for each cell's number"
    assert not cell_texts(DRAW[name](48)), f"{name}: at 48 layers the numbers cannot fit; the colour bar tells them"


@pytest.mark.parametrize("n_layers", [4, 12, 16, 32, 48])
def test_the_seed_figure_labels_every_layer_up_to_16_then_every_2nd_or_4th(n_layers):
    fig = DRAW["trace_heatmap"](n_layers)
    fig.draw_without_rendering()
    ax = [a for a in fig.axes if a.get_images()][0]
    labelled = [int(t.get_text()) for t in ax.get_xticklabels() if t.get_text()]
    steps = set(np.diff(labelled)) if len(labelled) > 1 else {1}
    if n_layers <= 16:
        assert labelled == list(range(n_layers))
    else:
        assert len(steps) == 1 and steps.pop() in (2, 4) and labelled[0] == 0


def test_layer_label_step_grows_with_depth_and_keeps_labels_apart():
    assert layer_label_step(12, 0.3, 0.15) == 1
    assert layer_label_step(32, 0.3, 0.15) == 2  # above 16 layers, never every layer
    assert layer_label_step(48, 0.06, 0.15) == 4  # 0.06 in per layer: 4 layers hold a 0.15 in label and its gap
    assert layer_label_step(48, 0.05, 0.15) == 8
    assert layer_label_step(48, 0.01, 0.15) == 32


def test_layer_blocks_are_thinned_to_the_space_they_have():
    rows = [layer for layer in range(48) for _expert in range(8)]
    _starts, _centres, every = layer_block_ticks(rows, max_labels=16)
    _starts, _centres, narrow = layer_block_ticks(rows, max_labels=16, span_inches=2.2, along="x")
    assert len(every) <= 16 and len(narrow) < len(every)
    assert narrow[:3] == ["L0", "L8", "L16"]


def test_layer_k_cells_carry_numbers_where_they_fit():
    few_ks = synthetic_alignment_run(layers=range(12), hidden_size=64, ks=(1, 2, 4, 8, 16, 32, 64), seed=1)
    fig = figures.layer_k_heatmap(few_ks)
    assert len(cell_texts(fig)) == 12 * 7
    assert not cell_texts(DRAW["layer_k_heatmap"](12))  # 64 columns: no room


def test_a_number_goes_into_a_cell_only_at_a_readable_size():
    assert report_min_pt(16.0) == pytest.approx(11.0)  # 16 in drawn 1152 px wide: 1 pt = 1 px
    assert cell_font_size(6.0, 0.34, 0.42, 4) == pytest.approx(7.0)
    assert cell_font_size(6.0, 0.1, 0.42, 4) is None  # too narrow for four characters at 6 pt
    assert cell_font_size(13.0, 0.34, 0.42, 4) is None  # a 13 in figure needs 8.9 pt; the cell holds 8.6


def test_colour_bar_ends_are_the_data_range():
    from moelens.figures.style import new_figure

    fig = new_figure(3, 3)
    ax = fig.subplots()
    image = ax.imshow(np.array([[0.031, 0.2], [0.3, 0.457]]), vmin=0.031, vmax=0.457)
    bar = fig.colorbar(image, ax=ax)
    label_colour_bar_ends(bar, 2.5)
    labels = [t.get_text() for t in bar.ax.get_yticklabels()]
    # round values between (0.1, 0.2, …), the ends one decimal finer, so the range is read off the bar
    assert labels[0] == "0.03" and labels[-1] == "0.46" and len(labels) >= 3


def test_tiny_values_are_never_written_as_zeros_everywhere():
    """An untrained model's indirect effects are ~1e-4: 0.00 in every cell would say nothing, so
    the cells get the decimals that tell them apart, or no number when that does not fit."""
    run = synthetic_trace_run("block", layers=range(12), n_prompts=4)
    summary = run.tables["interventions_summary"]
    summary["mean"] = summary["mean"] * 1e-4
    texts = [t.get_text() for t in cell_texts(figures.trace_heatmap(run))]
    assert len(set(texts)) > 1 or not texts
    assert "0.00" not in texts
