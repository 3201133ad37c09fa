"""Expert-distance figures: the lines against the layer (REAP Fig. 4d) and the experts × experts
heat map draw the run's numbers, name what they show, refuse what they cannot draw, and keep
every text on the canvas."""

from __future__ import annotations

from typing import Optional, Sequence

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.text import Text

from moelens import figures
from moelens.analyses.expert_distance.tables import PAIR_SCHEMA, layer_summary
from moelens.errors import ConfigError
from moelens.figures.distance import (
    MEASURES,
    PAIRING_COLOURS,
    Y_LABEL,
    default_heatmap_layers,
    expert_distance,
    expert_distance_heatmap,
    pairing_colour,
)
from moelens.figures.style import style_context
from moelens.results import Run

#: The seed's four pairings (REAP Fig. 4d) as (sv_align, rel_l2) centres.
SEED_PAIRINGS = {"base-tuned": (1.0, 0.07), "hc-smoe": (0.0, 1.40), "m-smoe": (0.0, 1.41), "m-smoe-permuted": (0.02, 1.38)}


def synthetic_distance_run(pairings: Optional[dict[str, tuple[float, float]]] = None, layers: Sequence[int] = range(40),
                           n_experts: int = 8, label: str = "synthetic", seed: int = 0,
                           matrices: Sequence[str] = ("gate", "up", "down", "expert")) -> Run:
    """An expert_distance run with known pair values around each pairing's centres; its layer
    table comes from the analysis's own ``layer_summary``."""
    pairings = SEED_PAIRINGS if pairings is None else pairings
    rng = np.random.default_rng(seed)
    frames = []
    for pairing, (sv_centre, l2_centre) in pairings.items():
        if pairing == "base-tuned":
            a = b = np.arange(n_experts)
        else:
            a, b = np.triu_indices(n_experts, 1)
        for layer in layers:
            drift = 0.002 * layer if pairing == "base-tuned" else 0.0
            for matrix in matrices:
                n = len(a)
                frames.append(pd.DataFrame({
                    "layer": layer, "pairing": pairing, "expert_a": a, "expert_b": b, "matrix": matrix,
                    "rel_l2": np.clip(l2_centre + drift + rng.normal(0, 0.03, n), 0, 2),
                    "sv_align": np.clip(sv_centre - drift + rng.normal(0, 0.03, n), -1, 1),
                    "n_sv": 10,
                }))
    pairs = pd.concat(frames, ignore_index=True)[list(PAIR_SCHEMA.column_names)]
    manifest = {"analysis": "expert_distance", "label": label}
    return Run(manifest=manifest, tables={"expert_distance": pairs, "expert_distance_layers": layer_summary(pairs)})


@pytest.fixture(scope="module")
def seed_run() -> Run:
    """40 layers and the seed's four pairings in one run."""
    return synthetic_distance_run(label="Qwen3 (synthetic)")


@pytest.fixture(scope="module")
def within_run() -> Run:
    return synthetic_distance_run({"within": (0.1, 1.3)}, layers=range(12), n_experts=6, label="within (synthetic)", seed=3)


@pytest.fixture(scope="module")
def tiny_runs(tiny_checkpoint, tmp_path_factory) -> tuple[Run, Run]:
    """A base-tuned run (tiny Mixtral seed 0 → seed 1) and a within run (seed 0), on the CPU."""
    import moelens
    from moelens.testing.tiny import TinySpec, build_tiny_checkpoint

    base = tiny_checkpoint("mixtral")
    tuned = build_tiny_checkpoint(TinySpec("mixtral"), tmp_path_factory.mktemp("tiny-seed1") / "mixtral-seed1", seed=1)
    return (moelens.expert_distance(base, tuned, device="cpu"), moelens.expert_distance(base, device="cpu"))


# ---------------------------------------------------------------------------------------------
# helpers


def line(fig: Figure, run_index: int, pairing: str, measure: str) -> Line2D:
    [found] = [a for a in fig.axes[0].get_lines() if a.get_gid() == f"{run_index}:{pairing}:{measure}"]
    return found


