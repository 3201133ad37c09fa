"""Interventions figures (docs/methods.md §4, seed 003): the heat map's cells and the indirect-effect
panels are the summary table's means (checked against a plain-loop reference over the per-prompt
rows, and against a summary whose values are known by construction), rows and labels follow the
seed and ROME, every text stays on the canvas from 2 to 100 layers and 1 to 5 rows, and a run of
the wrong kind is one clear line."""

from __future__ import annotations

import math
from collections import defaultdict

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from moelens import figures
from moelens.errors import ConfigError
from moelens.figures.trace import layer_ticks, trace_heatmap, trace_indirect_effect, window_span
from moelens.results import Run, load_run
from moelens.testing.synthetic_trace import SUMMARY_SCHEMA, synthetic_trace_run, write_synthetic_trace_run

from .layout_checks import assert_no_text_overlaps, assert_nothing_clipped, drawn_texts

KINDS = ("before_subject", "first_subject", "middle_subject", "last_subject", "first_after", "further", "last")


@pytest.fixture(scope="module")
def knockout_run() -> Run:
    """Eight layers of an MoE model; layers 2 and 5 have no attention module."""
    return synthetic_trace_run("knockout", range(8), n_prompts=6, missing=[(2, "attn"), (5, "attn")], label="tiny MoE knockout")


@pytest.fixture(scope="module")
def restore_run() -> Run:
    return synthetic_trace_run("restore", range(6), n_prompts=5, window=6, seed=3, label="tiny restore")


@pytest.fixture(scope="module")
def block_run() -> Run:
    return synthetic_trace_run("block", range(6), n_prompts=4, seed=4, moe=False, label="tiny block")


# ---------------------------------------------------------------------------------------------
# helpers


def images(fig: Figure) -> list:
    return [im for ax in fig.axes for im in ax.get_images() if im.get_gid() == "values"]


def drawn(fig: Figure, panel: int = 0) -> np.ndarray:
    """The image's array as drawn (NaN where a cell is masked)."""
    return np.ma.filled(np.ma.asarray(images(fig)[panel].get_array()).astype(float), np.nan)


def colourbar_labels(fig: Figure) -> list[str]:
    return [ax.get_ylabel().replace("\n", " ") for ax in fig.axes if ax.get_label() == "<colorbar>"]


def subtitle(ax) -> str:
    return ax.get_title(loc="left").replace("\n", " ")


def ytick_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_yticklabels()]


def reference_means(run: Run, measure: str, key: str, token_kind: str = "") -> dict[tuple[str, int], float]:
    """Plain loops over the per-prompt rows: the mean of ``measure`` per (site or token kind, layer)."""
    sums: dict[tuple[str, int], float] = defaultdict(float)
    counts: dict[tuple[str, int], int] = defaultdict(int)
    for row in run["interventions"].itertuples(index=False):
        value = float(getattr(row, measure))
        if math.isnan(value) or (key == "site" and row.token_kind != token_kind):
            continue
        cell = (getattr(row, key), int(row.layer)) if key == "site" else ((row.site, row.token_kind), int(row.layer))
        sums[cell] += value
        counts[cell] += 1
    return {cell: sums[cell] / counts[cell] for cell in sums}


def expected_grid(reference: dict, rows: list, layers: list[int]) -> np.ndarray:
    return np.array([[reference.get((r, layer), np.nan) for layer in layers] for r in rows])


def luminance(rgba) -> float:
    r, g, b, _ = mcolors.to_rgba(rgba)
    return 0.299 * r + 0.587 * g + 0.114 * b


# ---------------------------------------------------------------------------------------------
# the numbers drawn


def test_knockout_heatmap_cells_are_the_mean_jsd_over_prompts(knockout_run):
    fig = trace_heatmap(knockout_run)
    values = drawn(fig)
    sites = ["subj", "attn", "last", "router", "moe"]
    expected = expected_grid(reference_means(knockout_run, "jsd", "site"), sites, list(range(8)))
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-12, equal_nan=True)
    assert np.isnan(values[1, 2]) and np.isnan(values[1, 5]) and np.isfinite(values[1, [0, 1, 3, 4, 6, 7]]).all()
    # the summary table itself, row by row
    summary = knockout_run["interventions_summary"].query("measure == 'jsd'")
    for row in summary.itertuples(index=False):
        assert values[sites.index(row.site), row.layer] == row.mean


