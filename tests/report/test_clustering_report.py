"""The calibration, clustering and merge-cost sections of a report: each explains its
quantities, shows its figures, and prints the runs' numbers in its tables."""

from __future__ import annotations

import re

import pytest

from moelens.report import build_report
from moelens.report.clustering_report import cluster_text
from moelens.testing.synthetic_clusters import (
    synthetic_calibration_run,
    synthetic_clustering_run,
    synthetic_merge_cost_run,
)


@pytest.fixture(scope="module")
def runs():
    return {
        "calibration": synthetic_calibration_run(),
        "hc": synthetic_clustering_run(method="hc-smoe", groups=3, seed=1),
        "m": synthetic_clustering_run(method="m-smoe", groups=4, seed=2),
        "cost": synthetic_merge_cost_run(),
    }


@pytest.fixture(scope="module")
def html(runs):
    return build_report([runs["calibration"], runs["hc"], runs["m"], runs["cost"]], figure_format="png")


def test_one_section_per_analysis_with_its_explanations_and_figures(html):
    for anchor in ("calibration", "expert-clustering", "merge-cost", "calibration-explanations", "clustering-explanations",
                   "merge-cost-explanations", "clustering-run-1", "clustering-run-2", "merge-cost-run-1"):
        assert f'id="{anchor}"' in html, anchor
    figures = re.findall(r'data-figure="([a-z_]+)"', html)
    assert figures.count("cluster_map") == 2 and figures.count("cluster_usage") == 2 and figures.count("expert_usage") == 1
    for name in set(figures):  # every figure's "how to read it" link has its explanation
        assert f'href="#explain-{name}"' in html and f'id="explain-{name}"' in html
    assert "HC-SMoE" in html and "M-SMoE" in html and "average, euclidean" in html


def test_tables_print_the_runs_numbers(runs, html):
    cost = runs["cost"]["merge_cost_summary"]
    for r in cost.itertuples(index=False):
        assert f"{r.recall:.3f}" in html and f"{r.perplexity_ratio:.3f}" in html, r.variant
    worse = cost[cost["variant"] != "original"].iloc[0]
    assert f"−{abs(worse.recall_delta):.3f}" in html  # a loss prints with its sign
    clusters = runs["m"]["clusters"]
    for layer in range(4):
        assert cluster_text(clusters[clusters["layer"] == layer]) in html
    for r in runs["calibration"]["calibration_layers"].itertuples(index=False):
        assert f"{r.usage_entropy:.3f}" in html


def test_cluster_listing_marks_dominant_experts_and_summarises_large_layers():
    run = synthetic_clustering_run(n_experts=8, groups=3, seed=3)
    rows = run["clusters"][run["clusters"]["layer"] == 0]
    text = cluster_text(rows)
    assert text.count("*") == 3 and text.count("{") == 3
    members = sorted(int(m.strip("*{} ")) for part in text.split("}") if part.strip() for m in part.split(","))
    assert members == list(range(8))
    large = synthetic_clustering_run(n_layers=1, n_experts=64, groups=48, seed=4)["clusters"]
    assert cluster_text(large).startswith("sizes ") and len(cluster_text(large).split()) == 1 + 48


def test_merge_cost_headline_names_each_criterion_and_shows_both_numbers_under_display_names(html):
    from moelens.analyses.clustering.merge_cost import summarise
    from moelens.report.clustering_report import merge_cost_headline
    from moelens.results import Run

    run = synthetic_merge_cost_run(recall=0.8, perplexity=3.0)
    cost = run["merge_cost"].set_index("variant")
    # HC-SMoE has the lowest perplexity, while M-SMoE, permuted keeps twice its recall
    values = {"00-hc-smoe": (0.2, 3.3), "00-hc-smoe-permuted": (0.3, 3.6), "01-m-smoe": (0.25, 3.9), "01-m-smoe-permuted": (0.4, 3.5)}
    for variant, (recall, perplexity) in values.items():
        cost.loc[variant, ["recall", "perplexity"]] = [recall, perplexity]
    cost = cost.reset_index()
    line = merge_cost_headline(Run(run.manifest, {"merge_cost": cost, "merge_cost_summary": summarise(cost)}))
    assert line.startswith("original recall 0.800, perplexity 3.00; merged: HC-SMoE recall 0.200, perplexity 3.30 (×1.10); ")
    assert "M-SMoE, permuted recall 0.400, perplexity 3.50 (×1.17)" in line
    assert line.endswith("most recall kept: M-SMoE, permuted, lowest perplexity: HC-SMoE")
    assert "00-hc" not in line and "01-m" not in line  # internal variant ids stay out of the prose
    first_screen = html.split('<nav class="toc"')[0]
    assert "HC-SMoE, permuted recall" in first_screen and "-smoe" not in first_screen.split("Merge cost")[-1].split("</li>")[0]