def band(fig: Figure, run_index: int, pairing: str, measure: str):
    gid = f"{run_index}:{pairing}:{measure}:band"
    [found] = [c for c in fig.axes[0].findobj(lambda a: a.get_gid() == gid)]
    return found


def layer_stats(run: Run, pairing: str, measure: str, matrix: str = "expert") -> pd.DataFrame:
    t = run["expert_distance_layers"]
    return t[(t["pairing"] == pairing) & (t["measure"] == measure) & (t["matrix"] == matrix)].sort_values("layer")


def layer_ticks(fig: Figure) -> list[float]:
    """The x ticks in view (a locator may return one beyond each end)."""
    ax = fig.axes[0]
    low, high = ax.get_xlim()
    return [float(t) for t in ax.get_xticks() if low <= t <= high]


def legends(fig: Figure) -> dict[str, Legend]:
    found = {leg.get_title().get_text(): leg for leg in fig.axes[0].findobj(Legend)}
    return found


def drawn_texts(fig: Figure) -> tuple[list[Text], object]:
    """Every Text the Agg renderer draws (tick labels out of view are not drawn, so they are not
    counted), drawn in the house style as :func:`moelens.figures.save` does."""
    with style_context():
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        renderer = canvas.get_renderer()
        drawn: list[Text] = []
        original = renderer.draw_text

        def record(gc, x, y, s, prop, angle, ismath=False, mtext=None):
            if mtext is not None:
                drawn.append(mtext)
            return original(gc, x, y, s, prop, angle, ismath=ismath, mtext=mtext)

        renderer.draw_text = record
        try:
            fig.draw(renderer)
        finally:
            del renderer.draw_text
    return drawn, renderer


def assert_nothing_clipped(fig: Figure) -> list[str]:
    texts, renderer = drawn_texts(fig)
    width, height = fig.bbox.width, fig.bbox.height
    assert texts, "nothing was drawn"
    for text in texts:
        box = text.get_window_extent(renderer)
        assert box.x0 >= -1 and box.y0 >= -1 and box.x1 <= width + 1 and box.y1 <= height + 1, (
            f"{text.get_text()!r} at {box.bounds} runs off the {width:.0f}×{height:.0f} canvas")
    return [t.get_text() for t in texts]


def same_colour(a, b) -> bool:
    return np.allclose(mcolors.to_rgba(a)[:3], mcolors.to_rgba(b)[:3])


# ---------------------------------------------------------------------------------------------
# lines against the layer


def test_lines_are_the_layer_means(seed_run):
    fig = expert_distance([seed_run])
    assert isinstance(fig, Figure) and fig.get_layout_engine() is not None
    for pairing in SEED_PAIRINGS:
        for measure, style in (("sv_align", "-"), ("rel_l2", "--")):
            stats = layer_stats(seed_run, pairing, measure)
            drawn = line(fig, 0, pairing, measure)
            np.testing.assert_array_equal(drawn.get_xdata(), stats["layer"].to_numpy(float))
            np.testing.assert_allclose(drawn.get_ydata(), stats["mean"].to_numpy())
            assert drawn.get_linestyle() == style
            assert same_colour(drawn.get_color(), PAIRING_COLOURS[pairing])


def test_bands_run_from_q25_to_q75(seed_run):
    fig = expert_distance([seed_run], matrix="gate")
    for pairing in SEED_PAIRINGS:
        for measure in ("sv_align", "rel_l2"):
            stats = layer_stats(seed_run, pairing, measure, matrix="gate")
            collection = band(fig, 0, pairing, measure)
            assert isinstance(collection, PolyCollection)
            vertices = np.concatenate([p.vertices for p in collection.get_paths()])
            for layer, q25, q75 in stats[["layer", "q25", "q75"]].itertuples(index=False):
                at = vertices[np.isclose(vertices[:, 0], layer)][:, 1]
                assert np.isclose(at, q25).any() and np.isclose(at, q75).any(), f"{pairing} {measure} layer {layer}"
            assert vertices[:, 1].min() >= stats["q25"].min() - 1e-12 and vertices[:, 1].max() <= stats["q75"].max() + 1e-12
            assert same_colour(collection.get_facecolor()[0], PAIRING_COLOURS[pairing])


