"""What a Ray task receives of the config: relative paths made absolute (a worker need not share
the driver's working directory), every other value as it was. No Ray needed."""

from __future__ import annotations

import os

from moelens.analyses.calibration.config import CalibrationConfig
from moelens.analyses.clustering.config import MergeCostConfig
from moelens.analyses.executors.ray_executor import absolute_paths


def test_relative_paths_become_absolute_and_nothing_else_changes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.txt").write_text("a b c\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "cpu").mkdir()  # a folder named like an option's value: the value stays a value
    config = CalibrationConfig(texts="text.txt", layers=(0,), device="cpu")
    fixed = absolute_paths(config)
    assert fixed.texts == str(tmp_path / "text.txt") and os.path.isabs(fixed.texts)
    assert (fixed.layers, fixed.device, fixed.dtype) == ((0,), "cpu", "auto") and config.texts == "text.txt"
    cost = absolute_paths(MergeCostConfig(clusters=("run",), facts=None, export="shared"))
    assert cost.clusters == (str(tmp_path / "run"),) and cost.export == "shared" and cost.facts is None
    untouched = CalibrationConfig(texts=("a line", "another"))  # texts given in Python are no paths
    assert absolute_paths(untouched) is untouched
