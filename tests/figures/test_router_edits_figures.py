"""Router-edits figures (docs/methods.md §8): drawn from a real run of a tiny model, their values are
the table's means, every axis is labelled, nothing is clipped, and the report section builds."""

from __future__ import annotations

import numpy as np
import pytest

import moelens as ml
from moelens.errors import ConfigError
from moelens.figures import catalog
from tests.analyses import interventions_fixtures as fx

from .layout_checks import assert_nothing_clipped

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("route-figures")
    tok = fx.tokenizer()
    model = fx.save_model(fx.mixtral_config(tok), tok, root / "mixtral")
    prompts = fx.write_prompts(root / "prompts.jsonl")
    return ml.router_edits(model, prompts, layers=[0, 2], k=[1, 4, 16], samples=3, out=root / "run", device="cpu")


@pytest.mark.parametrize("name", ["route_routed_share", "route_jsd_heatmap", "route_migration"])
def test_figures_are_labelled_and_unclipped(run, name) -> None:
    fig = catalog.draw(name, [run])
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            assert ax.get_ylabel(), (name, "colour bar")
        else:
            assert ax.get_xlabel() and ax.get_ylabel(), (name, ax)
    assert_nothing_clipped(fig)


def test_routed_share_lines_are_the_table_means(run) -> None:
    fig = catalog.draw("route_routed_share", [run])
    ax = fig.axes[0]
    t = run["router_edits"]
    po = t[(t["edit"] == "project_out") & (t["layer"] == 0)].groupby("k")["routed_after"].mean()
    first = ax.get_lines()[0]
    np.testing.assert_allclose(first.get_ydata(), po.to_numpy())
    np.testing.assert_array_equal(first.get_xdata(), po.index.to_numpy())


def test_jsd_heatmap_is_the_table_means(run) -> None:
    fig = catalog.draw("route_jsd_heatmap", [run])
    image = fig.axes[0].get_images()[0].get_array()
    t = run["router_edits"]
    grid = t[t["edit"] == "project_out"].pivot_table(index="layer", columns="k", values="jsd", aggfunc="mean")
    np.testing.assert_allclose(np.asarray(image), grid.to_numpy())


def test_wrong_run_and_layer_are_one_line(run) -> None:
    with pytest.raises(ConfigError, match="no transplant rows at layer 1"):
        catalog.draw("route_migration", [run], layers=1)


def test_report_section(run, tmp_path) -> None:
    from moelens.report.sections import section_builder

    section = section_builder("router_edits")([run], "png")
    assert "as a multiple of a random part of equal norm" in section.summary
    assert section.html.count("<img") == 3