def test_a_summary_known_by_construction_is_drawn_as_it_is():
    """mean = 0.1·(site index) + 0.01·layer over layers 3, 4, 7 (not consecutive); rows shuffled."""
    sites = ["moe", "last", "subj", "attn"]  # not in the seed's order: the figure orders them
    layers = [3, 4, 7]
    order = ["subj", "attn", "last", "moe"]
    rows = [(layer, site, "knockout", "", measure, 0.1 * order.index(site) + 0.01 * layer + (0.5 if measure == "p_target" else 0),
             0.01, 5) for layer in layers for site in sites for measure in ("jsd", "p_target")]
    summary = pd.DataFrame(rows, columns=SUMMARY_SCHEMA.column_names).sample(frac=1.0, random_state=1)
    run = Run(manifest={"analysis": "interventions", "label": "known", "options": {"mode": "knockout", "ablation": "zero"}},
              tables={"interventions_summary": summary})
    fig = trace_heatmap(run)
    expected = np.array([[0.1 * i + 0.01 * layer for layer in layers] for i in range(4)])
    np.testing.assert_allclose(drawn(fig), expected, rtol=0, atol=1e-15)
    ax = images(fig)[0].axes
    assert ytick_texts(ax) == ["Subj.", "Attn.", "Last.", "MoE"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["3", "4", "7"]
    np.testing.assert_allclose(drawn(trace_heatmap(run, measure="p_target")), expected + 0.5, atol=1e-15)
    assert colourbar_labels(trace_heatmap(run, measure="p_target")) == ["Avg p(target)"]
    assert "zeroed" in subtitle(ax)  # the subtitle says what was done


def test_block_heatmap_rows_and_values(block_run):
    fig = trace_heatmap(block_run)
    ax = images(fig)[0].axes
    # seed 003 is attention knockout: Subj. = block_subj, Attn. = block_nonsubj, Last. = block_last
    assert ytick_texts(ax) == ["Subj.", "Attn.", "Last."]
    expected = expected_grid(reference_means(block_run, "jsd", "site"), ["block_subj", "block_nonsubj", "block_last"], list(range(6)))
    np.testing.assert_allclose(drawn(fig), expected, rtol=0, atol=1e-12)
    assert "window 9 of 6 layers; Geva et al.: 9 of 48" in subtitle(ax) and "ℓ−4 … ℓ+4" in subtitle(ax)
    assert "subject (Subj.)" in subtitle(ax) and "itself (Last.)" in subtitle(ax)


def test_knockout_and_restore_heat_maps_have_names_of_their_own(knockout_run, restore_run, block_run):
    from moelens.figures.trace import HEATMAP_FIGURES, trace_knockout, trace_restore

    assert HEATMAP_FIGURES == {"block": "trace_heatmap", "knockout": "trace_knockout", "restore": "trace_restore"}
    np.testing.assert_array_equal(drawn(trace_knockout(knockout_run)), drawn(trace_heatmap(knockout_run)))
    np.testing.assert_array_equal(drawn(trace_restore(restore_run)), drawn(trace_heatmap(restore_run)))
    assert {"trace_knockout", "trace_restore"} <= set(figures.figures_of("interventions"))
    one_line_error(lambda: trace_knockout(block_run), "no knockout rows", "--mode knockout")


def test_restore_heatmap_reads_one_token_group(restore_run):
    sites = ["restore_hidden", "restore_mlp", "restore_attn"]
    for kind in ("last_subject", "last"):
        fig = trace_heatmap(restore_run) if kind == "last_subject" else trace_heatmap(restore_run, token_kind=kind)
        expected = expected_grid(reference_means(restore_run, "jsd", "site", kind), sites, list(range(6)))
        np.testing.assert_allclose(drawn(fig), expected, rtol=0, atol=1e-12)
        ax = images(fig)[0].axes
        assert ytick_texts(ax) == ["Hidden", "MoE", "Attn."]
        assert ("last subject token" if kind == "last_subject" else "last token") in subtitle(ax)


def test_indirect_effect_panels_are_rome_s(restore_run):
    fig = trace_indirect_effect(restore_run)
    panels = images(fig)
    assert len(panels) == 3
    reference = reference_means(restore_run, "indirect_effect", "token_kind")
    kinds = [k for k in KINDS if any(cell[0][1] == k for cell in reference)]
    for panel, site, cmap in zip(range(3), ("restore_hidden", "restore_mlp", "restore_attn"), ("Purples", "Greens", "Reds")):
        expected = expected_grid(reference, [(site, k) for k in kinds], list(range(6)))
        np.testing.assert_allclose(drawn(fig, panel), expected, rtol=0, atol=1e-12)
        image = panels[panel]
        assert image.get_cmap().name.startswith(cmap)
        assert image.norm.vmin <= 0.0 and image.norm.vmax == pytest.approx(np.nanmax(expected))
        assert ytick_texts(image.axes) == [{"before_subject": "Before subject", "first_subject": "First subject token",
                                            "middle_subject": "Middle subject tokens", "last_subject": "Last subject token",
                                            "first_after": "First subsequent token", "further": "Further tokens",
                                            "last": "Last token"}[k] for k in kinds]
    titles = [im.axes.get_title(loc="left").replace("\n", " ") for im in panels]
    assert titles[0].startswith("Hidden state restored at layer ℓ")
    # window 6 from the manifest: [ℓ − 3, ℓ + 2]; an MoE model's MLP block is its MoE block
    assert titles[1] == "MoE output restored at layers ℓ−3 … ℓ+2 (window 6)"
    assert titles[2] == "Attention output restored at layers ℓ−3 … ℓ+2 (window 6)"
    assert colourbar_labels(fig) == ["Avg indirect effect (Δ p(target))"] * 3
    assert images(fig)[2].axes.get_xlabel() == "Layer ℓ"


def test_restore_run_without_some_token_kinds_or_sites_skips_them():
    run = synthetic_trace_run("restore", range(3), sites=["restore_hidden"], n_prompts=2, seed=11, moe=False)
    table = run["interventions"]
    present = set(table["token_kind"])
    fig = trace_indirect_effect(run)
    assert len(images(fig)) == 1
    labels = ytick_texts(images(fig)[0].axes)
    assert len(labels) == len(present) and "Last token" in labels and "Last subject token" in labels
    assert trace_heatmap(run).axes[0].get_yticklabels()[0].get_text() == "Hidden"


def test_colour_is_blues_darker_where_larger_and_spans_the_data(knockout_run):
    image = images(trace_heatmap(knockout_run))[0]
    values = drawn(trace_heatmap(knockout_run))
    assert image.get_cmap().name.startswith("Blues")
    assert (image.norm.vmin, image.norm.vmax) == (np.nanmin(values), np.nanmax(values))
    cmap = image.get_cmap()
    assert luminance(cmap(image.norm(np.nanmax(values)))) < luminance(cmap(image.norm(np.nanmin(values)))) - 0.5


def test_labels_title_and_small_grid_annotations(knockout_run):
    fig = trace_heatmap(knockout_run)
    ax = images(fig)[0].axes
    assert ytick_texts(ax) == ["Subj.", "Attn.", "Last.", "Router", "MoE"]
    assert ax.get_xlabel() == "Layer"
    assert colourbar_labels(fig) == ["Avg JS Divergence (bits)"]
    assert fig.get_suptitle() == "tiny MoE knockout"
    assert "mean over 6 prompts" in subtitle(ax)
    values = drawn(fig)
    cells = [t for t in ax.texts if t.get_gid() == "cell"]
    assert len(cells) == np.isfinite(values).sum()
    for text in cells:
        j, i = text.get_position()
        assert text.get_text() == f"{values[int(i), int(j)]:.2f}"
    # the grey cell of a layer without attention is explained
    assert [t.get_text() for legend in fig.legends for t in legend.get_texts()] == ["no such module in this layer (not traced)"]


def test_layer_ticks_every_two_like_the_seed():
    assert layer_ticks(list(range(32)), 0.25, 8.0) == list(range(0, 32, 2))
    assert layer_ticks(list(range(8)), 0.34, 8.0) == list(range(8))
    assert layer_ticks(list(range(100)), 0.1, 8.0) == list(range(0, 100, 5))
    assert layer_ticks([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], 0.3, 8.0) == list(range(1, 18, 2))
    assert layer_ticks([0, 10, 20], 0.34, 8.0) == [0, 1, 2]
    assert window_span(10) == "ℓ−5 … ℓ+4" and window_span(9) == "ℓ−4 … ℓ+4" and window_span(1) == "ℓ"


def test_the_seed_figure_32_layers_three_rows():
    run = synthetic_trace_run("knockout", range(32), n_prompts=3, moe=False, label="Llama-2-7b (synthetic)")
    fig = trace_heatmap(run)
    ax = images(fig)[0].axes
    assert ytick_texts(ax) == ["Subj.", "Attn.", "Last."]
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(layer) for layer in range(0, 32, 2)]
    assert not [t for t in ax.texts if t.get_gid() == "cell"]  # 32 narrow columns carry no numbers
    values = drawn(fig)
    assert values[0, :6].mean() > values[0, -6:].mean()  # the seed's shape: the subject fades with depth