def test_axes_and_legends_name_what_they_show(seed_run):
    fig = expert_distance([seed_run])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "Layer"
    assert ax.get_ylabel() == Y_LABEL == "SV Align. ↑ / L2 Distance ↓"
    groups = legends(fig)
    assert set(groups) == {"Dist. Type", "Expert clusters"}
    dist = groups["Dist. Type"]
    assert [t.get_text() for t in dist.get_texts()] == ["Singular-vector alignment", "L2 distance"]
    assert [h.get_linestyle() for h in dist.legend_handles] == ["-", "--"]
    assert all(same_colour(h.get_color(), "black") for h in dist.legend_handles)
    clusters = groups["Expert clusters"]
    assert [t.get_text() for t in clusters.get_texts()] == ["Base to IFT", "HC-SMoE", "M-SMoE", "M-SMoE – permuted"]
    for handle, pairing in zip(clusters.legend_handles, SEED_PAIRINGS):
        assert isinstance(handle, Patch) and same_colour(handle.get_facecolor(), PAIRING_COLOURS[pairing])
    # y from 0 (or just below the lowest quartile: sv_align of unrelated experts is ±small)
    # to at least 1.05 (rel_l2 of unrelated experts is about √2).
    stats = seed_run["expert_distance_layers"].query("matrix == 'expert'")
    low, high = ax.get_ylim()
    assert low == pytest.approx(min(0.0, stats["q25"].min() - 0.05))
    assert high == pytest.approx(max(1.05, stats["q75"].max() + 0.05))
    positive = synthetic_distance_run({"base-tuned": (0.9, 0.3)}, layers=range(3))
    assert expert_distance(positive).axes[0].get_ylim() == (0.0, 1.05)
    ticks = layer_ticks(fig)
    assert len(ticks) >= 4 and all(t.is_integer() for t in ticks)
    assert_nothing_clipped(fig)


def test_y_axis_reaches_above_one_and_below_zero_when_the_data_do():
    run = synthetic_distance_run({"within": (-0.2, 1.9)}, layers=range(3))
    fig = expert_distance(run)
    low, high = fig.axes[0].get_ylim()
    stats = run["expert_distance_layers"].query("matrix == 'expert'")
    assert high > 1.05 and high > stats["q75"].max()
    assert low < stats.loc[stats["measure"] == "sv_align", "q25"].min()


def test_tiny_base_tuned_and_within_on_one_axis(tiny_runs):
    base_tuned, within = tiny_runs
    assert base_tuned.manifest["analysis"] == "expert_distance"
    fig = expert_distance([base_tuned, within])
    for index, (run, pairing) in enumerate(((base_tuned, "base-tuned"), (within, "within"))):
        for measure in ("sv_align", "rel_l2"):
            stats = layer_stats(run, pairing, measure)
            drawn = line(fig, index, pairing, measure)
            np.testing.assert_array_equal(drawn.get_xdata(), [0.0, 1.0])
            np.testing.assert_allclose(drawn.get_ydata(), stats["mean"].to_numpy())
    clusters = legends(fig)["Expert clusters"]
    assert [t.get_text() for t in clusters.get_texts()] == ["Base to IFT", "Within layer"]
    low, high = fig.axes[0].get_ylim()
    values = pd.concat([r["expert_distance_layers"].query("matrix == 'expert'") for r in tiny_runs])
    assert low <= min(0.0, values["q25"].min()) and high >= max(1.05, values["q75"].max())
    assert layer_ticks(fig) == [0.0, 1.0]
    assert_nothing_clipped(fig)


