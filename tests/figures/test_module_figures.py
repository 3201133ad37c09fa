"""Module-metrics figures (docs/methods.md §5, seed 002): the heat map's cells are the table's values,
layer 0 on top and the modules in the seed's order; the lines carry the same numbers; both name
what they show, mark what a layer lacks, refuse what they cannot draw, and keep every text on
the canvas."""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.patches import Rectangle

from moelens import figures
from moelens.errors import ConfigError
from moelens.figures.modules import (
    METRICS,
    MODULE_STYLES,
    cell_format,
    layer_tick_rows,
    module_heatmap,
    module_lines,
    module_style,
)
from moelens.figures.style import DIVERGING_CMAP, SEQUENTIAL_CMAP
from moelens.results import Run

from .layout_checks import assert_no_text_overlaps, assert_nothing_clipped, drawn_texts

ATTN = ("attn.q", "attn.k", "attn.v", "attn.o")
MLP = ("mlp.up", "mlp.down", "mlp.gate")
SEED_MODULES = ATTN + MLP
SHARED = ("shared.up", "shared.down", "shared.gate")
PAIR = ("corr", "cos", "rel_l2", "cka", "changed_frac")
SINGLE = ("fro_norm", "spectral_norm", "stable_rank", "effective_rank", "alpha")

#: Where each metric's synthetic values sit (corr like the seed: 0.11–0.13).
CENTRES = {"corr": 0.12, "cos": 0.6, "rel_l2": 0.4, "cka": 0.8, "changed_frac": 0.9, "fro_norm": 40.0,
           "spectral_norm": 6.0, "stable_rank": 20.0, "effective_rank": 300.0, "alpha": 3.5}
#: The column order of seed 002 and, after it, what MoE layers add.
MOE_MODULES = SEED_MODULES + SHARED + ("router",)


def known_value(metric: str, model: str, layer: int, module: str) -> float:
    """A distinct, known value per cell: the metric's centre plus small steps by layer and module
    (at most ±8 % of the centre), different for each model."""
    j = MOE_MODULES.index(module) if module in MOE_MODULES else 15
    offset = {"pair": 0.0, "pair_delta": -0.01, "a": 0.0, "b": 0.03}[model]
    return CENTRES[metric] * (1 + offset + 0.004 * j - 0.03 + 0.0013 * layer)


def module_run(layers: Iterable[int] = range(4), modules_of: Callable[[int], Sequence[str]] = lambda layer: SEED_MODULES,
               metrics: Iterable[tuple[str, str]] = tuple((m, "pair") for m in PAIR) + tuple((m, s) for m in SINGLE for s in "ab"),
               label: str = "dense A vs B", value: Callable[[str, str, int, str], float] = known_value,
               shuffle: bool = True, experts: Optional[pd.DataFrame] = None, inputs: Optional[dict] = None) -> Run:
    """A module_metrics run with known values; rows shuffled, so the figure must order them."""
    rows = [(layer, module, metric, model, value(metric, model, layer, module))
            for layer in layers for module in modules_of(layer) for metric, model in metrics]
    table = pd.DataFrame(rows, columns=["layer", "module", "metric", "model", "value"])
    if shuffle:
        table = table.sample(frac=1.0, random_state=0).reset_index(drop=True)
    manifest = {"analysis": "module_metrics", "label": label, "options": {"layers": list(layers)}}
    if inputs is not None:
        manifest["inputs"] = inputs
    tables = {"module_metrics": table}
    if experts is not None:
        tables["module_metrics_experts"] = experts
    return Run(manifest=manifest, tables=tables)


def pivot(run: Run, metric: str, model: str, modules: Sequence[str]) -> np.ndarray:
    """The table's layers × modules values (NaN where a layer lacks a module), every layer."""
    t = run["module_metrics"]
    rows = t[(t["metric"] == metric) & (t["model"] == model)]
    layers = sorted(t["layer"].unique())
    return rows.pivot(index="layer", columns="module", values="value").reindex(index=layers, columns=list(modules)).to_numpy(float)


def moe_modules(layer: int) -> list[str]:
    """Layer 0 dense (no shared expert, no router), layer 2 a Mamba layer (no attention)."""
    attention = [] if layer == 2 else list(ATTN)
    moe = [] if layer == 0 else [*SHARED, "router"]
    return attention + list(MLP) + moe


