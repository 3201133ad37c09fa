"""Lazy packages (moelens.lazy): configs without torch, functions that stay functions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import moelens

CONFIGS = ("CalibrationConfig", "ClusteringConfig", "ExpertDistanceConfig", "InterventionsConfig", "MergeCostConfig",
           "ModuleMetricsConfig", "RouterAlignmentConfig")


def _fresh(code: str) -> object:
    env = {**os.environ, "PYTHONPATH": str(Path(moelens.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_config_is_made_and_checked_without_torch_pandas_or_numpy():
    code = (
        "import sys, json\n"
        "from moelens.analyses import %s\n"
        "from moelens.errors import ConfigError\n"
        "made = [RouterAlignmentConfig(layers='0,2-3', k=[1, 2]).layers, ModuleMetricsConfig(metrics='cka,corr').metrics]\n"
        "try:\n"
        "    ExpertDistanceConfig(dtype='float16')\n"
        "except ConfigError as exc:\n"
        "    made.append(str(exc))\n"
        "print(json.dumps([made, [m for m in ('torch', 'pandas', 'numpy', 'matplotlib') if m in sys.modules]]))\n"
    ) % ", ".join(CONFIGS)
    made, heavy = _fresh(code)
    assert made == [[0, 2, 3], ["corr", "cka"], "unknown compute dtype 'float16'; expected float32 or float64"]
    assert heavy == []


def test_functions_named_like_a_submodule_stay_functions():
    """``moelens.analyses.expert_distance`` (a function and a sub-package) and
    ``moelens.analyses.clustering.merge_cost`` (a function and a module) are the functions,
    whichever module was imported first."""
    code = (
        "import json, inspect\n"
        "import moelens.analyses.expert_distance.tables, moelens.analyses.clustering.merge_cost\n"
        "import moelens.analyses.router_alignment.config, moelens.analyses.module_metrics.analysis\n"
        "import moelens.analyses as A, moelens.analyses.clustering as C\n"
        "from moelens.analyses import expert_distance, router_alignment\n"
        "import moelens as ml\n"
        "print(json.dumps([inspect.isfunction(f) for f in (A.expert_distance, A.router_alignment, A.module_metrics, C.merge_cost,\n"
        "                  expert_distance, router_alignment, ml.expert_distance)] + [ml.merge_cost is C.merge_cost]))\n"
    )
    assert _fresh(code) == [True] * 8


def test_names_and_dir():
    import moelens.analyses as A
    import moelens.analyses.clustering as C
    from moelens.analyses.router_alignment.config import RouterAlignmentConfig

    assert set(A.__all__) <= set(dir(A)) and set(C.__all__) <= set(dir(C))
    assert A.RouterAlignmentConfig is RouterAlignmentConfig is moelens.RouterAlignmentConfig
    assert set(A.ANALYSES) == set(A.declarations()) >= {"router_alignment", "expert_distance", "module_metrics", "interventions",
                                                         "router_edits", "calibration", "clustering", "merge_cost", "router_norms"}
    with pytest.raises(AttributeError, match="no_such_name"):
        A.no_such_name  # noqa: B018
