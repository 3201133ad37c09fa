"""Sections drawn on worker processes: the very report and figure files of a serial build, the
file names included when a name is taken before the section's turn."""

from __future__ import annotations

import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

import moelens as ml  # noqa: E402
from moelens.errors import ConfigError  # noqa: E402
from moelens.report import build_report  # noqa: E402
from moelens.report.embed import collecting_files, embed  # noqa: E402


@pytest.fixture(scope="module")
def run_dirs(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    base = tiny_checkpoint("mixtral")
    ml.expert_distance(base, out=root / "within")
    ml.module_metrics(base, out=root / "modules")
    ml.router_norms(base, out=root / "norms")
    return [root / "within", root / "modules", root / "norms"]


def _build(runs, jobs: int, taken: str | None = None) -> tuple[str, list[tuple[str, bytes, bytes]]]:
    with collecting_files() as files:
        if taken is not None:  # a figure embedded before the report takes this file name
            fig, ax = plt.subplots(figsize=(2, 2))
            ax.plot([0, 1])
            embed(fig, taken, "fig-" + taken.replace("_", "-"), "t", "a")
            plt.close(fig)
        html = build_report([ml.load_run(p) for p in runs], title="Parallel", jobs=jobs)
    html = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", "(time)", html)  # the one line that names the hour
    return html, [(f.stem, f.data["svg"], f.data["png"]) for f in files]


def test_sections_on_workers_give_the_serial_bytes_and_file_names(run_dirs):
    """Three sections on two workers: the same HTML and figure files as one process, and a file
    name taken by a figure embedded before the report is numbered in the section as it would be
    serially (one serial and one parallel build: each costs seconds of drawing)."""
    serial = _build(run_dirs, jobs=1, taken="expert_distance")
    parallel = _build(run_dirs, jobs=2, taken="expert_distance")
    stems = [f[0] for f in serial[1]]
    assert len(stems) > 3 and stems[0] == "expert_distance"
    assert "expert_distance-2" in stems  # the section's own figure came second
    assert parallel[0] == serial[0]
    assert [f[0] for f in parallel[1]] == stems
    assert parallel[1] == serial[1]


@pytest.mark.parametrize("jobs", [0, -1, 1.5, True])
def test_jobs_must_be_a_whole_number_of_at_least_one(run_dirs, jobs):
    with pytest.raises(ConfigError, match="whole number"):
        build_report([ml.load_run(run_dirs[0])], jobs=jobs)
