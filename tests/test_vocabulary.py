"""Names are declared once, at the bottom (:mod:`moelens.choices`, the figure catalog), and every
place that shows them labels exactly those names: no label for a name that does not exist, no
name shown without its label, and every figure explained in the report under its catalog title."""

from __future__ import annotations

import importlib.util
import re
from importlib.resources import files

from moelens import choices
from moelens.figures.catalog import FIGURES


def test_every_intervention_site_and_token_kind_has_its_label():
    from moelens.figures.trace import SITE_LABELS, TOKEN_KIND_LABELS
    from moelens.report.trace_report import ABLATION_NAMES, HEADLINE_MODES, MODE_NAMES, SITE_ACTIONS

    every_site = {site for sites in choices.SITES.values() for site in sites}
    assert set(choices.SITES) == set(choices.MODES) == set(MODE_NAMES) == set(HEADLINE_MODES)
    assert set(SITE_LABELS) == set(SITE_ACTIONS) == every_site
    assert set(choices.DEFAULT_SITES["knockout"]) <= set(choices.KNOCKOUT_SITES)
    assert tuple(TOKEN_KIND_LABELS) == choices.TOKEN_KINDS
    assert set(ABLATION_NAMES) == set(choices.ABLATIONS)


def test_every_figure_has_a_title_and_an_explanation_under_it():
    """The report's explanations hold one ``explain-NAME`` part per figure of the catalog, headed
    by the figure's catalog title: in one template with one macro per analysis whose section lives
    under moelens.report, or in the section of an analysis that carries its own (its ``surface``)."""
    from moelens.report.sections import SECTION_BUILDERS

    text = (files("moelens.report") / "templates" / "explanations.html").read_text(encoding="utf-8")
    own = {name: target.split(":")[0] for name, target in SECTION_BUILDERS.items() if not target.startswith("moelens.report.")}
    carried = "".join(importlib.util.find_spec(module).loader.get_source(module) for module in own.values())
    # one macro heads each explanation with the figure's anchor and catalog title
    assert '<section id="explain-{{ figure }}">\n<h3>{{ explain_title(figure) }}</h3>' in text
    pattern = r'\{% call explained\("(\w+)"\) %\}'
    explained = re.findall(pattern, text) + re.findall(pattern, carried)
    assert sorted(explained) == sorted(FIGURES)
    assert all(entry.title and entry.analysis in SECTION_BUILDERS for entry in FIGURES.values())
    assert set(re.findall(r"\{% macro (\w+)\(", text)) - {"explained", "frame"} == set(SECTION_BUILDERS) - set(own)


def test_the_defaults_shared_by_many_layers_are_the_bottom_ones():
    import inspect

    from moelens.metrics.expert_distance import role_distances

    defaults = inspect.signature(role_distances).parameters
    assert defaults["gamma"].default == choices.DEFAULT_GAMMA
    assert defaults["device"].default == choices.DEFAULT_DEVICE
