"""Router norms (docs/methods.md §9), the README's worked example of adding an analysis: its numbers
against the router rows read straight from the safetensors file, and proof that the declaration
alone wired it into every outer layer (Python function, command, manifest, report section,
figure, atlas, contract test)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import moelens as ml
from moelens.analyses.router_norms import RouterNormsConfig
from tests.cli.helpers import run_moelens


def contract_case(tiny):
    """The contract test's case (tests/analyses/test_contract.py runs every check on it)."""
    return {"a": ml.open_model(tiny("mixtral"))}, RouterNormsConfig(layers=(1, 0))


def _router_rows(path: Path) -> dict[int, np.ndarray]:
    """Every layer's router [E, d], read from the checkpoint's files without moelens."""
    tensors: dict[str, np.ndarray] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    rows = {}
    for name, value in tensors.items():
        parts = name.split(".")
        if name.endswith("block_sparse_moe.gate.weight"):
            rows[int(parts[parts.index("layers") + 1])] = value.astype(np.float64)
    return rows


def test_norms_equal_the_rows_read_from_the_file(tiny_checkpoint):
    path = tiny_checkpoint("mixtral")
    run = ml.router_norms(path)
    rows = _router_rows(path)
    table = run["router_norms"]
    assert sorted(set(table["layer"])) == sorted(rows)
    for L, router in rows.items():
        part = table[table["layer"] == L].sort_values("expert")
        norms = np.sqrt((router ** 2).sum(axis=1))  # [E]
        np.testing.assert_allclose(part["router_norm"], norms, rtol=1e-12)
        np.testing.assert_allclose(part["relative_norm"], norms / norms.mean(), rtol=1e-12)
        layer = run["router_norms_layers"].set_index("layer").loc[L]
        assert layer["n_experts"] == len(norms)
        np.testing.assert_allclose([layer["mean_norm"], layer["std_norm"], layer["norm_cv"], layer["min_norm"], layer["max_norm"]],
                                   [norms.mean(), norms.std(), norms.std() / norms.mean(), norms.min(), norms.max()], rtol=1e-12)


def test_a_dense_model_is_refused_in_one_line(tiny_checkpoint):
    with pytest.raises(ml.MoelensError, match="no MoE layers; router norms need an MoE checkpoint"):
        ml.router_norms(tiny_checkpoint("llama"))


def test_the_declaration_wires_it_everywhere(tiny_checkpoint, tmp_path):
    from moelens.analyses.registry import ANALYSES, declarations
    from moelens.atlas import plan_atlas
    from moelens.figures import FIGURES, draw
    from moelens.report import build_report

    from .test_contract import _contract_case

    path = tiny_checkpoint("mixtral")
    # the registry and the contract test
    assert "router_norms" in declarations() and ANALYSES["router_norms"].title == "Router norms"
    assert _contract_case("router_norms") is contract_case
    # the Python function, its signature from the config
    params = inspect.signature(ml.router_norms).parameters
    assert list(params) == ["model", "layers", "out", "progress", "config", "executor"] and params["layers"].default is None
    # the command, its options from the config, the manifest's options from the config
    result = run_moelens("norms", path, "--out", tmp_path / "run", "--layers", "1")
    assert result.code == 0, result.stderr
    assert "router row norms" in result.stdout and "router_norms_layers.parquet" in result.stdout
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["analysis"] == "router_norms" and manifest["options"] == {"layers": [1]}
    bad = run_moelens("norms", path, "--out", tmp_path / "bad", "--layers", "7")
    assert bad.code == 2 and len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
    assert "--layers" in run_moelens("norms", "--help").stdout
    # the figure and the report section
    run = ml.load_run(tmp_path / "run")
    assert FIGURES["router_norm_heatmap"].analysis == "router_norms"
    assert draw("router_norm_heatmap", [run]).axes
    html = build_report([run])
    assert 'id="router-norms-run-1"' in html and 'id="explain-router_norm_heatmap"' in html and 'href="#explain-router_norm_heatmap"' in html
    # the atlas runs it, with its reproduce command
    steps, _ = plan_atlas(path, tmp_path / "atlas")
    step = next(s for s in steps if s.name == "router-norms-model")
    assert step.command == f"moelens norms {path} --out runs/router-norms-model"
    atlas_run = step.run(tmp_path / "atlas-run", None)
    assert atlas_run["router_norms"].equals(ml.router_norms(path)["router_norms"])