# ---------------------------------------------------------------------------------------------
# layout


@pytest.mark.parametrize("layers, sites, mode", [
    (2, ["subj"], "knockout"),
    (7, None, "knockout"),
    (32, ["subj", "attn", "last"], "knockout"),
    (100, None, "knockout"),
    (24, ["block_nonsubj"], "block"),
    (3, None, "restore"),
])
def test_heatmap_keeps_every_text_on_the_canvas(layers, sites, mode):
    run = synthetic_trace_run(mode, range(layers), sites=sites, n_prompts=2, seed=layers,
                              label=f"a long model name from some organisation/{mode}-{layers}-layers-checkpoint")
    fig = trace_heatmap(run)
    texts = drawn_texts(fig)
    assert_nothing_clipped(fig, texts=texts)
    assert_no_text_overlaps(fig, texts=texts)


@pytest.mark.parametrize("layers, sites", [(2, ["restore_hidden"]), (12, None), (100, ["restore_mlp", "restore_attn"])])
def test_indirect_effect_keeps_every_text_on_the_canvas(layers, sites):
    run = synthetic_trace_run("restore", range(layers), sites=sites, n_prompts=2 if layers < 100 else 1, seed=layers)
    fig = trace_indirect_effect(run)
    texts = drawn_texts(fig)
    assert_nothing_clipped(fig, texts=texts)
    assert_no_text_overlaps(fig, texts=texts)


