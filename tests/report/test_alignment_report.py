"""The alignment report: the seed's sections and figures for one and six runs, the numbers of its
tables, what goes beyond the seed, escaping, and a file that names no external resource."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from xml.etree import ElementTree

import numpy as np
import pytest
from typer.testing import CliRunner

import moelens
from moelens.errors import ConfigError, RunDirectoryError
from moelens.report import build_report
from moelens.testing.synthetic_runs import synthetic_alignment_run

from .html_outline import outline

SEED_SUMMARY_COLUMNS = ["k", "align", "delta_vs_shuffle", "z_vs_shuffle", "effect_over_random", "cos_squared"]
EXPLAINED_FIGURES = ["comparison_panels", "cos_squared_per_expert", "shuffle_statistics", "z_decomposition",
                     "null_distribution", "layer_permutation_test", "per_expert_breakdown", "complete_analysis",
                     "layer_k_heatmap"]
COMPARISON_SECTIONS = {
    "comparison-plots": ["comparison_panels"],
    "comparison-cos-squared": ["cos_squared_per_expert"],
    "comparison-shuffle-statistics": ["shuffle_statistics"],
    "comparison-z-decomposition": ["z_decomposition"],
    "comparison-permutation-test": ["layer_permutation_test"],
    "comparison-per-expert": ["per_expert_breakdown"],
}
RUN_SUBSECTIONS = ["setup", "summary", "cos-squared", "permutation-test", "by-k", "complete"]


def check_structure(html: str, n_runs: int, n_null: int = 4, layer_heatmaps: int = 0) -> None:
    """Every section and figure of the seed (and beyond) for ``n_runs`` runs; ``n_null`` null
    distributions (k = 32, 128, 512, 2048 for d = 4096), ``layer_heatmaps`` per run."""
    doc = outline(html)
    ids = list(doc.sections)
    assert ids.index("plot-explanations") < ids.index("comparison") < ids.index("run-1")
    for name in EXPLAINED_FIGURES:
        assert f"explain-{name}" in doc.sections, f"no explanation of {name}"
    # One numbering for the table of contents and the headings: every TOC entry is numbered; the
    # alignment section is part 1, Plot explanations first in it, so the comparison is 1.2 and run N is 1.(N + 2).
    assert doc.sections["router-alignment"].headings[0] == "1. Router–expert alignment"
    assert doc.sections["plot-explanations"].headings[0] == "1.1. Plot explanations"
    assert doc.sections["comparison"].headings[0] == "1.2. Comparison across all runs"
    for section_id, figures in COMPARISON_SECTIONS.items():
        assert doc.sections[section_id].figures == figures, section_id
    assert doc.sections["comparison-null-distribution"].figures == ["null_distribution"] * n_null
    for number in range(1, n_runs + 1):
        run = doc.sections[f"run-{number}"]
        assert run.headings[0].startswith(f"1.{number + 2}. Individual analysis: run {number},")
        for sub in RUN_SUBSECTIONS:
            assert f"run-{number}-{sub}" in doc.sections, f"run {number} lacks {sub}"
        assert doc.sections[f"run-{number}-complete"].figures == ["complete_analysis"]
        headings = doc.sections[f"run-{number}"].headings
        for expected in ("Setup and configuration", "Summary statistics (averaged across experts",
                         "cos²θ alignment (k = 1)", "Layer permutation test", "Detailed results by k value",
                         "Complete analysis plots"):
            assert any(h.startswith(expected) for h in headings), (number, expected)
    assert f"run-{n_runs + 1}" not in doc.sections
    all_figures = [f for s in doc.sections.values() if s.id in ("comparison", *(f"run-{i}" for i in range(1, n_runs + 1))) for f in s.figures]
    assert len(all_figures) == 6 + n_null + n_runs * (1 + layer_heatmaps)


def test_one_run_report_has_every_section_and_figure(one_run_html):
    check_structure(one_run_html, 1)


def test_six_run_report_has_every_section_and_figure(six_run_html):
    check_structure(six_run_html, 6)
    assert len(re.findall(r'<img src="data:image/svg\+xml;base64,', six_run_html)) == 16


def test_summary_table_is_the_seeds_with_the_runs_numbers(one_run, one_run_html):
    summary = outline(one_run_html).sections["run-1-summary"].tables[0]
    assert summary[0] == SEED_SUMMARY_COLUMNS
    experts = one_run["alignment"]
    means = experts.groupby("k")[SEED_SUMMARY_COLUMNS[1:5]].mean()
    assert [int(row[0]) for row in summary[1:]] == list(means.index)
    for row in summary[1:]:
        k = int(row[0])
        for column, cell in zip(SEED_SUMMARY_COLUMNS[1:5], row[1:5]):
            value = means.loc[k, column]
            assert cell == ("" if np.isnan(value) else f"{value:.6f}"), (k, column)
        if k == 1:
            assert row[5] == f"{experts[experts['k'] == 1]['cos_squared'].mean():.6f}"
        else:
            assert row[5] == "", "cos² is a k = 1 quantity: blank, not 0, elsewhere"
    assert summary[-1][3] == "", "z is undefined at k = d (σ = 0): blank"


def test_cos_squared_statistics_and_per_expert_values(one_run, one_run_html):
    section = outline(one_run_html).sections["run-1-cos-squared"]
    cos = one_run["alignment"].query("k == 1")["cos_squared"]
    for label, value in (("Mean", cos.mean()), ("Max", cos.max()), ("Min", cos.min()), ("Std", cos.std(ddof=1))):
        assert f"<b>{label} cos²θ</b>{value:.6f}" in one_run_html
    per_expert = section.tables[0]
    assert per_expert[0] == ["expert", "cos²θ", "align (k = 1)"]
    assert len(per_expert) == 1 + 8
    assert [row[1] for row in per_expert[1:]] == [f"{v:.6f}" for v in cos]


def test_detailed_results_one_table_per_k(one_run, one_run_html):
    section = outline(one_run_html).sections["run-1-by-k"]
    ks = sorted(one_run["alignment"]["k"].unique())
    assert section.details == len(ks) == len(section.tables)
    for table in section.tables:
        assert table[0][:3] == ["expert", "align", "random_expect_k_over_d"]
        assert len(table) == 1 + 8
    assert re.search(r"<summary>k = 128: mean align \d\.\d{6}, null μ", one_run_html)


def test_layer_permutation_test_beside_the_expert_z(one_run, one_run_html):
    doc = outline(one_run_html)
    table = doc.sections["run-1-permutation-test"].tables[0]
    assert table[0] == ["k", "mean z_vs_shuffle", "z_layer", "p_layer", "argmax accuracy"]
    layers = one_run["alignment_layers"].set_index("k")
    row_128 = next(row for row in table if row[0] == "128")
    assert row_128[2] == f"{layers.loc[128, 'z_layer']:.6f}" and row_128[3] == f"{layers.loc[128, 'p_layer']:.6f}"
    callout = re.search(r'<p class="callout" id="z-cap">(.*?)</p>', one_run_html, re.DOTALL).group(1)
    assert "√(E − 1)" in callout and "1/E" in callout and "2.65" in callout


def test_a_layered_run_gets_layer_heatmaps_and_per_layer_tables(layered_run, layered_html):
    check_structure(layered_html, 1, n_null=4, layer_heatmaps=2)
    doc = outline(layered_html)
    assert doc.sections["run-1-layers"].figures == ["layer_k_heatmap", "layer_k_heatmap"]
    summary = doc.sections["run-1-summary"]
    assert summary.headings[0] == "Summary statistics (averaged across experts and layers)"
    assert len(summary.tables) == 1 + 4  # over all layers, then one per layer (collapsed)
    # d = 64: the null is drawn at the stored k nearest to d/128, d/32, d/8 and d/2.
    nulls = re.findall(r'id="fig-null-distribution-k(\d+)"', layered_html)
    assert nulls == ["1", "2", "8", "32"]
    per_expert = doc.sections["run-1-cos-squared"].tables[0]
    assert per_expert[0] == ["layer", "expert", "cos²θ", "align (k = 1)"] and len(per_expert) == 1 + 4 * 8


def test_single_layer_runs_have_no_layer_heatmaps(six_run_html):
    assert 'data-figure="layer_k_heatmap"' not in six_run_html


NAMESPACE = re.compile(r'xmlns(?::\w+)?="[^"]*"')


@pytest.mark.parametrize("which", ["one_run_html", "six_run_html"])
def test_the_file_names_no_external_resource(which, request):
    """No URL at all in the HTML; inside the embedded SVGs, only XML namespace names (identifiers
    that no viewer fetches)."""
    html = request.getfixturevalue(which)
    assert not re.search(r"https?://", html)
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*//""", html)
    assert not re.search(r"<link\b|<script\b|@import|url\(", html, re.IGNORECASE)
    doc = outline(html)
    assert doc.srcs and all(src.startswith("data:image/") for src in doc.srcs)
    assert all(href.startswith("#") for href in doc.hrefs)
    for payload in re.findall(r"data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)", html):
        svg = base64.b64decode(payload).decode("utf-8")
        assert ElementTree.fromstring(svg).tag == "{http://www.w3.org/2000/svg}svg"
        assert not re.search(r"https?://", NAMESPACE.sub("", svg))
        assert not re.search(r"""href="(?!#|data:)""", svg)


