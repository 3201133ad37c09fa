"""The router-alignment run directory, as the report reads it: names, types, shapes of every table."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

import moelens as ml

ALIGNMENT = ["layer", "matrix", "expert", "k", "align", "random_expect_k_over_d", "effect_over_random",
             "shuffle_mean", "shuffle_std", "delta_vs_shuffle", "z_vs_shuffle", "cos_squared", "margin"]
LAYERS = ["layer", "matrix", "k", "align", "effect_over_random", "delta_vs_shuffle", "z_vs_shuffle", "margin",
          "argmax_accuracy", "shuffle_mean", "shuffle_std", "cos_squared", "z_layer", "p_layer", "p_layer_method",
          "n_experts"]
PAIRS = ["layer", "matrix", "router", "expert", "k", "energy"]
SPECTRA = ["layer", "matrix", "expert", "index", "sigma"]


@pytest.fixture(scope="module")
def run_dir(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("contract") / "run"
    ml.router_alignment(tiny_checkpoint("mixtral"), matrix="all", out=out, cache=False)
    return out


def _is_int(s: pd.Series) -> bool:
    return pd.api.types.is_integer_dtype(s)


def _is_float(s: pd.Series) -> bool:
    return pd.api.types.is_float_dtype(s)


def _is_str(s: pd.Series) -> bool:
    return pd.api.types.is_string_dtype(s) or s.map(type).eq(str).all()


def test_manifest(run_dir):
    run = ml.load_run(run_dir)
    m = run.manifest
    assert {"schema_version", "analysis", "label", "status", "completed_units", "created", "inputs", "options", "seed", "versions", "timings",
            "tables"} <= set(m)
    assert m["schema_version"] == 2 and "model" not in m and "completed_layers" not in m
    assert m["analysis"] == "router_alignment"
    assert m["status"] == "complete"
    assert m["label"] == "mixtral-per_expert-float32 L0-1"
    assert m["completed_units"] == ["L00000", "L00001"]
    assert dt.datetime.fromisoformat(m["created"]).utcoffset() == dt.timedelta(0)
    assert set(m["inputs"]) == {"a"} and run.model == m["inputs"]["a"]
    assert set(run.model) == {"source", "name", "path", "family", "n_layers", "n_experts", "top_k", "hidden_size", "expert_ffn", "files"}
    assert run.model["family"] == "mixtral" and run.model["hidden_size"] == 32 and run.model["n_experts"] == 4
    assert set(run.model["files"]) >= {"config.json", "model.safetensors"}
    assert {"layers", "matrix", "matrices", "k", "null", "shuffles", "seed", "method", "device", "dtype"} <= set(m["options"])
    assert m["options"]["matrices"] == ["gate", "up", "down"]
    assert m["options"]["matrix"] == "all" and m["options"]["null"] == "derangement"
    assert m["options"]["method"] == "eigh" and m["options"]["dtype"] == "float32" and m["options"]["device"] == "cpu"
    assert m["seed"] == 0
    assert {"torch", "numpy", "moelens"} <= set(m["versions"])
    assert m["timings"]["total_s"] > 0 and set(m["timings"]["per_unit_s"]) == {"L00000", "L00001"}


def test_tables_have_exactly_the_contract_columns_and_types(run_dir):
    run = ml.load_run(run_dir)
    assert set(run.tables) == {"alignment", "alignment_layers", "alignment_pairs", "spectra"}
    for name, cols in (("alignment", ALIGNMENT), ("alignment_layers", LAYERS), ("alignment_pairs", PAIRS), ("spectra", SPECTRA)):
        t = run[name]
        assert list(t.columns) == cols, name
        for c in cols:
            if c in ("layer", "expert", "k", "router", "index", "n_experts"):
                assert _is_int(t[c]), (name, c)
            elif c in ("matrix", "p_layer_method"):
                assert _is_str(t[c]), (name, c)
            else:
                assert _is_float(t[c]), (name, c)
    assert run["alignment_pairs"]["energy"].dtype == np.float32


def test_row_counts_and_invariants(run_dir):
    run = ml.load_run(run_dir)
    n_layers, n_matrices, n, d = 2, 3, 4, 32
    ks = run.manifest["options"]["k"]
    assert len(run["alignment"]) == n_layers * n_matrices * n * len(ks)
    assert len(run["alignment_layers"]) == n_layers * n_matrices * len(ks)
    assert len(run["alignment_pairs"]) == n_layers * n_matrices * n * n * len(ks)
    assert len(run["spectra"]) == n_layers * n_matrices * n * min(32, 48)
    t = run["alignment"]
    assert t["cos_squared"].notna().eq(t["k"] == 1).all()
    assert (t.groupby(["layer", "matrix", "k"])[["shuffle_mean", "shuffle_std"]].nunique() == 1).all().all()
    np.testing.assert_allclose(t["random_expect_k_over_d"], t["k"] / d)
    pairs = run["alignment_pairs"]
    own = pairs[pairs.router == pairs.expert].rename(columns={"router": "e"}).sort_values(["layer", "matrix", "e", "k"])
    merged = t.merge(own, left_on=["layer", "matrix", "expert", "k"], right_on=["layer", "matrix", "e", "k"])
    np.testing.assert_allclose(merged["align"], merged["energy"], atol=1e-7)
    s = run["spectra"]
    assert (s.groupby(["layer", "matrix", "expert"])["sigma"].apply(lambda x: bool((np.diff(x.to_numpy()) <= 1e-6).all()))).all()
    assert set(run["alignment_layers"]["p_layer_method"]) == {"exact"}
    assert (run["alignment_layers"]["n_experts"] == n).all()
