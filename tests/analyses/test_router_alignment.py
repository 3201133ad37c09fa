"""Router–expert alignment end to end: against a slow reference, planted signals, errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import moelens as ml
from moelens.analyses.router_alignment import default_ks
from moelens.errors import ConfigError, IndexOutOfRangeError, NotMoEError

from . import slow_reference as ref
from .synthetic import random_layers, write_from_tensors

TOL = 1e-5


def _reference_layer(model, L, role, ks):
    layer = model.layer(L)
    routers = ref.normalized_routers(layer.router().weight)
    bases = [ref.input_singular_vectors(layer.expert_matrix(e, role), role) for e in range(layer.n_experts)]
    return ref.energy_table(routers, bases, ks)


def _check_against_reference(run, model, null):
    opts = run.manifest["options"]
    ks = opts["k"]
    d = model.hidden_size
    table = run["alignment"].set_index(["layer", "matrix", "expert", "k"]).sort_index()
    layers = run["alignment_layers"].set_index(["layer", "matrix", "k"]).sort_index()
    pairs = run["alignment_pairs"].set_index(["layer", "matrix", "router", "expert", "k"]).sort_index()
    for L in opts["layers"]:
        for role in opts["matrices"]:
            a = _reference_layer(model, L, role, ks)
            n = len(a)
            # float32 moves energies at near-tied σ by more than TOL: per expert, the slack that
            # conditioning allows (slow_reference.float32_slack), and the worst of them for what pools experts
            slack = [ref.float32_slack(model.layer(L).expert_matrix(j, role), role, ks) for j in range(n)]
            for ki, k in enumerate(ks):
                tol = [TOL + slack[j][ki] for j in range(n)]
                pooled = max(tol)
                mu, sd = ref.exact_moments(a, ki, derangement=(null == "derangement"))
                perm_mean, var, p = ref.enumerated_layer_test(a, ki)
                zs, margins, hits = [], [], 0
                for e in range(n):
                    row = table.loc[(L, role, e, k)]
                    assert row["align"] == pytest.approx(a[e][e][ki], abs=tol[e])
                    assert row["random_expect_k_over_d"] == pytest.approx(k / d)
                    assert row["effect_over_random"] == pytest.approx(a[e][e][ki] - k / d, abs=tol[e])
                    assert row["shuffle_mean"] == pytest.approx(mu, abs=pooled)
                    assert row["shuffle_std"] == pytest.approx(sd, abs=pooled)
                    assert row["delta_vs_shuffle"] == pytest.approx(a[e][e][ki] - mu, abs=tol[e] + pooled)
                    if sd > 1e-3:
                        z = (a[e][e][ki] - mu) / sd
                        assert row["z_vs_shuffle"] == pytest.approx(z, abs=2 * pooled * (1 + abs(z)) / sd)
                        zs.append(z)
                    margin = a[e][e][ki] - max(a[e][j][ki] for j in range(n) if j != e)
                    assert row["margin"] == pytest.approx(margin, abs=2 * pooled)
                    margins.append(margin)
                    if k == 1:
                        assert row["cos_squared"] == pytest.approx(a[e][e][0], abs=tol[e])
                    else:
                        assert np.isnan(row["cos_squared"])
                    hits += margin > 1e-6  # own expert is the unique argmax
                    for j in range(n):
                        assert pairs.loc[(L, role, e, j, k), "energy"] == pytest.approx(a[e][j][ki], abs=tol[j])
                lay = layers.loc[(L, role, k)]
                assert lay["align"] == pytest.approx(np.mean([a[e][e][ki] for e in range(n)]), abs=pooled)
                assert lay["margin"] == pytest.approx(np.mean(margins), abs=2 * pooled)
                assert lay["argmax_accuracy"] == pytest.approx(hits / n)
                assert lay["n_experts"] == n
                assert lay["p_layer_method"] == "exact"
                if var > 1e-8:  # at k = d every S(π) is 1 up to rounding: z_layer is undefined
                    observed = np.mean([a[e][e][ki] for e in range(n)])
                    z_layer = (observed - perm_mean) / np.sqrt(var)
                    assert lay["z_layer"] == pytest.approx(z_layer, abs=pooled * (1 + abs(z_layer)) / np.sqrt(var))
                    assert lay["p_layer"] == pytest.approx(p, abs=1e-12)
                if zs and len(zs) == n:
                    assert lay["z_vs_shuffle"] == pytest.approx(np.mean(zs), rel=1e-3, abs=1e-3)


@pytest.mark.parametrize("null", ["derangement", "shuffle"])
def test_tiny_mixtral_matches_the_slow_reference(tiny_checkpoint, null):
    model = ml.open_model(tiny_checkpoint("mixtral"))
    run = ml.router_alignment(model, matrix="all", null=null, cache=False)
    assert run.manifest["options"]["k"] == default_ks(model.hidden_size) == [1, 2, 4, 8, 16, 32]
    _check_against_reference(run, model, null)


def test_tiny_qwen3_moe_with_f_below_d_matches_the_slow_reference(tiny_checkpoint):
    model = ml.open_model(tiny_checkpoint("qwen3_moe"))
    assert model.expert_ffn < model.hidden_size
    run = ml.router_alignment(model, matrix="all", k=[1, 3, 8, 24, 25, 32], cache=False)
    assert run.manifest["options"]["layers"] == model.moe_layers
    _check_against_reference(run, model, "derangement")
    t = run["alignment"]
    # beyond the rank F = 24 nothing is added, while k/d keeps growing
    at_rank = t[t.k == 24].reset_index(drop=True)
    for k in (25, 32):
        beyond = t[t.k == k].reset_index(drop=True)
        np.testing.assert_allclose(beyond["align"], at_rank["align"], atol=1e-7)
    assert (t[t.k == 32]["align"] < 1).all()


def test_bf16_sharded_fused_checkpoint_matches_the_reference(tiny_checkpoint):
    model = ml.open_model(tiny_checkpoint("mixtral", "fused", "bfloat16", True))
    run = ml.router_alignment(model, layers=[1], matrix="down", cache=False)
    _check_against_reference(run, model, "derangement")


def test_shuffle_sampled_reproduces_galemoe_for_one_layer(tiny_checkpoint):
    model = ml.open_model(tiny_checkpoint("mixtral"))
    ks = default_ks(model.hidden_size)
    run = ml.router_alignment(model, layers=[1], null="shuffle-sampled", shuffles=200, seed=0, cache=False)
    layer = model.layer(1)
    gen = torch.Generator()
    gen.manual_seed(0)
    rows = ref.galemoe_layer(layer.router().weight, [layer.expert_matrix(e, "gate") for e in range(layer.n_experts)], "gate", ks, 200, gen)
    theirs = pd.DataFrame(rows).set_index(["expert", "k"]).sort_index()
    mine = run["alignment"].set_index(["expert", "k"]).sort_index()
    for col in ("align", "shuffle_mean", "shuffle_std"):
        np.testing.assert_allclose(mine[col], theirs[col], atol=TOL, rtol=0)
    informative = theirs["shuffle_std"] > 1e-3  # at k = d both z's divide rounding noise
    np.testing.assert_allclose(mine["z_vs_shuffle"][informative], theirs["z_vs_shuffle"][informative], atol=1e-4, rtol=0)


def test_shuffle_sampled_restarts_the_stream_in_every_layer_like_galemoe_runs(tiny_checkpoint):
    model = ml.open_model(tiny_checkpoint("mixtral"))
    ks = [1, 4, 16]
    run = ml.router_alignment(model, layers=[0, 1], k=ks, null="shuffle-sampled", shuffles=50, seed=3, cache=False)
    for L in (0, 1):
        gen = torch.Generator()
        gen.manual_seed(3)  # GaleMoE's published runs: one layer per run, each from the seed
        layer = model.layer(L)
        rows = ref.galemoe_layer(layer.router().weight, [layer.expert_matrix(e, "gate") for e in range(4)], "gate", ks, 50, gen)
        theirs = pd.DataFrame(rows).set_index(["expert", "k"]).sort_index()
        mine = run["alignment"][run["alignment"].layer == L].set_index(["expert", "k"]).sort_index()
        np.testing.assert_allclose(mine["shuffle_mean"], theirs["shuffle_mean"], atol=TOL, rtol=0)
        np.testing.assert_allclose(mine["shuffle_std"], theirs["shuffle_std"], atol=TOL, rtol=0)


def test_eigh_and_svd_give_the_same_tables(tiny_checkpoint):
    model = ml.open_model(tiny_checkpoint("qwen3_moe"))
    a = ml.router_alignment(model, matrix="all", method="eigh", cache=False)
    b = ml.router_alignment(model, matrix="all", method="svd", cache=False)
    for name in ("alignment", "alignment_pairs"):
        num = [c for c in a[name].select_dtypes("number").columns if c != "z_vs_shuffle"]
        np.testing.assert_allclose(a[name][num].to_numpy(float), b[name][num].to_numpy(float), atol=TOL, rtol=0)
    # z = δ/σ divides the 1e-5 agreement by σ (~0.1 here)
    np.testing.assert_allclose(a["alignment"]["z_vs_shuffle"], b["alignment"]["z_vs_shuffle"], atol=TOL, rtol=1e-3)
    np.testing.assert_allclose(a["spectra"]["sigma"], b["spectra"]["sigma"], rtol=1e-4, atol=1e-5)


def test_planted_alignment_gives_align_one(tmp_path):
    n, d, f = 6, 40, 64
    routers, experts = random_layers(1, n, d, f, seed=1)
    for e in range(n):
        _, _, vh = torch.linalg.svd(experts[0]["gate"][e].double())
        routers[0][e] = 2.5 * vh[0].float()
    model = ml.open_model(write_from_tensors(tmp_path / "planted", "mixtral", routers, experts))
    run = ml.router_alignment(model, k=[1, 2, 40], cache=False)
    t = run["alignment"]
    k1 = t[t.k == 1]
    np.testing.assert_allclose(k1["align"], 1.0, atol=1e-6)
    np.testing.assert_allclose(k1["cos_squared"], 1.0, atol=1e-6)
    assert (k1["margin"] > 0.5).all()
    lay = run["alignment_layers"].set_index("k")
    assert lay.loc[1, "argmax_accuracy"] == 1.0
    assert lay.loc[1, "z_vs_shuffle"] > 5
    assert lay.loc[1, "z_layer"] > 3
    assert lay.loc[1, "p_layer"] == pytest.approx(1 / 720)


def test_isotropic_random_layer_shows_no_effect(tmp_path):
    """Gaussian experts and routers: align(k) ≈ k/d. Mean over E = 16 experts of a Beta(k/2,
    (d−k)/2) variable; tolerance 4 standard errors: 4·sqrt(2k(d−k)/(d²(d+2)) / E)."""
    n, d, f = 16, 64, 96
    routers, experts = random_layers(1, n, d, f, seed=2)
    run = ml.router_alignment(write_from_tensors(tmp_path / "iso", "mixtral", routers, experts), k=[1, 8, 32], cache=False)
    lay = run["alignment_layers"].set_index("k")
    for k in (1, 8, 32):
        tol = 4 * np.sqrt(2 * k * (d - k) / (d * d * (d + 2)) / n)
        assert abs(lay.loc[k, "align"] - k / d) <= tol
        assert abs(lay.loc[k, "effect_over_random"]) <= tol


def test_cache_second_run_hits_and_is_identical(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("mixtral")
    first = ml.router_alignment(path, cache_dir=tmp_path / "c")
    second = ml.router_alignment(path, cache_dir=tmp_path / "c")
    assert first.manifest["spectra_cache"]["misses"] == 8
    assert second.manifest["spectra_cache"]["hits"] == 8
    for name in first.tables:
        pd.testing.assert_frame_equal(first[name], second[name])


def test_layers_can_be_given_as_ranges_text(tiny_checkpoint):
    run = ml.router_alignment(tiny_checkpoint("mixtral"), layers="0-1", k=4, cache=False)
    assert run.manifest["options"]["layers"] == [0, 1]
    assert run.manifest["options"]["k"] == [4]


# -- errors ------------------------------------------------------------------------------------
def test_k_larger_than_d_is_a_config_error(tiny_checkpoint):
    with pytest.raises(ConfigError, match=r"k=33 .*d=32"):
        ml.router_alignment(tiny_checkpoint("mixtral"), k=[1, 33], cache=False)
    with pytest.raises(ConfigError):
        ml.router_alignment(tiny_checkpoint("mixtral"), k=[0], cache=False)


def test_unknown_options_are_config_errors(tiny_checkpoint):
    path = tiny_checkpoint("mixtral")
    for kwargs in ({"matrix": "w1"}, {"null": "bootstrap"}, {"method": "qr"}, {"dtype": "float16"}, {"shuffles": 0}, {"p_draws": 10}):
        with pytest.raises(ConfigError):
            ml.router_alignment(path, cache=False, **kwargs)


def test_dense_model_and_dense_layer_and_out_of_range(tiny_checkpoint):
    with pytest.raises(NotMoEError, match="dense"):
        ml.router_alignment(tiny_checkpoint("llama"), cache=False)
    qwen = tiny_checkpoint("qwen3_moe")
    with pytest.raises(NotMoEError, match="layer 0 .* dense"):
        ml.router_alignment(qwen, layers=[0], cache=False)
    with pytest.raises(IndexOutOfRangeError, match="layer 9"):
        ml.router_alignment(qwen, layers=[1, 9], cache=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_equals_cpu_run(tiny_checkpoint):
    path = tiny_checkpoint("qwen3_moe", "fused", "bfloat16")
    cpu = ml.router_alignment(path, matrix="all", device="cpu", cache=False)
    gpu = ml.router_alignment(path, matrix="all", device="cuda", cache=False)
    assert gpu.manifest["options"]["device"].startswith("cuda")
    for name in ("alignment", "alignment_pairs", "spectra"):
        num = [c for c in cpu[name].select_dtypes("number").columns if c != "z_vs_shuffle"]
        np.testing.assert_allclose(gpu[name][num].to_numpy(float), cpu[name][num].to_numpy(float), atol=TOL, rtol=1e-4)


def test_an_all_zero_router_row_or_expert_is_warned_about_not_silently_scored(tmp_path):
    routers, experts = random_layers(2, 4, 16, 24, seed=5)
    routers[0][2] = 0.0
    experts[1]["gate"][3] = 0.0
    path = write_from_tensors(tmp_path / "zeros", "mixtral", routers, experts)
    run = ml.router_alignment(path, k=[1, 4, 16], out=tmp_path / "run", cache=False)
    warnings = run.manifest["warnings"]
    assert any("router rows [2]" in w for w in warnings["L00000"])
    assert any("experts [3]" in w for w in warnings["L00001"])
    a = run["alignment"]
    assert (a[(a.layer == 0) & (a.expert == 2) & (a.k < 16)]["align"] == 0).all()  # what the warning is about
    from typer.testing import CliRunner

    from moelens.cli.app import app as cli_app

    result = CliRunner().invoke(cli_app, ["align", str(path), "--out", str(tmp_path / "run2"), "--k", "1,4,16"])
    assert result.exit_code == 0
    assert "warning: layer 0: router rows [2] are all zero" in result.output.replace("\n", " ")


def test_the_report_shows_a_runs_warnings(tmp_path):
    routers, experts = random_layers(1, 4, 16, 24, seed=6)
    routers[0][1] = 0.0
    path = write_from_tensors(tmp_path / "zeros", "mixtral", routers, experts)
    run = ml.router_alignment(path, k=[1, 16], cache=False)
    html = ml.build_report([run])
    assert "Warnings recorded by this run" in html and "router rows [1] are all zero" in html
