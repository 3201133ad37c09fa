"""A report is written over a file only if moelens wrote that file; never through a link."""

from __future__ import annotations

from pathlib import Path

import pytest

import moelens as ml
from moelens.errors import OutputExistsError
from moelens.report import write_report
from moelens.testing.synthetic_runs import write_synthetic_runs


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return write_synthetic_runs(tmp_path_factory.mktemp("one-run"), n_runs=1, hidden_size=64)[0]


def test_a_report_replaces_its_own_earlier_report(run, tmp_path):
    out = tmp_path / "report.html"
    ml.report(run, out)
    first = out.read_bytes()
    write_report(first.decode("utf-8").replace("<title>", "<title>again ", 1), out)  # the same writer ml.report uses
    assert out.read_bytes() != first and b"again" in out.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no temporary left


def test_somebodys_html_file_is_not_overwritten(run, tmp_path):
    out = tmp_path / "report.html"
    out.write_text("<html><body>my own page</body></html>")
    with pytest.raises(OutputExistsError, match="not a report moelens wrote"):
        ml.report(run, out)
    with pytest.raises(OutputExistsError, match="not a report moelens wrote"):
        write_report("<html></html>", out)
    assert out.read_text() == "<html><body>my own page</body></html>"


def test_a_link_is_not_written_through(run, tmp_path):
    target = tmp_path / "elsewhere.html"
    target.write_text("<html>someone's</html>")
    out = tmp_path / "report.html"
    out.symlink_to(target)
    with pytest.raises(OutputExistsError, match="symbolic link"):
        ml.report(run, out)
    assert target.read_text() == "<html>someone's</html>"
