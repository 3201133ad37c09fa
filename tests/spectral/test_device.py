"""Device choice, full-precision matmul, and the CUDA path where a GPU exists."""

from __future__ import annotations

import pytest
import torch

from moelens.errors import ConfigError
from moelens.spectral import (
    cumulative_energies,
    full_precision,
    normalize_rows,
    project_experts,
    resolve_device,
    resolve_dtype,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_auto_picks_cuda_only_when_available():
    dev = resolve_device("auto")
    assert dev.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_device("cuda")


def test_unknown_device_and_dtype_are_config_errors():
    with pytest.raises(ConfigError):
        resolve_device("tpu")
    with pytest.raises(ConfigError):
        resolve_dtype("float16")


def test_full_precision_restores_settings():
    before = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32)
    torch.set_float32_matmul_precision("high")
    try:
        with full_precision():
            assert torch.get_float32_matmul_precision() == "highest"
            assert not torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cuda.matmul.allow_tf32 = before[1]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(6, 48, 32), (6, 16, 40)])
@pytest.mark.parametrize("method", ["eigh", "svd"])
def test_cuda_equals_cpu(shape, method):
    g = torch.Generator().manual_seed(0)
    weights = torch.randn(*shape, generator=g).to(torch.bfloat16)
    probes = normalize_rows(torch.randn(shape[0], shape[2], generator=g))
    ks = [1, 4, min(shape[1:])]
    results = {}
    for device in ("cpu", "cuda"):
        with full_precision():
            out = torch.empty(shape[0], len(ks), shape[0], dtype=torch.float64)
            for chunk in project_experts(enumerate(weights), probes, "gate", method=method, device=torch.device(device), chunk_bytes=1 << 30):
                out[chunk.experts] = cumulative_energies(chunk.coefficients, ks)
        results[device] = out
    torch.testing.assert_close(results["cuda"], results["cpu"], atol=1e-5, rtol=0)
