"""Batched Gram–eigh and SVD spectra, and the projection coefficients built on them."""

from __future__ import annotations

import math

import pytest
import torch

from moelens.spectral import (
    INPUT_SIDE,
    OUTPUT_SIDE,
    cumulative_energies,
    gram,
    input_side,
    normalize_rows,
    project_experts,
    spectrum_of,
)


def _energies(weights: torch.Tensor, probes: torch.Tensor, role: str, method: str, ks, dtype=torch.float32, chunk_bytes=1) -> torch.Tensor:
    """A [experts, K, probes] through the streaming path."""
    out = torch.empty(weights.shape[0], len(ks), probes.shape[0], dtype=torch.float64)
    for chunk in project_experts(enumerate(weights), normalize_rows(probes.to(dtype)), role, method=method, dtype=dtype, chunk_bytes=chunk_bytes):
        out[chunk.experts] = cumulative_energies(chunk.coefficients, ks)
    return out


def _reference_energies(weights: torch.Tensor, probes: torch.Tensor, role: str, ks) -> torch.Tensor:
    """Per-expert float64 SVD, in a loop, the plain way."""
    r = probes.double() / probes.double().norm(dim=1, keepdim=True)
    out = torch.empty(weights.shape[0], len(ks), probes.shape[0], dtype=torch.float64)
    for j, w in enumerate(weights):
        u, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
        v = u if role == "down" else vh.T  # input side: columns of d-dim singular vectors
        for ki, k in enumerate(ks):
            out[j, ki] = ((v[:, :k].T @ r.T) ** 2).sum(0)
    return out


@pytest.mark.parametrize("f,d", [(48, 32), (16, 40), (32, 32)])
@pytest.mark.parametrize("role", ["gate", "down"])
def test_eigh_and_svd_agree_with_a_plain_svd(f, d, role):
    g = torch.Generator().manual_seed(f * 100 + d)
    shape = (5, d, f) if role == "down" else (5, f, d)
    weights = torch.randn(*shape, generator=g)
    probes = torch.randn(5, d, generator=g)
    rank = min(f, d)
    ks = sorted({1, 2, 7, rank, d})
    ref = _reference_energies(weights, probes, role, ks)
    for method in ("eigh", "svd"):
        got = _energies(weights, probes, role, method, ks)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        got64 = _energies(weights, probes, role, method, ks, dtype=torch.float64)
        torch.testing.assert_close(got64, ref, atol=1e-10, rtol=0)


def test_batched_chunks_equal_one_at_a_time():
    g = torch.Generator().manual_seed(3)
    weights = torch.randn(7, 24, 16, generator=g)
    probes = torch.randn(7, 16, generator=g)
    ks = [1, 4, 16]
    one = _energies(weights, probes, "gate", "eigh", ks, chunk_bytes=1)
    many = _energies(weights, probes, "gate", "eigh", ks, chunk_bytes=1 << 30)
    torch.testing.assert_close(one, many, atol=1e-6, rtol=0)


def test_energy_stops_growing_past_the_rank():
    """F < d: the input side has rank F, so A(k) for k > F equals A(F), and k = d is not 1."""
    g = torch.Generator().manual_seed(5)
    weights = torch.randn(3, 8, 32, generator=g)  # F = 8 < d = 32
    probes = torch.randn(3, 32, generator=g)
    for method in ("eigh", "svd"):
        a = _energies(weights, probes, "gate", method, [8, 9, 16, 32])
        torch.testing.assert_close(a[:, 1:], a[:, :1].expand(-1, 3, -1), atol=1e-7, rtol=0)
        assert (a[:, -1] < 0.99).all()


def test_rank_deficient_thin_side_drops_directions_in_both_methods():
    """F < d and rank 3 < F: directions of zero σ are not determined, both methods drop them."""
    g = torch.Generator().manual_seed(6)
    weights = torch.randn(2, 12, 3, generator=g) @ torch.randn(2, 3, 24, generator=g)  # [2, 12, 24]
    probes = torch.randn(2, 24, generator=g)
    for method in ("eigh", "svd"):
        spec = spectrum_of(weights.float(), method)
        assert spec.rank.tolist() == [3, 3]
        assert (spec.sigma[:, 3:] == 0).all()
        e = _energies(weights, probes, "gate", method, [3, 4, 12, 24])
        torch.testing.assert_close(e[:, 1:], e[:, :1].expand(-1, 3, -1), atol=1e-6, rtol=0)


def test_rank_deficient_full_side_keeps_a_complete_basis():
    """F ≥ d and rank 3 < d: the d input-side vectors still span R^d, so A(d) = 1."""
    g = torch.Generator().manual_seed(6)
    weights = torch.randn(2, 40, 3, generator=g) @ torch.randn(2, 3, 24, generator=g)  # [2, 40, 24]
    probes = torch.randn(2, 24, generator=g)
    for method in ("eigh", "svd"):
        e = _energies(weights, probes, "gate", method, [3, 24])
        torch.testing.assert_close(e[:, 1], torch.ones(2, 2, dtype=torch.float64), atol=1e-6, rtol=0)
        ref = _reference_energies(weights, probes, "gate", [3])
        torch.testing.assert_close(e[:, :1], ref, atol=1e-5, rtol=0)