@pytest.fixture(scope="module")
def dense_run() -> Run:
    return module_run()


@pytest.fixture(scope="module")
def moe_run() -> Run:
    """Six layers, corr/stable_rank and corr of the deltas; the router of layer 4 is undefined."""
    run = module_run(range(6), moe_modules, (("corr", "pair"), ("corr", "pair_delta"), ("stable_rank", "a")),
                     label="tiny MoE base vs tuned", inputs={"a": {"name": "A"}, "b": {"name": "B"}, "base": {"name": "base"}},
                     experts=pd.DataFrame({"layer": [1], "module": ["mlp.up"], "expert": [0], "metric": ["corr"],
                                           "model": ["pair"], "value": [0.5]}))
    table = run["module_metrics"]
    table.loc[(table["layer"] == 4) & (table["module"] == "router") & (table["model"] == "pair"), "value"] = np.nan
    return run


@pytest.fixture(scope="module")
def seed_run() -> Run:
    """Seed 002: 36 layers, seven modules, corr between 0.11 and 0.13."""
    def seed_value(metric, model, layer, module):
        j = SEED_MODULES.index(module)
        return 0.11 + 0.02 * ((j * 7 + layer * 3) % 41) / 40

    return module_run(range(36), metrics=(("corr", "pair"),), label="Qwen3 base vs instruct (synthetic)", value=seed_value)


# ---------------------------------------------------------------------------------------------
# helpers


def image_of(fig: Figure):
    [image] = [im for ax in fig.axes for im in ax.get_images() if im.get_gid() == "values"]
    return image


def heat_axes(fig: Figure):
    return image_of(fig).axes


def colourbar_label(fig: Figure) -> str:
    [bar] = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    return bar.get_ylabel()


def cell_texts(fig: Figure) -> list:
    return [t for t in heat_axes(fig).texts if t.get_gid() == "cell"]


def lines_by_module(fig: Figure) -> dict:
    return {line.get_gid(): line for line in fig.axes[0].get_lines() if line.get_gid()}


def legend_texts(fig: Figure) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def luminance(colour) -> float:
    r, g, b, _ = mcolors.to_rgba(colour)
    return 0.299 * r + 0.587 * g + 0.114 * b


# ---------------------------------------------------------------------------------------------
# the heat map


