"""The report of a real (tiny) checkpoint's alignment run, written by `moelens.router_alignment`."""

from __future__ import annotations

import math
import re

import pytest

from moelens import router_alignment
from moelens.report import build_report
from moelens.results import load_run

from .html_outline import outline
from .test_alignment_report import check_structure

#: The seed report draws the null distribution at these k (d = 4096).
SEED_NULL_KS = (32, 128, 512, 2048)


def expected_null_ks(stored_ks: list[int], d: int) -> list[int]:
    """The k values whose null distribution the report must show, from the run's stored k: the
    seed's four where all are stored; otherwise, for a smaller model, the stored k nearest (on
    a log scale, the larger on a tie) to d/128, d/32, d/8 and d/2, each once, never k = d (where
    every energy is 1 and there is no distribution to see)."""
    below_d = sorted(k for k in set(stored_ks) if k < d)
    if all(k in below_d for k in SEED_NULL_KS):
        return list(SEED_NULL_KS)
    chosen = {min(below_d, key=lambda k: (abs(math.log2(k) - math.log2(max(target, 1))), -k))
              for target in (d / 128, d / 32, d / 8, d / 2)}
    return sorted(chosen)


@pytest.fixture(scope="module")
def real_run_dir(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("real-run") / "run"
    router_alignment(tiny_checkpoint("mixtral"), out=out, cache=False)
    return out


def test_expected_null_ks_follow_the_seed():
    assert expected_null_ks([2**p for p in range(13)], 4096) == [32, 128, 512, 2048]
    assert expected_null_ks([1, 2, 4, 8, 16, 32], 32) == [1, 4, 16]
    assert expected_null_ks(list(range(1, 65)), 64) == [1, 2, 8, 32]


def test_report_of_a_tiny_mixtral_run(real_run_dir):
    run = load_run(real_run_dir)
    layers = run["alignment_layers"]
    html = build_report([real_run_dir])
    d = run.model["hidden_size"]
    null_ks = expected_null_ks([int(k) for k in run["alignment"]["k"].unique()], d)
    assert null_ks, f"the run stores no k below d = {d}"
    assert re.findall(r'id="fig-null-distribution-k(\d+)"', html) == [str(k) for k in null_ks]
    n_layers = layers["layer"].nunique()
    check_structure(html, 1, n_null=len(null_ks), layer_heatmaps=2 if n_layers > 1 else 0)
    summary = outline(html).sections["run-1-summary"].tables[0]
    means = layers.groupby("k")["align"].mean()
    assert [row[1] for row in summary[1:]] == [f"{v:.6f}" for v in means]
    setup = dict(row for row in outline(html).sections["run-1-setup"].tables[0][1:])
    assert setup["matrix"] == "gate" and setup["null"].startswith("derangement")
    assert setup["hidden size d"] == str(d)