def test_runs_that_share_a_pairing_are_told_apart():
    first = synthetic_distance_run({"base-tuned": (0.9, 0.2)}, label="Mixtral base → instruct", seed=1)
    second = synthetic_distance_run({"base-tuned": (0.8, 0.3)}, label="Mixtral base → a much longer fine-tune name", seed=2)
    fig = expert_distance([first, second])
    texts = [t.get_text().replace("\n", " ") for t in legends(fig)["Expert clusters"].get_texts()]
    assert texts == ["Base to IFT (Mixtral base → instruct)", "Base to IFT (Mixtral base → a much longer fine-tune name)"]
    markers = [line(fig, i, "base-tuned", "sv_align").get_marker() for i in (0, 1)]
    assert markers[0] != markers[1] and "None" not in markers
    assert all(same_colour(line(fig, i, "base-tuned", "rel_l2").get_color(), PAIRING_COLOURS["base-tuned"]) for i in (0, 1))
    assert_nothing_clipped(fig)
    third = synthetic_distance_run({"within": (0.1, 1.3), "base-tuned": (0.7, 0.4)}, label="third", seed=3)
    texts = [t.get_text().split(" (")[0] for t in legends(expert_distance([first, third, second])).get("Expert clusters").get_texts()]
    assert texts == ["Base to IFT"] * 3 + ["Within layer"], "the runs of one pairing stand together"


def test_a_pairing_keeps_its_colour_whatever_the_order():
    a = synthetic_distance_run({"within": (0.1, 1.3), "hc-smoe": (0.0, 1.4)}, layers=range(4))
    b = synthetic_distance_run({"my-clustering": (0.3, 1.0), "within": (0.1, 1.3)}, layers=range(4))
    fig_a, fig_b = expert_distance(a), expert_distance(b)
    assert same_colour(line(fig_a, 0, "within", "sv_align").get_color(), line(fig_b, 0, "within", "sv_align").get_color())
    assert same_colour(line(fig_b, 0, "my-clustering", "rel_l2").get_color(), pairing_colour("my-clustering"))
    assert pairing_colour("my-clustering") not in PAIRING_COLOURS.values()
    assert "my-clustering" in [t.get_text() for t in legends(fig_b)["Expert clusters"].get_texts()]


def test_a_single_layer_run_draws_markers():
    run = synthetic_distance_run({"within": (0.1, 1.3)}, layers=[5])
    fig = expert_distance(run)
    for measure in ("sv_align", "rel_l2"):
        drawn = line(fig, 0, "within", measure)
        assert drawn.get_marker() not in (None, "None", "", " ")
        np.testing.assert_array_equal(drawn.get_xdata(), [5.0])
    assert layer_ticks(fig) == [5.0]
    bars = fig.axes[0].findobj(lambda a: a.get_gid() == "0:within:sv_align:band")
    assert len(bars) == 1, "the quartiles of a single layer are an error bar"
    assert_nothing_clipped(fig)


def test_save_png(tmp_path, seed_run):
    path = figures.save(expert_distance([seed_run]), tmp_path / "distance.png", dpi=80)
    assert path.read_bytes().startswith(b"\x89PNG")


def test_line_figure_errors(seed_run):
    alignment = Run(manifest={"analysis": "router_alignment", "label": "align"}, tables={})
    with pytest.raises(ConfigError, match=r"'align' is a router_alignment run; expert_distance draws expert_distance runs"):
        expert_distance([seed_run, alignment])
    with pytest.raises(ConfigError, match="no runs"):
        expert_distance([])
    with pytest.raises(ConfigError, match="got a DataFrame"):
        expert_distance([seed_run["expert_distance"]])
    with pytest.raises(ConfigError, match="unknown matrix 'mlp'"):
        expert_distance([seed_run], matrix="mlp")
    gate_only = synthetic_distance_run({"within": (0.1, 1.3)}, layers=range(2), matrices=("gate",), label="gate only")
    with pytest.raises(ConfigError, match="no run has rows for matrix 'up' .they have gate."):
        expert_distance([gate_only], matrix="up")
    with pytest.raises(ConfigError, match="'gate only' have no rows for matrix 'expert'"):
        expert_distance([seed_run, gate_only])
    no_table = Run(manifest={"analysis": "expert_distance", "label": "empty"}, tables={})
    with pytest.raises(ConfigError, match="no expert_distance_layers table"):
        expert_distance(no_table)


# ---------------------------------------------------------------------------------------------
# experts × experts heat map