def test_heatmap_cells_are_the_table_pivot_with_layer_0_on_top(dense_run):
    fig = module_heatmap(dense_run)
    assert isinstance(fig, Figure) and fig.get_layout_engine() is not None
    image = image_of(fig)
    values = np.asarray(image.get_array())
    np.testing.assert_array_equal(values, pivot(dense_run, "corr", "pair", SEED_MODULES))
    assert values[0, 0] == known_value("corr", "pair", 0, "attn.q") and values[3, 6] == known_value("corr", "pair", 3, "mlp.gate")
    ax = heat_axes(fig)
    bottom, top = ax.get_ylim()
    assert image.origin == "upper" and bottom > top, "row 0 (layer 0) is drawn at the top"
    assert [t.get_text() for t in ax.get_xticklabels()] == list(SEED_MODULES)
    assert list(ax.get_yticks()) == [0, 1, 2, 3] and [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2", "3"]
    assert ax.get_ylabel() == "Layer" and ax.get_xlabel() == "Module"
    assert colourbar_label(fig) == "Pearson correlation (corr) ↑"
    title = fig.get_suptitle()
    assert "Pearson correlation" in title and "A vs B" in title and "dense A vs B" in title


def test_colours_span_the_data_not_zero_to_one(dense_run, seed_run):
    for run in (dense_run, seed_run):
        image = image_of(module_heatmap(run, "corr"))
        values = pivot(run, "corr", "pair", SEED_MODULES)
        assert (image.norm.vmin, image.norm.vmax) == (values.min(), values.max())
        assert image.get_cmap().name.startswith(SEQUENTIAL_CMAP)
    seed_norm = image_of(module_heatmap(seed_run)).norm
    assert 0.11 <= seed_norm.vmin < seed_norm.vmax <= 0.13


def test_small_grid_cells_carry_readable_values(dense_run):
    fig = module_heatmap(dense_run, "corr")
    image = image_of(fig)
    texts = cell_texts(fig)
    assert len(texts) == 4 * 7
    values = pivot(dense_run, "corr", "pair", SEED_MODULES)
    fmt = cell_format(values)
    for text in texts:
        j, i = text.get_position()
        value = values[int(i), int(j)]
        assert text.get_text() == fmt(value)
        cell = image.get_cmap()(image.norm(value))
        # dark text on light cells, white on dark ones
        assert (luminance(text.get_color()) > 0.5) == (luminance(cell) < 0.5)
    # these corr values spread over 0.0034 only: four decimals tell the cells apart
    assert {len(t.get_text().split(".")[1]) for t in texts} == {4}
    assert_nothing_clipped(fig)
    assert_no_text_overlaps(fig)


@pytest.mark.parametrize("metric, label", [
    ("corr", "Pearson correlation (corr) ↑"), ("cos", "cosine similarity (cos) ↑"), ("rel_l2", "relative L2 ↓"),
    ("cka", "linear CKA ↑"), ("changed_frac", "changed fraction ↓"), ("fro_norm", "Frobenius norm"),
    ("spectral_norm", "spectral norm σ₁"), ("stable_rank", "stable rank"), ("effective_rank", "effective rank"),
    ("alpha", "α (power-law exponent)"),
])
def test_every_metric_is_named_on_its_colour_bar(dense_run, metric, label):
    fig = module_heatmap(dense_run, metric)
    assert colourbar_label(fig) == label == METRICS[metric].axis
    model = "pair" if metric in PAIR else "a"
    np.testing.assert_array_equal(np.asarray(image_of(fig).get_array()), pivot(dense_run, metric, model, SEED_MODULES))
    assert ("A vs B" if model == "pair" else "model A") in fig.get_suptitle()
    # a distance is bright where the models are alike, as a similarity is
    cmap = image_of(fig).get_cmap().name
    assert cmap.endswith("_r") == (metric in ("rel_l2", "changed_frac"))


def test_model_b_and_its_values(dense_run):
    fig = module_heatmap(dense_run, "effective_rank", "b")
    np.testing.assert_array_equal(np.asarray(image_of(fig).get_array()), pivot(dense_run, "effective_rank", "b", SEED_MODULES))
    assert "model B" in fig.get_suptitle()
    # values in the hundreds keep one decimal
    assert all(t.get_text().count(".") == 1 for t in cell_texts(fig))


def test_defaults_without_pair_metrics():
    run = module_run(metrics=[(m, "a") for m in SINGLE], label="one model")
    fig = module_heatmap(run)
    assert colourbar_label(fig) == "stable rank" and "model A" in fig.get_suptitle()
    np.testing.assert_array_equal(np.asarray(image_of(fig).get_array()), pivot(run, "stable_rank", "a", SEED_MODULES))
    lines = module_lines(run)
    assert lines.axes[0].get_ylabel() == "stable rank"


def test_moe_heatmap_orders_hatches_and_explains(moe_run):
    fig = module_heatmap(moe_run)
    ax = heat_axes(fig)
    assert [t.get_text() for t in ax.get_xticklabels()] == list(MOE_MODULES)
    values = np.asarray(image_of(fig).get_array())
    expected = pivot(moe_run, "corr", "pair", MOE_MODULES)
    np.testing.assert_array_equal(values, expected)
    assert np.isnan(values[2, :4]).all() and np.isnan(values[0, 7:]).all() and np.isnan(values[4, 10])
    # hatched blocks cover exactly the cells of modules a layer lacks (not the undefined router)
    hatched = np.zeros_like(values, dtype=bool)
    for patch in (p for p in ax.patches if p.get_gid() == "absent"):
        assert isinstance(patch, Rectangle) and patch.get_hatch()
        x, y = patch.get_xy()
        hatched[int(round(y + 0.5)): int(round(y + 0.5 + patch.get_height())), int(round(x + 0.5))] = True
    absent = np.zeros_like(hatched)
    absent[2, :4] = True
    absent[0, 7:] = True
    np.testing.assert_array_equal(hatched, absent)
    assert legend_texts(fig) == ["module absent in this layer", "undefined (a zero matrix or delta)"]
    assert "mean over the routed experts" in ax.get_xlabel()
    assert "A vs B" in fig.get_suptitle()
    texts = [t.get_text() for t, _box in drawn_texts(fig)]
    assert "module absent in this layer" in texts and "router" in texts
    assert_nothing_clipped(fig)
    assert_no_text_overlaps(fig)


def test_pair_delta_title_and_a_diverging_scale_for_both_signs(moe_run):
    fig = module_heatmap(moe_run, model="pair_delta")
    assert "(A − base) vs (B − base)" in fig.get_suptitle()
    np.testing.assert_array_equal(np.asarray(image_of(fig).get_array()), pivot(moe_run, "corr", "pair_delta", MOE_MODULES))

    def signed(metric, model, layer, module):
        return (layer - 1.5) * 0.1 + 0.01 * SEED_MODULES.index(module)

    run = module_run(metrics=(("corr", "pair_delta"),), value=signed)
    image = image_of(module_heatmap(run))
    values = pivot(run, "corr", "pair_delta", SEED_MODULES)
    bound = max(-values.min(), values.max())
    assert image.get_cmap().name.startswith(DIVERGING_CMAP)
    assert (image.norm.vmin, image.norm.vmax) == (-bound, bound)


def test_one_value_everywhere_still_draws():
    run = module_run(metrics=(("corr", "pair"),), value=lambda *args: 1.0)
    fig = module_heatmap(run)
    norm = image_of(fig).norm
    assert norm.vmin < 1.0 < norm.vmax
    assert {t.get_text() for t in cell_texts(fig)} == {"1.00"}
    assert_nothing_clipped(fig)


def test_seed_like_36_layers_thin_their_labels_and_drop_annotations(seed_run):
    fig = module_heatmap(seed_run)
    ax = heat_axes(fig)
    np.testing.assert_array_equal(np.asarray(image_of(fig).get_array()), pivot(seed_run, "corr", "pair", SEED_MODULES))
    assert not cell_texts(fig), "36 layers: no numbers in the cells"
    ticks = [int(t) for t in ax.get_yticks()]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [str(t) for t in ticks], "row i is layer i"
    assert ticks[0] == 0 and ticks[-1] == 35 and 6 <= len(ticks) < 36
    assert [t.get_text() for t in ax.get_xticklabels()] == list(SEED_MODULES)
    assert not fig.legends, "nothing is missing: no note"
    assert_nothing_clipped(fig)
    assert_no_text_overlaps(fig)


@pytest.mark.parametrize("n_layers", [25, 48, 61, 94])
def test_many_layers_stay_readable(n_layers):
    run = module_run(range(n_layers), metrics=(("stable_rank", "a"),), label=f"{n_layers} layers")
    fig = module_heatmap(run)
    ax = heat_axes(fig)
    ticks = [int(t) for t in ax.get_yticks()]
    assert ticks[0] == 0 and ticks[-1] == n_layers - 1 and len(ticks) <= 40
    assert not cell_texts(fig)
    assert fig.get_figheight() <= 11
    assert_nothing_clipped(fig)
    assert_no_text_overlaps(fig)


def test_annotation_limits():
    wide = module_run(range(24), lambda layer: MOE_MODULES[:10], metrics=(("corr", "pair"),))
    assert len(cell_texts(module_heatmap(wide))) == 240
    wider = module_run(range(4), lambda layer: MOE_MODULES, metrics=(("corr", "pair"),))
    fig = module_heatmap(wider)
    assert not cell_texts(fig), "11 modules: no numbers in the cells"
    assert_nothing_clipped(fig)
    assert_no_text_overlaps(fig)


def test_mla_and_other_modules_follow_the_seed_order():
    mla = ("attn.q_a", "attn.q_b", "attn.kv_a", "attn.kv_b", "attn.o")
    run = module_run(range(3), lambda layer: ("shared1.up", *MLP, "router", *mla), metrics=(("cka", "pair"),),
                     value=lambda metric, model, layer, module: 0.5 + 0.01 * layer + 0.001 * len(module))
    ax = heat_axes(module_heatmap(run))
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "attn.o", "attn.q_a", "attn.q_b", "attn.kv_a", "attn.kv_b", *MLP, "router", "shared1.up"]