# ---------------------------------------------------------------------------------------------
# the catalog, run directories and wrong input


def test_both_figures_are_registered_for_interventions_runs(knockout_run, restore_run, tmp_path):
    assert figures.FIGURES["trace_heatmap"].analysis == "interventions" and figures.FIGURES["trace_heatmap"].one_run
    assert figures.FIGURES["trace_indirect_effect"].one_run
    assert {"trace_heatmap", "trace_indirect_effect"} <= set(figures.figures_of("interventions"))
    assert figures.trace_heatmap is trace_heatmap and figures.trace_indirect_effect is trace_indirect_effect
    # through a run directory: the writer's manifest passes load_run's schema checks
    loaded = load_run(write_synthetic_trace_run(tmp_path / "restore", mode="restore", layers=range(3), n_prompts=2))
    fig = figures.draw("trace-heatmap", [loaded], measure="indirect_effect", token_kind="last")
    values = drawn(fig)
    expected = expected_grid(reference_means(loaded, "indirect_effect", "site", "last"),
                             ["restore_hidden", "restore_mlp", "restore_attn"], [0, 1, 2])
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-12)
    assert colourbar_labels(fig) == ["Avg indirect effect (Δ p(target))"]
    assert len(images(figures.draw("trace_indirect_effect", [loaded]))) == 3