def test_heatmap_holds_the_table_values(within_run):
    fig = expert_distance_heatmap(within_run, layers=[0, 11], measure="sv_align", matrix="up")
    images = [ax.get_images()[0] for ax in fig.axes if ax.get_images()]
    assert len(images) == 2
    pairs = within_run["expert_distance"].query("matrix == 'up' and pairing == 'within'")
    for image, layer in zip(images, (0, 11)):
        values = np.asarray(image.get_array())
        assert values.shape == (6, 6)
        for a, b, v in pairs[pairs["layer"] == layer][["expert_a", "expert_b", "sv_align"]].itertuples(index=False):
            assert values[a, b] == v and values[b, a] == v
        np.testing.assert_array_equal(np.diag(values), 1.0)
    titles = [ax.get_title() for ax in fig.axes if ax.get_images()]
    assert titles == ["Layer 0", "Layer 11"]
    norm = images[0].norm
    off = pairs[pairs["layer"].isin([0, 11])]["sv_align"]
    assert norm.vmax == 1.0
    assert norm.vmin == (0.0 if off.min() >= 0 else -off.abs().max())
    assert all(image.norm is norm or (image.norm.vmin, image.norm.vmax) == (norm.vmin, norm.vmax) for image in images)
    colourbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colourbars) == 1 and colourbars[0].get_ylabel() == "SV Align. ↑"
    texts = assert_nothing_clipped(fig)
    assert "SV Align. ↑" in texts and "Expert j" in texts and "Expert i" in texts


def test_heatmap_of_rel_l2(within_run):
    fig = expert_distance_heatmap(within_run, layers=[4], measure="rel_l2")
    values = np.asarray(fig.axes[0].get_images()[0].get_array())
    np.testing.assert_array_equal(np.diag(values), 0.0)
    pairs = within_run["expert_distance"].query("matrix == 'expert' and layer == 4")
    assert values[2, 5] == values[5, 2] == pairs.query("expert_a == 2 and expert_b == 5")["rel_l2"].item()
    norm = fig.axes[0].get_images()[0].norm
    assert (norm.vmin, norm.vmax) == (0.0, pairs["rel_l2"].max())
    assert [ax for ax in fig.axes if ax.get_label() == "<colorbar>"][0].get_ylabel() == "L2 Distance ↓"
    assert_nothing_clipped(fig)


def test_heatmap_default_layers():
    assert default_heatmap_layers(range(40)) == [0, 13, 26, 39]
    assert default_heatmap_layers([3, 1, 2]) == [1, 2, 3]
    assert default_heatmap_layers(range(5)) == [0, 1, 3, 4]
    run = synthetic_distance_run({"within": (0.1, 1.3)}, layers=range(0, 48, 2), n_experts=4, matrices=("expert",))
    fig = expert_distance_heatmap(run)
    assert [ax.get_title() for ax in fig.axes if ax.get_images()] == ["Layer 0", "Layer 16", "Layer 30", "Layer 46"]


def test_heatmap_of_128_experts_thins_its_ticks():
    run = synthetic_distance_run({"within": (0.05, 1.35)}, layers=range(6), n_experts=128, matrices=("expert",), label="E = 128")
    fig = expert_distance_heatmap(run)
    assert_nothing_clipped(fig)
    for ax in (ax for ax in fig.axes if ax.get_images()):
        assert not ax.texts, "no cell annotations at E = 128"
        ticks = list(ax.get_xticks())
        assert 2 <= len(ticks) <= 8 and ticks[0] == 0
        assert len(set(np.diff(ticks))) == 1, "a regular step"


def test_heatmap_of_the_tiny_within_run(tiny_runs, tmp_path):
    _base_tuned, within = tiny_runs
    fig = expert_distance_heatmap(within)
    images = [ax.get_images()[0] for ax in fig.axes if ax.get_images()]
    assert len(images) == 2  # both layers of the tiny model
    pairs = within["expert_distance"].query("matrix == 'expert'")
    for image, layer in zip(images, (0, 1)):
        values = np.asarray(image.get_array())
        for a, b, v in pairs[pairs["layer"] == layer][["expert_a", "expert_b", "sv_align"]].itertuples(index=False):
            assert values[a, b] == v and values[b, a] == v
    texts = assert_nothing_clipped(fig)
    value = pairs.query("layer == 0 and expert_a == 0 and expert_b == 1")["sv_align"].item()
    assert f"{value:.2f}".replace("-0.00", "0.00").replace("-", "−") in texts
    assert figures.save(fig, tmp_path / "heat.png", dpi=80).read_bytes().startswith(b"\x89PNG")


