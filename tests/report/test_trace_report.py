"""The interventions section of a report: its explanations, per run the setup, the one-line
reading, the heat map (and ROME's indirect effect for restore runs), and summary tables whose
cells are the run's means ± stds and counts."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from markupsafe import escape

import moelens as ml
from moelens.report.trace_report import headline
from moelens.testing.synthetic_trace import write_synthetic_trace_run

from .html_outline import outline


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("trace-runs")
    return [
        write_synthetic_trace_run(root / "knockout", mode="knockout", layers=range(5), n_prompts=4, missing=[(2, "attn")],
                                  label="tiny knockout", seed=1),
        write_synthetic_trace_run(root / "restore", mode="restore", layers=range(4), n_prompts=3, moe=False, label="tiny restore",
                                  seed=2),
        write_synthetic_trace_run(root / "block", mode="block", layers=range(4), n_prompts=3, ablation="zero", label="tiny block",
                                  seed=3),
    ]


@pytest.fixture(scope="module")
def runs(run_dirs):
    return ml.load_runs(run_dirs)


@pytest.fixture(scope="module")
def html(run_dirs) -> str:
    return ml.build_report(run_dirs, figure_format="png")


def cell(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}".replace("-", "−")


def test_one_section_with_explanations_and_a_part_per_run(html):
    doc = outline(html)
    assert 'id="interventions"' in html and "Layer-wise interventions" in html
    for anchor in ("trace-explanations", "explain-trace_heatmap", "explain-trace_knockout", "explain-trace_restore",
                   "explain-trace_indirect_effect", "trace-run-1", "trace-run-2", "trace-run-3"):
        assert anchor in doc.sections, anchor
        assert f'href="#{anchor}"' in html or anchor.startswith("explain-")
    # each mode's heat map under its own name; the seed's name (trace_heatmap) is attention knockout
    assert doc.sections["trace-run-1"].figures == ["trace_knockout"]
    assert doc.sections["trace-run-2"].figures == ["trace_restore", "trace_indirect_effect"]
    assert doc.sections["trace-run-3"].figures == ["trace_heatmap"]
    for name in ("trace_knockout", "trace_restore", "trace_heatmap"):
        assert f'href="#explain-{name}"' in html
    assert 'href="#explain-trace_indirect_effect"' in html and "JSD(P, Q) = ½ KL(P‖M)" in html
    assert all(src.startswith("data:image/png;base64,") for src in doc.srcs)


def test_summary_table_cells_are_the_run_s_means_and_stds(html, runs):
    doc = outline(html)
    knockout = runs[0]["interventions_summary"].query("measure == 'jsd'")
    tables = doc.sections["trace-run-1"].tables
    [summary] = [t for t in tables if t[0][:2] == ["layer", "Subj. (subj)"]][:1]
    assert summary[0] == ["layer", "Subj. (subj)", "Attn. (attn)", "Last. (last)", "Router (router)", "MoE (moe)", "n"]
    columns = ["subj", "attn", "last", "router", "moe"]
    assert len(summary) == 1 + 5
    for row in knockout.itertuples(index=False):
        assert summary[1 + row.layer][1 + columns.index(row.site)] == cell(row.mean, row.std)
    assert summary[1 + 2][2] == ""  # layer 2 has no attention: an empty cell, not a number
    assert {r[-1] for r in summary[1:]} == {"4"}
    # the p(target) table of the same cells sits in the details
    p_target = runs[0]["interventions_summary"].query("measure == 'p_target' and layer == 0 and site == 'subj'").iloc[0]
    assert any(t[1][1] == cell(p_target["mean"], p_target["std"]) for t in tables[1:] if t[0][0] == "layer")


def test_restore_tables_give_the_indirect_effect_per_token_group(html, runs):
    doc = outline(html)
    summary = runs[1]["interventions_summary"].query("measure == 'indirect_effect' and site == 'restore_mlp'")
    tables = [t for t in doc.sections["trace-run-2"].tables if t[0][0] == "layer" and "Last token" in t[0]]
    assert len(tables) == 3  # hidden, MLP, attention
    mlp = tables[1]
    for row in summary.itertuples(index=False):
        header = {"last_subject": "Last subject token", "last": "Last token"}.get(row.token_kind)
        if header in mlp[0]:
            assert mlp[1 + row.layer][mlp[0].index(header)] == cell(row.mean, row.std)


def test_setup_says_what_was_done(html, runs):
    doc = outline(html)
    setups = {i: dict((r[0], r[1]) for r in doc.sections[f"trace-run-{i}"].tables[0][1:]) for i in (1, 2, 3)}
    assert setups[1]["mode"].startswith("knockout") and setups[1]["ablation"] == "mean of the site over the prompt set"
    assert setups[1]["sites"] == "subj, attn, last, router, moe" and setups[1]["prompts"].startswith("4 from ")
    assert setups[1]["layers"] == "0-4" and setups[1]["seed"] == "1"
    assert "ℓ−5 … ℓ+4" in setups[2]["window"] and "10 samples per prompt" in setups[2]["noise"]
    assert "ablation" not in setups[2] and "window" not in setups[1]
    assert "ℓ−4 … ℓ+4" in setups[3]["window"]
    assert "layer 2 has no attn module" in html  # the run's notes


def test_the_one_line_reading_names_the_mode_the_site_and_the_largest_mean(html, runs):
    jsd = runs[0]["interventions_summary"].query("measure == 'jsd'")
    kept = jsd[jsd["site"] != "last"]  # last-token knockout is near its maximum by construction: never headlined
    top = kept.loc[kept["mean"].idxmax()]
    action = {"subj": "knocking out the subject's hidden state", "attn": "knocking out the attention output at the last token",
              "router": "knocking out the router logits at the last token", "moe": "knocking out the MoE output at the last token"}
    line = f"mean knockout: {action[top['site']]} ({top['site']}) matters most at layer {int(top['layer'])} ({top['mean']:.2f} bits)"
    assert headline(runs[0]).startswith(line) and str(escape(line)) in html
    if jsd.loc[jsd["mean"].idxmax(), "site"] == "last":
        assert "last-token knockout left out" in headline(runs[0])
    block = runs[2]["interventions_summary"].query("measure == 'jsd'")
    top = block.loc[block["mean"].idxmax()]
    action = {"block_subj": "blocking subject → last attention", "block_nonsubj": "blocking non-subject → last attention",
              "block_last": "blocking the last token's attention to itself"}
    assert headline(runs[2]).startswith(f"attention knockout (window 9): {action[top['site']]} ({top['site']}) "
                                        f"matters most at layer {int(top['layer'])} ({top['mean']:.2f} bits)")
    ie = runs[1]["interventions_summary"].query("measure == 'indirect_effect'")
    best = ie.loc[ie["mean"].idxmax()]
    line = headline(runs[1])
    restoring = {"restore_hidden": "restoring the hidden state", "restore_mlp": "restoring the MLP output",
                 "restore_attn": "restoring the attention output"}
    assert line.startswith(f"causal tracing (window 10): {restoring[best['site']]} ({best['site']}) at the ")
    assert f"recovers most at layer {int(best['layer'])} (" in line
    assert math.isclose(float(re.search(r"= (−?[\d.]+)\)", line).group(1)), round(best["mean"], 2))
    # the report's first screen carries every run's line
    first_screen = html.split('<nav class="toc"')[0]
    assert all(str(escape(headline(run))) in first_screen for run in runs)
    assert np.isfinite(best["mean"])
