"""Every weight-space analysis on CUDA gives the CPU's tables (skipped without a CUDA device).

The decompositions run batched on the GPU in float32 (float64 where a spectrum needs it, as on
the CPU), so the two devices agree to float32 rounding, not bit for bit.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import moelens as ml

from .synthetic import random_layers, write_from_tensors

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("devices")
    # F < d (thin matrices, the float64 refinement) in one checkpoint, F > d in the other
    thin = write_from_tensors(root / "thin", "mixtral", *random_layers(2, 6, 48, 32, seed=1))
    wide = write_from_tensors(root / "wide", "mixtral", *random_layers(2, 6, 32, 56, seed=2))
    wide_b = write_from_tensors(root / "wide_b", "mixtral", *random_layers(2, 6, 32, 56, seed=3))
    return thin, wide, wide_b


def assert_close(cpu: ml.Run, gpu: ml.Run, atol: float = 2e-5) -> None:
    assert gpu.manifest["options"]["device"].startswith("cuda")
    for name in cpu.tables:
        a, b = cpu[name].reset_index(drop=True), gpu[name].reset_index(drop=True)
        assert list(a.columns) == list(b.columns) and len(a) == len(b), name
        for column in a.columns:
            if pd.api.types.is_float_dtype(a[column]):
                x, y = a[column].to_numpy(np.float64), b[column].to_numpy(np.float64)
                np.testing.assert_array_equal(np.isnan(x), np.isnan(y), err_msg=f"{name}.{column}")
                # z-scores are ratios of small spreads: compare them relative to their size
                np.testing.assert_allclose(y, x, rtol=1e-4, atol=atol, equal_nan=True, err_msg=f"{name}.{column}")
            else:
                assert (a[column].to_numpy() == b[column].to_numpy()).all(), f"{name}.{column}"


@pytest.mark.parametrize("null", ["derangement", "shuffle", "shuffle-sampled"])
@pytest.mark.parametrize("which", [0, 1])
def test_alignment_on_cuda_equals_cpu(models, null, which):
    ckpt = models[which]
    kwargs = dict(matrix="all", null=null, shuffles=30, cache=False)
    assert_close(ml.router_alignment(ckpt, device="cpu", **kwargs), ml.router_alignment(ckpt, device="cuda", **kwargs))


@pytest.mark.parametrize("gamma, top_sv", [(0.3, None), (0.01, None), (0.3, 20)])
def test_distance_on_cuda_equals_cpu(models, gamma, top_sv):
    thin, wide, wide_b = models
    for a, b in ((wide, wide_b), (thin, None)):
        kwargs = dict(gamma=gamma, top_sv=top_sv)
        assert_close(ml.expert_distance(a, b, device="cpu", **kwargs), ml.expert_distance(a, b, device="cuda", **kwargs))


def test_module_metrics_on_cuda_equal_cpu(tiny_checkpoint):
    # B = A stored in bfloat16: small, real differences. α and changed_frac are left out here:
    # each makes a discrete choice (the fit's x_min, a count against a threshold) that one
    # rounding can flip; tests/analyses/test_module_metrics.py checks them on CUDA against float64.
    a, b = tiny_checkpoint("qwen2_moe"), tiny_checkpoint("qwen2_moe", dtype="bfloat16")
    kwargs = dict(metrics=("corr", "cos", "rel_l2", "cka"), single=("fro_norm", "spectral_norm", "stable_rank", "effective_rank"))
    assert_close(ml.module_metrics(a, b, device="cpu", **kwargs), ml.module_metrics(a, b, device="cuda", **kwargs), atol=1e-4)