def test_heatmap_errors(within_run, tiny_runs, seed_run):
    base_tuned, _within = tiny_runs
    with pytest.raises(ConfigError, match="has no within pairing .it has base-tuned.*--pairing within"):
        expert_distance_heatmap(base_tuned)
    with pytest.raises(ConfigError, match="has no within pairing"):
        expert_distance_heatmap(seed_run)
    with pytest.raises(ConfigError, match="unknown measure 'cka'"):
        expert_distance_heatmap(within_run, measure="cka")
    with pytest.raises(ConfigError, match="unknown matrix 'attn'"):
        expert_distance_heatmap(within_run, matrix="attn")
    with pytest.raises(ConfigError, match="layer 40 is not in run 'within .synthetic.'; .* layers 0-11"):
        expert_distance_heatmap(within_run, layers=[1, 40])
    with pytest.raises(ConfigError, match="at most 4"):
        expert_distance_heatmap(within_run, layers=range(5))
    with pytest.raises(ConfigError, match="empty"):
        expert_distance_heatmap(within_run, layers=[])
    with pytest.raises(ConfigError, match="twice"):
        expert_distance_heatmap(within_run, layers=[2, 2])
    with pytest.raises(ConfigError, match="router_alignment run"):
        expert_distance_heatmap(Run(manifest={"analysis": "router_alignment"}, tables={}))


def test_a_pair_without_a_value_is_left_blank():
    run = synthetic_distance_run({"within": (0.1, 1.3)}, layers=[0], n_experts=4, matrices=("expert",))
    pairs = run["expert_distance"].copy()
    pairs.loc[(pairs["expert_a"] == 1) & (pairs["expert_b"] == 3), "sv_align"] = np.nan
    run = Run(manifest=run.manifest, tables={"expert_distance": pairs, "expert_distance_layers": layer_summary(pairs)})
    values = np.asarray(expert_distance_heatmap(run).axes[0].get_images()[0].get_array())
    assert np.isnan(values[1, 3]) and np.isnan(values[3, 1])
    assert np.isfinite(expert_distance(run).axes[0].get_lines()[0].get_ydata()).all()


def test_lines_on_top_of_each_other_get_markers_of_their_own_and_a_legend_note():
    run = synthetic_distance_run({"base-tuned": (1.0, 0.07), "m-smoe": (0.0, 1.41)}, layers=range(24))
    pairs = run["expert_distance"]
    twin = pairs[pairs["pairing"] == "m-smoe"].assign(pairing="hc-smoe")  # HC-SMoE found the very clusters of M-SMoE
    pairs = pd.concat([pairs, twin], ignore_index=True)
    run = Run(manifest=run.manifest, tables={"expert_distance": pairs, "expert_distance_layers": layer_summary(pairs)})
    fig = figures.expert_distance([run])
    labels = [t.get_text().replace("\n", " ") for t in legends(fig)["Expert clusters"].get_texts()]
    assert "HC-SMoE (= M-SMoE)" in labels and "M-SMoE" in labels and "Base to IFT" in labels
    for measure in MEASURES:
        first, second = line(fig, 0, "m-smoe", measure), line(fig, 0, "hc-smoe", measure)
        np.testing.assert_allclose(first.get_ydata(), second.get_ydata())  # the data are not moved
        assert first.get_marker() not in (None, "None", "") and second.get_marker() not in (None, "None", "")
        assert first.get_marker() != second.get_marker()
        assert first.get_markevery() != second.get_markevery()  # markers staggered along the line
        assert line(fig, 0, "base-tuned", measure).get_marker() in (None, "None", "")  # a lone line stays plain
    # lines merely close (the seed's 1.40 and 1.41) are not declared equal
    fig = figures.expert_distance([synthetic_distance_run(layers=range(12))])
    labels = [t.get_text() for t in legends(fig)["Expert clusters"].get_texts()]
    assert not any("=" in text for text in labels)