def test_planted_router_on_the_top_singular_vector_gives_align_one():
    g = torch.Generator().manual_seed(7)
    weights = torch.randn(4, 48, 32, generator=g)
    probes = torch.randn(4, 32, generator=g)
    for j in range(4):
        _, _, vh = torch.linalg.svd(weights[j].double())
        probes[j] = 3.0 * vh[0].float()  # scale must not matter
    for method in ("eigh", "svd"):
        a = _energies(weights, probes, "gate", method, [1])
        diag = torch.diagonal(a[:, 0, :])
        torch.testing.assert_close(diag, torch.ones(4, dtype=torch.float64), atol=1e-6, rtol=0)


def test_isotropic_random_weights_give_k_over_d():
    """For Gaussian W (rotation invariant), the top-k input subspace is uniformly random, so
    A(k) ~ Beta(k/2, (d−k)/2) with mean k/d and variance 2k(d−k)/(d²(d+2)). The mean over the E
    routers and E experts must be within 4 standard errors, taking the E experts (the independent
    subspaces) as the sample size: |mean − k/d| ≤ 4·sqrt(var/E)."""
    g = torch.Generator().manual_seed(11)
    n, d, f = 24, 128, 256
    weights = torch.randn(n, f, d, generator=g)
    probes = torch.randn(n, d, generator=g)
    ks = [1, 8, 32, 64, 100]
    a = _energies(weights, probes, "gate", "eigh", ks)
    for ki, k in enumerate(ks):
        var = 2 * k * (d - k) / (d * d * (d + 2))
        tol = 4 * math.sqrt(var / n)
        assert abs(a[:, ki, :].mean().item() - k / d) <= tol, (k, a[:, ki, :].mean().item(), k / d, tol)


def test_sides_and_input_side_view():
    w = torch.randn(3, 10, 6)
    assert input_side(w, "down").shape == (3, 6, 10)
    assert input_side(w, "gate") is w
    assert spectrum_of(torch.randn(2, 10, 6), "eigh").side == INPUT_SIDE
    assert spectrum_of(torch.randn(2, 6, 10), "eigh").side == OUTPUT_SIDE
    assert spectrum_of(torch.randn(2, 6, 10), "svd").side == INPUT_SIDE


