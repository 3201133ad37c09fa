"""The report of a real (tiny) checkpoint's alignment run, written by `moelens.router_alignment`."""

from __future__ import annotations

import pytest

from moelens.report import build_report

from .html_outline import outline
from .test_alignment_report import check_structure


@pytest.fixture(scope="module")
def real_run_dir(tiny_checkpoint, tmp_path_factory):
    try:
        from moelens import router_alignment
    except ImportError:
        pytest.skip("moelens.router_alignment is not available in this checkout")
    out = tmp_path_factory.mktemp("real-run") / "run"
    router_alignment(tiny_checkpoint("mixtral"), out=out, cache=False)
    return out


def test_report_of_a_tiny_mixtral_run(real_run_dir):
    from moelens.results import load_run

    run = load_run(real_run_dir)
    layers = run["alignment_layers"]
    html = build_report([real_run_dir])
    d = run.manifest["model"]["hidden_size"]
    n_layers = layers["layer"].nunique()
    expected_nulls = {32: 3, 64: 4}.get(d)  # k nearest d/128, d/32, d/8, d/2 (distinct, below d)
    check_structure(html, 1, n_null=expected_nulls or len(outline(html).sections["comparison-null-distribution"].figures),
                    layer_heatmaps=2 if n_layers > 1 else 0)
    summary = outline(html).sections["run-1-summary"].tables[0]
    means = layers.groupby("k")["align"].mean()
    assert [row[1] for row in summary[1:]] == [f"{v:.6f}" for v in means]
    setup = dict(row for row in outline(html).sections["run-1-setup"].tables[0][1:])
    assert setup["matrix"] == "gate" and setup["null"].startswith("derangement")
    assert setup["hidden size d"] == str(d)