def test_a_metric_moelens_does_not_know_is_drawn_under_its_name():
    run = module_run(metrics=(("new_measure", "pair"),), value=lambda *args: 0.3 + 0.01 * args[2])
    fig = module_heatmap(run)
    assert colourbar_label(fig) == "new_measure"


def test_cell_format_and_layer_rows():
    assert cell_format(np.array([0.11, 0.13]))(0.1184) == "0.118"
    assert cell_format(np.array([0.2, 0.9]))(0.5) == "0.50"
    assert cell_format(np.array([12.0, 40.0]))(20.04) == "20.0"
    assert cell_format(np.array([-0.5, 0.5]))(-0.0001) == "0.00"
    assert cell_format(np.array([-0.5, 0.5]))(-0.25) == "−0.25"
    assert cell_format(np.array([1500.0, 2500.0]))(2048.4) == "2,048"
    assert layer_tick_rows(4, 0.3, 8) == [0, 1, 2, 3]
    rows = layer_tick_rows(36, 0.05, 8)
    assert rows[0] == 0 and rows[-1] == 35 and len(set(np.diff(rows[:-1]))) == 1
    assert (rows[-1] - rows[-2]) * 0.05 >= 1.6 * 8 / 72


# ---------------------------------------------------------------------------------------------
# lines against the layer


