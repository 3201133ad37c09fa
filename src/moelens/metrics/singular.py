"""Singular factors of expert matrices for singular-vector alignment, one decomposition each.

Every matrix W [out, in] is taken in its tall orientation X [R, c] (R ≥ c): W itself, or Wᵀ when
out < in. The quantity sv_align reads, the truncated projector P⁽ⁿ⁾ = U_n V_nᵀ, only transposes
with W, and Frobenius inner products of two such projectors do not change when both transpose,
so the smaller Gram XᵀX [c, c] always gives

    XᵀX = V diag(σ²) Vᵀ,   U_n = X V_n diag(1/σ_n)   (σ descending).

How many directions a matrix keeps (docs/methods.md §2, §7):

    n_X = #{i : σ_i ≥ (γ − 1e-6) σ₁}          (γ cut; a σ within 1e-6·σ₁ of γσ₁ is kept)
    n_X = top_sv                                (fixed top-n)

both capped at the numerical rank #{σ_i > max(R, c)·ε₃₂·σ₁}: a direction of σ = 0 is not
determined by the matrix, and a zero matrix keeps none (n_X = 0, no sv_align). ε₃₂ is float32's
machine epsilon whatever the compute dtype: expert weights are stored in float32 or coarser, so
σ below that bound are the rounding noise of storage, whose directions mean nothing (and which a
float64 Gram cannot resolve either: its floor is √(c·ε₆₄)·σ₁ ≈ 1e-6·σ₁ at c = 4096).

Precision. A float32 Gram squares the condition number: the σ it resolves reach down to about
√(c·ε)·σ₁ ≈ 1e-3·σ₁, and U = XV/σ amplifies errors by σ₁/σ. With the default γ = 0.3 the kept
directions have σ ≥ 0.3·σ₁ and float32 is accurate (1e-6 in sv_align). When a matrix's own kept
spectrum reaches below ``FLOAT64_BELOW``·σ₁ (a small γ, or a large ``top_sv``), its Gram is
formed and decomposed again in float64, and its count n_X re-read from the float64 σ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moelens.spectral import gram

CUT_TOLERANCE = 1e-6
RANK_EPS = torch.finfo(torch.float32).eps
FLOAT64_BELOW = 0.05
DEFAULT_GRAM_BYTES = 256 * 2**20


def tall(w: torch.Tensor) -> torch.Tensor:
    """W [out, in] as X [R, c] with R ≥ c: W, or its transpose (a view)."""
    return w if w.shape[-2] >= w.shape[-1] else w.transpose(-1, -2)


@dataclass
class Factors:
    """Decompositions of K matrices of one shape, X [R, c] in tall orientation.

    ``sigma[k]`` [c] descending, ``basis[k]`` V [c, c] (columns v_i, in σ order), ``n`` [K] int64
    the kept count n_X, ``refined`` [K] bool whether the matrix was redone in float64 (its σ and
    V are then float64)."""

    sigma: list[torch.Tensor]
    basis: list[torch.Tensor]
    n: torch.Tensor
    refined: torch.Tensor


def kept_count(sigma: torch.Tensor, shape: tuple[int, int], gamma: float, top_sv: int | None) -> torch.Tensor:
    """n_X [K] for spectra ``sigma`` [K, c] (descending) of matrices of ``shape``."""
    s1 = sigma[:, :1]
    tol = s1 * (max(shape) * RANK_EPS)
    rank = ((sigma > tol) & (s1 > 0)).sum(-1)
    if top_sv is not None:
        return torch.clamp(rank, max=int(top_sv)).to(torch.int64)
    cut = (sigma >= (gamma - CUT_TOLERANCE) * s1).sum(-1)
    return torch.minimum(cut, rank).to(torch.int64)


def _eigh_desc(grams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """σ [K, c] descending and V [K, c, c] from Gram matrices [K, c, c]."""
    lam, vec = torch.linalg.eigh(grams)  # ascending
    return lam.flip(-1).clamp_min(0.0).sqrt(), vec.flip(-1)


def decompose(
    matrices: Sequence[torch.Tensor],
    gamma: float,
    top_sv: int | None,
    device: torch.device,
    dtype: torch.dtype,
    gram_bytes: int = DEFAULT_GRAM_BYTES,
) -> Factors:
    """Factors of every matrix [out, in] (all of one shape; any stored dtype and device), Grams
    decomposed in batches of at most ``gram_bytes``."""
    k = len(matrices)
    if k == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return Factors([], [], empty, empty.bool())
    x0 = tall(matrices[0])
    shape = (int(x0.shape[0]), int(x0.shape[1]))
    c = shape[1]
    per = max(1, gram_bytes // (2 * c * c * torch.finfo(dtype).bits // 8))  # Gram + eigenvectors
    if device.type == "cpu":
        # a batched eigh on the CPU runs the batch in parallel with LAPACK's own threads inside
        # (4–15× slower than one matrix at a time on two busy cores); CUDA gains from the batch
        per = 1
    sigma: list[torch.Tensor] = []
    basis: list[torch.Tensor] = []
    for g0 in range(0, k, per):
        grams = torch.stack([gram(tall(m).to(device=device, dtype=dtype)) for m in matrices[g0:g0 + per]])  # [g, c, c]
        s, v = _eigh_desc(grams)
        del grams
        sigma += list(s)
        basis += list(v)
    n = kept_count(torch.stack(sigma), shape, gamma, top_sv).cpu()
    refined = torch.zeros(k, dtype=torch.bool)
    if dtype != torch.float64:
        for i in range(k):
            if int(n[i]) > 0 and float(sigma[i][int(n[i]) - 1]) < FLOAT64_BELOW * float(sigma[i][0]):
                s, v = _eigh_desc(gram(tall(matrices[i]).to(device=device, dtype=torch.float64))[None])
                sigma[i], basis[i] = s[0], v[0]
                n[i] = int(kept_count(s, shape, gamma, top_sv)[0])
                refined[i] = True
    return Factors(sigma, basis, n, refined)