def one_line_error(call, *needles: str) -> str:
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_wrong_runs_modes_and_options_are_one_clear_line(knockout_run, restore_run, block_run):
    one_line_error(lambda: trace_indirect_effect(knockout_run), "knockout run", "restore", "trace_heatmap")
    one_line_error(lambda: trace_indirect_effect(block_run), "block run", "--mode restore")
    one_line_error(lambda: trace_heatmap(knockout_run, mode="restore"), "no restore rows", "--mode restore")
    one_line_error(lambda: trace_heatmap(knockout_run, mode="ablate"), "unknown mode 'ablate'", "knockout, restore, block")
    one_line_error(lambda: trace_heatmap(knockout_run, measure="indirect_effect"), "restore runs only", "jsd, p_target")
    one_line_error(lambda: trace_heatmap(knockout_run, token_kind="last"), "restore run", "knockout run")
    one_line_error(lambda: trace_heatmap(restore_run, token_kind="middle"), "no 'middle' tokens", "last_subject")
    other = Run(manifest={"analysis": "module_metrics", "label": "modules"}, tables={})
    one_line_error(lambda: trace_heatmap(other), "module_metrics run", "interventions runs")
    one_line_error(lambda: figures.draw("trace_indirect_effect", [other]), "draws interventions runs")
    one_line_error(lambda: figures.draw("trace_heatmap", [knockout_run, block_run]), "draws one run")
    one_line_error(lambda: figures.draw("trace_indirect_effect", [restore_run], mode="restore"), "takes no mode")
    empty = Run(manifest={"analysis": "interventions", "label": "empty"}, tables={})
    one_line_error(lambda: trace_heatmap(empty), "no interventions_summary table")
    assert trace_heatmap(knockout_run, mode="knockout") is not None


def test_the_synthetic_summary_is_mean_std_and_count_of_the_rows(restore_run):
    """The writer's derived table against plain loops: mean, std with ddof 0, n (NaN rows left out)."""
    cells: dict[tuple, list[float]] = defaultdict(list)
    for row in restore_run["interventions"].itertuples(index=False):
        for measure in ("jsd", "p_target", "indirect_effect"):
            cells[(row.layer, row.site, row.token_kind, measure)].append(getattr(row, measure))
    summary = restore_run["interventions_summary"]
    assert len(summary) == len(cells)
    for row in summary.itertuples(index=False):
        values = cells[(row.layer, row.site, row.token_kind, row.measure)]
        mean = sum(values) / len(values)
        assert row.n == len(values)
        assert row.mean == pytest.approx(mean, abs=1e-12)
        assert row.std == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)), abs=1e-12)
    knockout = synthetic_trace_run("knockout", range(2), n_prompts=2)["interventions"]
    assert knockout["indirect_effect"].isna().all() and knockout["p_target_corrupt"].isna().all()
    assert (knockout["position"] == -1).all() and (knockout["token_kind"] == "").all()


def test_the_figure_command_draws_both(tmp_path):
    from typer.testing import CliRunner

    from moelens.cli.app import app

    run = write_synthetic_trace_run(tmp_path / "restore", mode="restore", layers=range(3), n_prompts=2, moe=False)
    runner = CliRunner()
    for name in ("trace-heatmap", "trace-indirect-effect"):
        result = runner.invoke(app, ["figure", name, str(run), "--out", str(tmp_path / f"{name}.png"), "--dpi", "50"])
        assert result.exit_code == 0, result.output
        assert (tmp_path / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    result = runner.invoke(app, ["figure", "trace-heatmap", str(run), "--out", str(tmp_path / "m.png"), "--measure", "rel_l2"])
    # moelens.cli.main prints a MoelensError on one line with status 2; in process it is the exception
    assert isinstance(result.exception, ConfigError) and "has no 'rel_l2' rows" in str(result.exception)