def test_lines_carry_the_table_values(dense_run):
    fig = module_lines(dense_run, "rel_l2")
    lines = lines_by_module(fig)
    assert list(lines) == list(SEED_MODULES)
    values = pivot(dense_run, "rel_l2", "pair", SEED_MODULES)
    for j, module in enumerate(SEED_MODULES):
        np.testing.assert_array_equal(lines[module].get_xdata(), [0.0, 1.0, 2.0, 3.0])
        np.testing.assert_array_equal(lines[module].get_ydata(), values[:, j])
        assert mcolors.same_color(lines[module].get_color(), MODULE_STYLES[module][0])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "Layer" and ax.get_ylabel() == "relative L2 ↓"
    low, high = ax.get_xlim()
    assert [t for t in ax.get_xticks() if low <= t <= high] == [0, 1, 2, 3]
    assert legend_texts(fig) == list(SEED_MODULES)
    [legend] = fig.legends
    assert isinstance(legend, Legend) and legend.get_title().get_text() == "Module"
    assert_nothing_clipped(fig)
    assert_no_text_overlaps(fig)


def test_module_colours_come_in_families():
    def hue(module):
        return mcolors.rgb_to_hsv(mcolors.to_rgb(module_style(module)[0]))[0]

    assert all(0.55 <= hue(m) <= 0.7 for m in ATTN), "attention: blues"
    assert all(0.0 <= hue(m) <= 0.12 for m in MLP), "MLP: oranges to browns"
    assert all(0.35 <= hue(m) <= 0.5 for m in SHARED), "shared expert: greens"
    families = [ATTN, MLP, SHARED, ("router",)]
    colours = [module_style(m)[0] for family in families for m in family]
    assert len(set(colours)) == len(colours)
    assert module_style("shared1.up")[0] == module_style("shared.up")[0] and module_style("shared1.up")[2] == ":"
    assert module_style("odd.module") == module_style("odd.module")


def test_moe_lines_break_where_a_module_is_absent(moe_run):
    fig = module_lines(moe_run)
    lines = lines_by_module(fig)
    assert list(lines) == list(MOE_MODULES)
    values = pivot(moe_run, "corr", "pair", MOE_MODULES)
    for j, module in enumerate(MOE_MODULES):
        np.testing.assert_array_equal(lines[module].get_xdata(), np.arange(6.0))
        np.testing.assert_array_equal(lines[module].get_ydata(), values[:, j])
    assert np.isnan(lines["attn.q"].get_ydata()[2]) and np.isnan(lines["router"].get_ydata()[0])
    assert lines["attn.q"].get_markevery() == 1, "a value between gaps shows as a marker"
    assert legend_texts(fig) == list(MOE_MODULES)
    assert "absent" in fig.axes[0].get_title(loc="left")
    assert_nothing_clipped(fig)
    assert_no_text_overlaps(fig)


