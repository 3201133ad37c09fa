"""What an analysis's declaration derives for its package (moelens.analyses.declaration)."""

from __future__ import annotations

import importlib

import pytest

from moelens.analyses.declaration import Declaration, load
from moelens.analyses.registry import REGISTRY, declarations


@pytest.mark.parametrize("target", REGISTRY)
def test_every_exported_name_is_defined_where_its_package_says(target):
    package = importlib.import_module(target.partition(":")[0])
    exports = package.__lazy_exports__
    d: Declaration = load(target)
    assert exports[d.function] == "moelens.analyses.api"
    for name, module in exports.items():
        assert getattr(importlib.import_module(module), name) is getattr(package, name)


def test_exports_name_the_config_the_analysis_and_the_function():
    d = declarations()["interventions"]
    assert d.exports(config=("X",), analysis=("ANALYSIS",)) == {
        "InterventionsConfig": "moelens.analyses.interventions.config", "X": "moelens.analyses.interventions.config",
        "Interventions": "moelens.analyses.interventions.analysis", "ANALYSIS": "moelens.analyses.interventions.analysis",
        "trace": "moelens.analyses.api",
    }
