"""Every alignment figure reads well on the page: no text runs off the canvas (the report shows
the canvas as it is, so clipped text is lost) and no two labels collide, for one run, two runs,
six runs, a run of several layers and a run whose d is no power of two."""

from __future__ import annotations

import pytest
from matplotlib.figure import Figure

from moelens import figures
from moelens.results import Run

from .layout_checks import assert_no_text_overlaps, assert_nothing_clipped, drawn_texts
from .test_alignment_figures import ALIGNMENT_FIGURES, ONE_RUN, data_axes

MULTI_RUN = [name for name in ALIGNMENT_FIGURES if name not in ONE_RUN]


def assert_reads_well(fig: Figure) -> None:
    """Nothing clipped, nothing overlapping, and every panel labelled on both axes."""
    texts = drawn_texts(fig)
    assert_nothing_clipped(fig, texts=texts)
    assert_no_text_overlaps(fig, texts=texts)
    for ax in data_axes(fig):
        # Panels stacked on a shared x axis carry the label once, under the bottom panel.
        shared = ax.get_shared_x_axes().get_siblings(ax)
        assert any(a.get_xlabel().strip() for a in shared), f"axes {ax.get_title()!r} has no x label"
        assert ax.get_ylabel().strip(), f"axes {ax.get_title()!r} has no y label"
    assert fig.get_layout_engine() is not None, "figures use constrained layout"


# Two runs matter to null_distribution alone (two panels side by side, under a wide legend).
@pytest.mark.parametrize("name, count", [(n, c) for n in MULTI_RUN for c in (1, 6)] + [("null_distribution", 2)])
def test_multi_run_figures_read_well(name, count, one_run, six_runs):
    runs = [one_run] if count == 1 else six_runs[:count]
    assert_reads_well(figures.draw(name, runs))


@pytest.mark.parametrize("name", ONE_RUN)
def test_one_run_figures_read_well(name, one_run, six_runs):
    """One run, and the last of the six (a shuffle null, whose z ceiling adds a legend entry)."""
    for run in (one_run, six_runs[-1]):
        assert_reads_well(figures.draw(name, [run]))


@pytest.mark.parametrize("name", ALIGNMENT_FIGURES)
def test_every_figure_reads_well_for_a_layered_small_model_run(name, layered_run):
    """The demo's runs: several layers, d = 64, every k from 1 to d (64 heat-map columns)."""
    assert_reads_well(figures.draw(name, [layered_run]))


@pytest.mark.parametrize("name", ALIGNMENT_FIGURES)
def test_every_figure_reads_well_when_d_is_no_power_of_two(name, d48_run):
    assert_reads_well(figures.draw(name, [d48_run]))


@pytest.mark.parametrize("name", ["comparison_panels", "cos_squared_per_expert", "null_distribution", "per_expert_breakdown"])
def test_long_run_labels_still_fit(name, six_runs):
    """Run labels as long as real ones (an organisation, a model, a layer range): legends take
    more rows, and the per-expert rows name their run once instead of in each panel's title."""
    long = [Run(manifest={**run.manifest, "label": f"organisation/model-{i}-with-a-long-checkpoint-name L0-31"},
                tables=run.tables) for i, run in enumerate(six_runs)]
    assert_reads_well(figures.draw(name, long))


def test_the_checks_catch_clipped_and_overlapping_text():
    """The checks themselves: a legend wider than its figure, two tick labels on one spot."""
    fig = Figure(figsize=(4, 3), layout="constrained")
    ax = fig.subplots()
    ax.plot([1, 2], [1, 2], label="a legend entry far wider than this small figure " * 2)
    fig.legend(loc="outside lower center")
    with pytest.raises(AssertionError, match="text beyond the 400 × 300 px canvas: 'a legend entry"):
        assert_nothing_clipped(fig)
    ax.set_xticks([1.5, 1.51], ["one thousand", "two thousand"])
    with pytest.raises(AssertionError, match="overlapping text: 'one thousand'.* and 'two thousand'"):
        assert_no_text_overlaps(fig)