def test_seed_like_lines(seed_run, tmp_path):
    fig = module_lines(seed_run)
    ax = fig.axes[0]
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert 4 <= len(ticks) <= 11 and all(float(t).is_integer() for t in ticks)
    assert ax.get_ylabel() == "Pearson correlation (corr) ↑"
    values = pivot(seed_run, "corr", "pair", SEED_MODULES)
    for j, module in enumerate(SEED_MODULES):
        np.testing.assert_array_equal(lines_by_module(fig)[module].get_ydata(), values[:, j])
    assert_nothing_clipped(fig)
    assert figures.save(fig, tmp_path / "lines.png", dpi=80).read_bytes().startswith(b"\x89PNG")
    assert figures.save(module_heatmap(seed_run), tmp_path / "heat.png", dpi=80).read_bytes().startswith(b"\x89PNG")


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("draw", [module_heatmap, module_lines])
def test_errors(dense_run, moe_run, draw):
    name = draw.__name__
    with pytest.raises(ConfigError, match=f"{name} draws a moelens run; got a DataFrame"):
        draw(dense_run["module_metrics"])
    with pytest.raises(ConfigError, match=f"'align' is a router_alignment run; {name} draws module_metrics runs"):
        draw(Run(manifest={"analysis": "router_alignment", "label": "align"}, tables={}))
    with pytest.raises(ConfigError, match="has no module_metrics table .it has none."):
        draw(Run(manifest={"analysis": "module_metrics", "label": "empty"}, tables={}))
    with pytest.raises(ConfigError, match="empty module_metrics table"):
        draw(Run(manifest={"analysis": "module_metrics", "label": "empty"},
                 tables={"module_metrics": dense_run["module_metrics"].iloc[:0]}))
    with pytest.raises(ConfigError, match="no metric .nor does moelens know. 'bogus'; it has corr, cos, rel_l2, cka, changed_frac, "
                                          "fro_norm, spectral_norm, stable_rank, effective_rank, alpha"):
        draw(dense_run, "bogus")
    with pytest.raises(ConfigError, match="'tiny MoE base vs tuned' has no metric 'cka'; it has corr, stable_rank"):
        draw(moe_run, "cka")
    with pytest.raises(ConfigError, match="unknown model 'c'; choose one of pair, pair_delta, a, b"):
        draw(dense_run, "corr", "c")
    with pytest.raises(ConfigError, match="no corr rows for model 'pair_delta'.*needs both model B and a base.*it has pair"):
        draw(dense_run, "corr", "pair_delta")
    with pytest.raises(ConfigError, match="no corr rows for model 'a' .corr is a pair metric"):
        draw(dense_run, "corr", "a")
    with pytest.raises(ConfigError, match="no stable_rank rows for model 'pair' .stable_rank is a single metric"):
        draw(moe_run, "stable_rank", "pair")
    doubled = pd.concat([dense_run["module_metrics"]] * 2)
    with pytest.raises(ConfigError, match="several corr rows for layer"):
        draw(Run(manifest=dense_run.manifest, tables={"module_metrics": doubled}))


def test_errors_are_one_line(dense_run):
    for call in (lambda: module_heatmap(dense_run, "bogus"), lambda: module_lines(dense_run, "corr", "a")):
        with pytest.raises(ConfigError) as caught:
            call()
        assert "\n" not in str(caught.value)


def test_a_single_layer_run():
    run = module_run([7], metrics=(("corr", "pair"),), label="one layer")
    heat = module_heatmap(run)
    assert [t.get_text() for t in heat_axes(heat).get_yticklabels()] == ["7"]
    np.testing.assert_array_equal(np.asarray(image_of(heat).get_array()), pivot(run, "corr", "pair", SEED_MODULES))
    lines = module_lines(run)
    low, high = lines.axes[0].get_xlim()
    assert [t for t in lines.axes[0].get_xticks() if low <= t <= high] == [7]
    assert all(line.get_marker() not in (None, "None", "") for line in lines_by_module(lines).values())
    for fig in (heat, lines):
        assert_nothing_clipped(fig)
