"""Random expert stacks for the distance tests."""

from __future__ import annotations

import numpy as np
import torch

from moelens.metrics import RoleDistances

TOL = 1e-5


def gaussian(n: int, shape: tuple[int, int], seed: int) -> torch.Tensor:
    """[n, out, in] i.i.d. normal entries: a dense spectrum, many σ near the cut."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g)


def decaying(n: int, shape: tuple[int, int], seed: int, tau: float = 6.0) -> torch.Tensor:
    """[n, out, in] U diag(σ) Vᵀ with σ_i ≈ exp(−i/τ) + a small floor: a trained-looking spectrum."""
    g = torch.Generator().manual_seed(seed)
    r = min(shape)
    out = []
    for _ in range(n):
        u, _ = torch.linalg.qr(torch.randn(shape[0], r, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(shape[1], r, generator=g, dtype=torch.float64))
        s = torch.exp(-torch.arange(r, dtype=torch.float64) / tau) * (1 + 0.1 * torch.rand(r, generator=g, dtype=torch.float64)) + 0.02
        s, _ = s.sort(descending=True)
        out.append((u * s) @ v.T)
    return torch.stack(out).float()


def perturbed(a: torch.Tensor, eps: float, seed: int) -> torch.Tensor:
    """a + noise of relative Frobenius size ``eps`` per matrix."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(a.shape, generator=g, dtype=torch.float64)
    scale = a.double().flatten(1).norm(dim=1) / noise.flatten(1).norm(dim=1)
    return (a.double() + eps * scale[:, None, None] * noise).float()


def assert_matches(got: RoleDistances, ref: dict[str, list], tol: float = TOL) -> None:
    """Agreement with :func:`tests.metrics.reference.pair_table`, NaN where the reference has NaN."""
    np.testing.assert_array_equal(got.n_sv, ref["n_sv"])
    np.testing.assert_allclose(got.rel_l2, ref["rel_l2"], rtol=0, atol=tol)
    np.testing.assert_allclose(got.sv_align, ref["sv_align"], rtol=0, atol=tol)
    np.testing.assert_allclose(got.overlap / np.maximum(got.n_sv, 1), np.asarray(ref["overlap"]) / np.maximum(ref["n_sv"], 1), rtol=0, atol=tol)