def test_eigh_singular_values_match_svd():
    g = torch.Generator().manual_seed(8)
    for shape in [(3, 50, 20), (3, 20, 50)]:
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        s_ref = torch.linalg.svdvals(x)
        torch.testing.assert_close(spectrum_of(x, "eigh").sigma, s_ref, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(spectrum_of(x, "svd").sigma, s_ref, atol=1e-10, rtol=1e-10)


def test_zero_router_row_has_zero_energy():
    probes = torch.zeros(2, 8)
    probes[1, 0] = 1.0
    a = _energies(torch.randn(2, 12, 8), probes, "gate", "eigh", [8])
    assert a[:, 0, 0].abs().max() == 0
    torch.testing.assert_close(a[:, 0, 1], torch.ones(2, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("role", ["gate", "down"])
def test_thin_side_keeps_weak_real_directions_in_float32(role):
    """F < d with singular values spread over 2.5 decades and routers partly in the weakest
    directions: a float32 Gram alone would drop those below σ_1·√(d ε) ≈ 1.6e-2 σ_1 and lose
    their energy; the float64 thin Gram keeps them, so eigh agrees with a float64 SVD."""
    g = torch.Generator().manual_seed(7)
    f, d, experts = 64, 2048, 3
    u, _ = torch.linalg.qr(torch.randn(f, f, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, f, generator=g, dtype=torch.float64))
    sigma = torch.logspace(0, -2.5, f, dtype=torch.float64)
    x = (u * sigma) @ v.T  # [F, d]
    weights = torch.stack([x.T if role == "down" else x] * experts).float()
    probes = (v[:, -8:] @ torch.randn(8, experts, generator=g, dtype=torch.float64)).T + 0.3 * torch.randn(experts, d, generator=g, dtype=torch.float64)
    ks = [1, 8, 32, 48, 64, d]
    ref = _reference_energies(weights, probes.float(), role, ks)
    for method in ("eigh", "svd"):
        torch.testing.assert_close(_energies(weights, probes.float(), role, method, ks), ref, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# Basis-free CPU path (tridiagonalisation, keep_basis=False) and the ?syrk Gram
# ----------------------------------------------------------------------------------------------
def _fast_energies(weights, probes, role, ks, dtype=torch.float32, chunk_bytes=1):
    out = torch.empty(weights.shape[0], len(ks), probes.shape[0], dtype=torch.float64)
    sigma = []
    for chunk in project_experts(enumerate(weights), normalize_rows(probes.to(dtype)), role, dtype=dtype, chunk_bytes=chunk_bytes, keep_basis=False):
        assert chunk.spectra.basis is None
        out[chunk.experts] = cumulative_energies(chunk.coefficients, ks)
        sigma.append(chunk.spectra.sigma)
    return out, torch.cat(sigma)


def _planted(singular_values: torch.Tensor, f: int, g: torch.Generator) -> torch.Tensor:
    """X = U diag(σ) Wᵀ [F, d] in float64 with Haar-random orthonormal U [F, d], W [d, d]."""
    d = singular_values.shape[0]
    u, _ = torch.linalg.qr(torch.randn(f, d, generator=g, dtype=torch.float64))
    w, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (u * singular_values) @ w.T


@pytest.mark.parametrize("role", ["gate", "down"])
def test_basis_free_path_agrees_with_a_float64_svd(role):
    """d = 96, F = 160: a generic matrix, one whose σ come in tied blocks (energies are only
    defined at block ends, where they are compared) and one of rank 40 < d (its zero σ are one
    block: A(40) and A(d) = 1)."""
    g = torch.Generator().manual_seed(21)
    f, d, p = 160, 96, 6
    ties = torch.tensor([10.0] * 5 + [7.0] * 20 + [3.0] * 30 + [1.0] * 41, dtype=torch.float64)
    generic = torch.randn(f, d, generator=g, dtype=torch.float64)
    tied = _planted(ties, f, g)
    deficient = torch.randn(f, 40, generator=g, dtype=torch.float64) @ torch.randn(40, d, generator=g, dtype=torch.float64)
    probes = torch.randn(p, d, generator=g, dtype=torch.float64)
    for x, ks in [(generic, [1, 2, 7, 50, 95, d]), (tied, [5, 25, 55, d]), (deficient, [1, 10, 40, d])]:
        weights = torch.stack([x.T if role == "down" else x] * 2)
        ref = _reference_energies(weights, probes, role, ks)
        s_ref = torch.linalg.svdvals(x)
        got64, s64 = _fast_energies(weights, probes, role, ks, torch.float64)
        torch.testing.assert_close(got64, ref, atol=1e-10, rtol=0)
        # σ² (what a Gram resolves): a zero σ comes back as √(ε‖XᵀX‖), not 0
        lam_ref = s_ref.square().expand(2, -1)
        torch.testing.assert_close(s64.square(), lam_ref, atol=1e-12 * float(lam_ref[0, 0]), rtol=0)
        got32, s32 = _fast_energies(weights.float(), probes.float(), role, ks)
        # float32 at d = 96 is good to ≈1e-6 whatever the route (the basis-keeping eigh path
        # reaches 1.1e-6 on some seeds), so 2e-6 here; float64 above is the strict check
        torch.testing.assert_close(got32, ref, atol=2e-6, rtol=0)
        torch.testing.assert_close(s32.double().square(), lam_ref, atol=1e-5 * float(lam_ref[0, 0]), rtol=0)


def test_basis_free_path_matches_the_basis_path_and_a_cache_keeps_the_basis(tmp_path):
    from moelens.spectral import SpectrumCache

    g = torch.Generator().manual_seed(22)
    weights = torch.randn(5, 48, 32, generator=g)
    probes = torch.randn(5, 32, generator=g)
    ks = [1, 4, 16, 32]
    # the two routes are the same mathematics: float64 is the strict check; float32 rounding
    # depends on the CPU's kernels (≈1e-6 at this size), so it gets the 2e-6 used above
    fast64, _ = _fast_energies(weights.double(), probes.double(), "gate", ks, torch.float64, chunk_bytes=1 << 30)
    with_basis64 = _energies(weights.double(), probes.double(), "gate", "eigh", ks, dtype=torch.float64)
    torch.testing.assert_close(fast64, with_basis64, atol=1e-10, rtol=0)
    fast, s_fast = _fast_energies(weights, probes, "gate", ks, chunk_bytes=1 << 30)
    with_basis = _energies(weights, probes, "gate", "eigh", ks)
    torch.testing.assert_close(fast, with_basis, atol=2e-6, rtol=0)
    chunks = list(project_experts(enumerate(weights), normalize_rows(probes), "gate", cache=SpectrumCache(tmp_path), keep_basis=False))
    assert all(c.spectra.basis is not None for c in chunks)
    # F < d has no basis-free path: the output-side basis is kept
    thin = list(project_experts(enumerate(weights.transpose(1, 2)), normalize_rows(torch.randn(5, 48, generator=g)), "gate", keep_basis=False))
    assert all(c.spectra.basis is not None and c.spectra.side == OUTPUT_SIDE for c in thin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_syrk_gram_equals_the_plain_product(dtype):
    """The CPU Gram (one triangle by ?syrk, mirrored) for C-ordered and transposed-view inputs,
    both sides, batched."""
    g = torch.Generator().manual_seed(23)
    w = torch.randn(3, 40, 24, generator=g, dtype=dtype)
    for x in (w, w.transpose(1, 2), w[0], w[0].T):
        xt = x.transpose(-1, -2)
        plain = xt @ x if x.shape[-2] >= x.shape[-1] else x @ xt
        got = gram(x)
        assert got.shape == plain.shape and got.dtype == dtype
        torch.testing.assert_close(got, plain, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-4 if dtype == torch.float32 else 1e-12)
        assert torch.equal(got, got.transpose(-1, -2))