def test_user_text_is_escaped_and_png_figures_work():
    run = synthetic_alignment_run(model_name="m", hidden_size=32, n_experts=4)
    run.manifest["label"] = "<i>tuned</i> & co"
    html = build_report(run, title="<script>alert(1)</script>", figure_format="png")
    assert "<script>" not in html and "<i>tuned</i>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;i&gt;tuned&lt;/i&gt; &amp; co" in html
    assert outline(html).title == "<script>alert(1)</script>"
    assert html.count('src="data:image/png;base64,') == len(outline(html).sections["comparison"].figures) + 1


def test_report_api(tmp_path, six_run_report, six_run_html):
    """``moelens.report(paths, out)`` wrote the six-run file (the fixture); mistakes fail early."""
    assert six_run_report.name == "report.html" and six_run_html.startswith("<!DOCTYPE html>")
    assert "<title>Six synthetic runs</title>" in six_run_html
    assert not list(six_run_report.parent.glob(".*partial"))
    with pytest.raises(ConfigError, match="svg or png"):
        build_report([tmp_path], figure_format="jpg")
    with pytest.raises(RunDirectoryError, match="does not exist"):
        moelens.report(str(tmp_path / "missing"), tmp_path / "r.html")  # one path, not its characters
    with pytest.raises(ConfigError, match="at least one run"):
        build_report([])


def test_cli_report_and_figure(tmp_path, six_run_dirs):
    from moelens.cli.app import app

    runner = CliRunner()
    small = synthetic_alignment_run(hidden_size=32, n_experts=4).save(tmp_path / "small")
    result = runner.invoke(app, ["report", str(small), "--out", str(tmp_path / "r.html"), "--title", "Small"])
    assert result.exit_code == 0, result.output
    assert "<title>Small</title>" in (tmp_path / "r.html").read_text(encoding="utf-8") and "wrote" in result.output
    result = runner.invoke(app, ["figure", "null-distribution", *map(str, six_run_dirs[:2]), "--out", str(tmp_path / "n.pdf"), "--k", "64"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "n.pdf").read_bytes().startswith(b"%PDF")


def test_cli_mistakes_are_one_line_and_status_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "moelens", "report", str(tmp_path / "missing"), "--out", str(tmp_path / "r.html")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr
