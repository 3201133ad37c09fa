"""A report of several analyses: one section per analysis, one table of contents, every figure
and table of the expert-distance section backed by its run's tables, and a real browser."""

from __future__ import annotations

import re

import numpy as np
import pytest

import moelens as ml
from moelens.errors import ConfigError
from moelens.testing.tiny import TinySpec, build_tiny_checkpoint

from .html_outline import outline
from .test_browser import find_browser


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    base = tiny_checkpoint("mixtral")
    other = build_tiny_checkpoint(TinySpec("mixtral", "per_expert", "float32", False), root / "other", seed=1)
    return {
        "base-tuned": ml.expert_distance(base, other, out=root / "bt"),
        "within": ml.expert_distance(base, out=root / "within"),
        "alignment": ml.router_alignment(base, k=[1, 4, 32], out=root / "align", cache=False),
    }


@pytest.fixture(scope="module")
def mixed_html(runs):
    return ml.build_report([runs["base-tuned"], runs["within"], runs["alignment"]], title="Mixed")


def test_one_section_per_analysis_in_order_of_first_appearance(mixed_html):
    doc = outline(mixed_html)
    parts = [m.group(1) for m in re.finditer(r'<section id="([^"]+)" class="part"', mixed_html)]
    assert parts == ["expert-distance", "router-alignment"]
    for anchor in ("expert-distance", "router-alignment", "distance-explanations", "distance-comparison",
                   "distance-run-1", "distance-run-2", "plot-explanations", "comparison", "run-1"):
        assert anchor in doc.sections, anchor
        assert f'href="#{anchor}"' in mixed_html, f"the table of contents lacks {anchor}"
    ids = re.findall(r'\bid="([^"]+)"', mixed_html)
    assert len(ids) == len(set(ids)), "an id appears twice"


def test_distance_figures_and_numbers_come_from_the_runs(mixed_html, runs):
    doc = outline(mixed_html)
    section = doc.sections["expert-distance"]
    # one line figure per matrix (expert, gate, up, down) and two heat maps for the within run only
    assert section.figures.count("expert_distance") == 4
    assert section.figures.count("expert_distance_heatmap") == 2
    assert doc.sections["distance-run-1"].figures == []
    summary = doc.sections["distance-run-2"].tables[1]  # setup, then summary
    assert summary[0][:3] == ["matrix", "pairs per layer", "rel_l2 ↓ (mean)"]
    layers = runs["within"]["expert_distance_layers"]
    expected = layers[(layers.matrix == "expert") & (layers.measure == "sv_align")]["mean"].mean()
    row = next(r for r in summary[1:] if r[0] == "expert")
    assert float(row[4]) == pytest.approx(expected, abs=5e-5)
    assert row[1] == "6"  # 4 experts: 6 pairs
    assert "explain-expert_distance" in doc.sections


def test_a_distance_only_report_and_unknown_runs(runs, tmp_path):
    html = ml.build_report([runs["within"]])
    assert 'id="expert-distance"' in html and 'id="router-alignment"' not in html
    bogus = ml.Run(manifest={**runs["within"].manifest, "analysis": "no_such_analysis"}, tables=runs["within"].tables)
    with pytest.raises(ConfigError, match="no section for a 'no_such_analysis' run"):
        ml.build_report([bogus])
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert np.isfinite(runs["within"]["expert_distance"]["rel_l2"]).all()


@pytest.mark.browser
def test_the_mixed_report_opens_in_headless_chromium(mixed_html, tmp_path):
    import subprocess

    import matplotlib.image as mpimg

    browser = find_browser()
    page = tmp_path / "mixed.html"
    page.write_text(mixed_html, encoding="utf-8")
    shot = tmp_path / "mixed.png"
    done = subprocess.run([
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
        f"--screenshot={shot}", "--window-size=1280,3000", page.as_uri(),
    ], check=False, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not [line for line in done.stderr.splitlines() if "CONSOLE" in line]
    pixels = mpimg.imread(shot)[..., :3].mean(axis=-1)
    assert pixels.std() > 0.05 and (pixels < 0.5).mean() > 0.005


def test_a_module_metrics_section_has_a_heat_map_and_lines_per_metric(tiny_checkpoint, tmp_path):
    a = tiny_checkpoint("qwen2_moe")
    b = build_tiny_checkpoint(TinySpec("qwen2_moe", "per_expert", "float32", False), tmp_path / "b", seed=1)
    run = ml.module_metrics(a, b, metrics="corr,cka", single="stable_rank")
    html = ml.build_report([run])
    doc = outline(html)
    assert 'id="module-metrics"' in html and "modules-run-1" in doc.sections
    figures = doc.sections["modules-run-1"].figures
    # pair: corr and cka; model a and b: stable_rank — one heat map and one line plot each
    assert figures.count("module_heatmap") == 4 and figures.count("module_lines") == 4
    assert "explain-module_heatmap" in doc.sections
    assert "corr A vs B from" in html  # the first screen's one line of numbers


def _toc_and_headings(html: str) -> tuple[dict[str, str], dict[str, str]]:
    """Anchor → number as the table of contents says, and as the heading the anchor leads to says."""
    nav = html[html.index('<nav class="toc"'):html.index("</nav>")]
    toc = dict(re.findall(r'<a href="#([^"]+)"><span class="number">([\d.]+)\.</span>', nav))
    headings = {}
    for anchor in toc:
        found = re.search(r'id="' + re.escape(anchor) + r'"[^>]*>\s*<h[1-6][^>]*>([\d.]+)\. ', html)
        headings[anchor] = found.group(1) if found else "(no number)"
    return toc, headings


def test_table_of_contents_numbers_are_the_heading_numbers(mixed_html, runs):
    toc, headings = _toc_and_headings(mixed_html)
    assert len(toc) >= 8 and toc == headings
    assert set(toc.values()) >= {"1", "2", "1.1", "2.1", "2.2"}  # parts and their sub-parts
    alone = ml.build_report([runs["alignment"]])  # one analysis alone: the same path, one part
    toc, headings = _toc_and_headings(alone)
    assert toc == headings and list(toc.values())[:3] == ["1", "1.1", "1.2"]
