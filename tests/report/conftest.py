"""Reports built once per test session from synthetic runs: one run, six runs, a layered run."""

from __future__ import annotations

from pathlib import Path

import pytest

from moelens.report import build_report
from moelens.testing.synthetic_runs import synthetic_alignment_run, write_synthetic_runs


@pytest.fixture(scope="session")
def six_run_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_synthetic_runs(tmp_path_factory.mktemp("six-runs"), 6)


@pytest.fixture(scope="session")
def six_run_report(six_run_dirs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The six-run report written to a file (what `moelens report` writes)."""
    from moelens import report

    return report(six_run_dirs, tmp_path_factory.mktemp("six-report") / "report.html", title="Six synthetic runs")


@pytest.fixture(scope="session")
def six_run_html(six_run_report) -> str:
    return six_run_report.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def one_run():
    return synthetic_alignment_run(seed=3)


@pytest.fixture(scope="session")
def one_run_html(one_run) -> str:
    return build_report([one_run])


@pytest.fixture(scope="session")
def layered_run():
    """A zoo-sized run: four layers, d = 64, E = 8."""
    return synthetic_alignment_run(model_name="zoo-base", layers=range(4), hidden_size=64, null="shuffle", seed=5)


@pytest.fixture(scope="session")
def layered_html(layered_run) -> str:
    return build_report(layered_run)
