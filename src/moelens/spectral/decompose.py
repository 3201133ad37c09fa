"""Input-side singular structure of expert matrices, batched over experts.

Every matrix is first put on its input side, X ∈ R^{F×d}: gate and up as stored ([F, d]), down
transposed ([d, F] stored, X = W_downᵀ), so that the input-side singular vectors v_m ∈ R^d of
X = Σ_m σ_m u_m v_mᵀ are the directions of the hidden state the matrix reads.

Two methods:

- ``eigh`` (default): eigendecomposition of the smaller Gram matrix. For F ≥ d,
  XᵀX = V diag(σ²) Vᵀ (d×d) gives v_m directly. For F < d, XXᵀ = U diag(σ²) Uᵀ (F×F) is smaller
  and v_m = Xᵀu_m / σ_m; the basis is then kept on the output side (columns u_m) and a probe
  vector r is projected as c_m = u_mᵀ(X r)/σ_m, which never forms V.
- ``svd``: ``torch.linalg.svd`` of X itself, one expert at a time, for checking.

X has rank at most min(F, d). When F ≥ d the d input-side vectors form a complete orthonormal
basis of R^d (directions of zero σ span the null space of X and complete it), so the energy at
k = d is 1 and nothing is dropped. When F < d only F directions exist, and one of zero σ is not
determined by X (eigh cannot even form v_m = Xᵀu_m/σ_m): directions below the numerical-rank
tolerance are dropped (coefficient 0, σ reported as 0), so energies stop growing at the rank.
Both methods drop σ_m ≤ σ_1 · max(F, d) · ε, ε being the machine epsilon of the compute dtype.
A Gram squares the condition number: in float32 the F×F Gram of an F < d matrix cannot tell
directions below σ_1·√(d ε) (≈ 1.6 % of σ_1 at d = 2048) from nothing, and directions only a
little above that are mixed. So when a thin matrix's spectrum reaches below
``THIN_FLOAT64_BELOW`` · σ_1 in a float32 decomposition, its Gram is formed and decomposed again
in float64 (:func:`refine_thin`), which resolves what ``svd`` resolves. Well-conditioned experts
(σ_min/σ_1 ≈ 0.2 for a random 768×2048 matrix) keep the float32 speed.

On the CPU a Gram is formed by a symmetric rank-k update (BLAS ``?syrk``, one triangle, half the
flops of ``xᵀ @ x``). When only the coefficients c = Vᵀ R̂ᵀ of a few probes are wanted (F ≥ d, no
cache to fill; opt-in, see :mod:`moelens.spectral.projection`), :func:`tridiagonal_projection`
never forms V: ``eigh`` spends most of its time multiplying the tridiagonal eigenvectors back into
V (a d×d×d product), and the probes only need that product applied to P ≪ d vectors. Both go
through SciPy's BLAS/LAPACK, whose thread pool is its own: ``torch.set_num_threads`` does not
bound it (``OPENBLAS_NUM_THREADS`` does).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import blas, lapack

from moelens.choices import SPECTRAL_METHODS as METHODS
from moelens.errors import ConfigError

INPUT_SIDE = "input"    # basis columns are v_m ∈ R^d
OUTPUT_SIDE = "output"  # basis columns are u_m ∈ R^F, v_m = Xᵀ u_m / σ_m


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ConfigError(f"unknown spectral method {method!r}; expected one of {', '.join(METHODS)}")
    return method


def input_side(weight: torch.Tensor, role: str) -> torch.Tensor:
    """The matrix X [F, d] whose columns meet the hidden state: ``weight`` for gate/up ([F, d]),
    its transpose (a view) for down ([d, F] stored)."""
    return weight.transpose(-1, -2) if role == "down" else weight


def basis_side(n_rows: int, n_cols: int, method: str) -> str:
    """Which side the basis of an X [n_rows, n_cols] is kept on: the output side only for
    ``eigh`` when F < d (the F×F Gram is the smaller one)."""
    return OUTPUT_SIDE if method == "eigh" and n_rows < n_cols else INPUT_SIDE


@dataclass(frozen=True)
class SpectrumBatch:
    """Spectra of ``c`` matrices X [F, d] of one shape, r = min(F, d).

    ``sigma`` [c, r] descending (0 for dropped directions), ``basis`` [c, n, r] (n = d on the
    input side, n = F on the output side), or None when only the coefficients were computed
    (:func:`tridiagonal_projection`), ``rank`` [c] (int64) the number of directions kept (a
    prefix: r when F ≥ d, the numerical rank when F < d), ``side`` as above."""

    sigma: torch.Tensor
    basis: torch.Tensor | None
    rank: torch.Tensor
    side: str

    def __len__(self) -> int:
        return int(self.sigma.shape[0])

    def to(self, device: torch.device) -> SpectrumBatch:
        basis = None if self.basis is None else self.basis.to(device)
        return SpectrumBatch(self.sigma.to(device), basis, self.rank.to(device), self.side)

    @staticmethod
    def stack(items: list[tuple[torch.Tensor, torch.Tensor | None, int]], side: str) -> SpectrumBatch:
        """Build a batch from per-matrix ``(sigma [r], basis [n, r] or None, rank)`` items; the
        basis is None unless every item has one."""
        sigma = torch.stack([s for s, _, _ in items])
        bases = [b for _, b, _ in items]
        basis = None if any(b is None for b in bases) else torch.stack(bases)  # type: ignore[arg-type]
        rank = torch.tensor([int(k) for _, _, k in items], dtype=torch.int64, device=sigma.device)
        return SpectrumBatch(sigma, basis, rank, side)

    def item(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        return self.sigma[i], None if self.basis is None else self.basis[i], int(self.rank[i])

    def valid(self) -> torch.Tensor:
        """[c, r] boolean mask of the directions inside the numerical rank."""
        r = self.sigma.shape[-1]
        return torch.arange(r, device=self.sigma.device)[None, :] < self.rank[:, None]


THIN_FLOAT64_BELOW = 0.05


LAPACK_DTYPES = (torch.float32, torch.float64)


def _syrk_lower(x: torch.Tensor) -> np.ndarray:
    """The smaller Gram matrix of one X [F, d] on the CPU by BLAS ``?syrk``: only its lower
    triangle is computed, half the flops of a full product; the upper one is not to be read.
    Returned as a Fortran-ordered array, which LAPACK takes without a copy."""
    a = x.detach().numpy()  # shares memory; strides as stored
    syrk = blas.dsyrk if a.dtype == np.float64 else blas.ssyrk
    # BLAS sees a Fortran array. XᵀX from aᵀ (the Fortran view of a C-ordered X) without
    # transposing, or from a itself (an X that is a transposed view, e.g. down) with trans.
    thin = a.shape[0] < a.shape[1]  # XXᵀ wanted
    if a.T.flags.f_contiguous:
        return syrk(1.0, a.T, trans=1 if thin else 0, lower=1)
    return syrk(1.0, np.asfortranarray(a), trans=0 if thin else 1, lower=1)


def gram(x: torch.Tensor) -> torch.Tensor:
    """The smaller Gram matrix of X [..., F, d]: XᵀX (d×d) when F ≥ d, else XXᵀ (F×F).

    On the CPU (float32/float64) one triangle by ``?syrk``, mirrored into the other."""
    if x.device.type == "cpu" and x.dtype in LAPACK_DTYPES and not x.requires_grad and x.numel() > 0:
        flat = x.reshape(-1, x.shape[-2], x.shape[-1])
        out = []
        for xi in flat:
            lower = torch.from_numpy(_syrk_lower(xi))
            out.append(lower.tril() + lower.tril(-1).transpose(0, 1))
        return torch.stack(out).reshape(*x.shape[:-2], out[0].shape[0], out[0].shape[1])
    xt = x.transpose(-1, -2)
    return xt @ x if x.shape[-2] >= x.shape[-1] else x @ xt


def tridiagonal_projection(x: torch.Tensor, probes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """σ [d] descending and the coefficients C = Vᵀ R̂ᵀ [d, P] of the probes [P, d] on the
    input-side singular directions of one X [F, d], F ≥ d, on the CPU, without forming V.

    XᵀX = Q T Qᵀ (Householder tridiagonalisation, LAPACK ``?sytrd``, Q = H_1 ⋯ H_{d−1} kept as
    its reflectors) and T = Z Λ Zᵀ (divide and conquer, ``?stevd``) give V = Q Z, hence

        C = Zᵀ (Qᵀ R̂ᵀ),   Qᵀ R̂ᵀ = H_{d−1} ⋯ H_1 R̂ᵀ,

    O(d² P) for the reflectors instead of the O(d³) product Q Z. Each column of Z is fixed only up
    to sign, so c_m equals v_mᵀ r̂ up to sign; only c² is ever used. σ_m = √max(λ_m, 0). Computed
    in X's dtype (float32 or float64)."""
    n_rows, n_cols = int(x.shape[-2]), int(x.shape[-1])
    if n_rows < n_cols:
        raise ValueError("tridiagonal_projection needs F ≥ d")
    dtype = x.dtype
    double = dtype == torch.float64
    sytrd, sytrd_lwork, stevd = (
        (lapack.dsytrd, lapack.dsytrd_lwork, lapack.dstevd) if double
        else (lapack.ssytrd, lapack.ssytrd_lwork, lapack.sstevd)
    )
    g = _syrk_lower(x)
    # the default workspace (n) makes ?sytrd unblocked, about 3× slower
    lwork, info = sytrd_lwork(n_cols, lower=1)
    if info != 0:
        raise RuntimeError(f"?sytrd_lwork failed (info = {info})")
    refl, diag, off, tau, info = sytrd(g, lower=1, lwork=max(int(lwork), 1), overwrite_a=1)
    if info != 0:
        raise RuntimeError(f"?sytrd failed (info = {info})")
    y = np.array(probes.detach().to(dtype).numpy().T, order="C")  # R̂ᵀ [d, P]
    # reflector i (0-based) is I − τ_i w wᵀ, w zero above row i+1, 1 there, refl[i+2:, i] below
    # (LAPACK's lower storage); Qᵀ applies the first one first.
    for i in range(n_cols - 1):
        if tau[i] == 0.0:
            continue
        w = refl[i + 1:, i].copy()
        w[0] = 1.0
        y[i + 1:] -= tau[i] * np.outer(w, w @ y[i + 1:])
    lam, z, info = stevd(diag, off, compute_v=1)
    if info != 0:
        # ?stevd did not converge (not seen in practice): the full eigendecomposition instead
        lam_t, vec = torch.linalg.eigh(gram(x))
        lam, coef = lam_t.numpy(), (vec.transpose(0, 1) @ probes.to(dtype).transpose(0, 1)).numpy()
    else:
        coef = z.T @ y
    # ascending → descending, as everywhere else
    lam_desc = torch.from_numpy(np.ascontiguousarray(lam[::-1]))
    sigma = lam_desc.clamp_min(0.0).sqrt().to(dtype)
    return sigma, torch.from_numpy(np.ascontiguousarray(coef[::-1])).to(dtype)


def needs_float64(sigma: torch.Tensor) -> bool:
    """Whether a thin matrix's float32 spectrum (``sigma`` [r], descending, 0 where dropped)
    reaches low enough that its Gram must be redone in float64 (see the module docstring)."""
    return sigma.dtype != torch.float64 and bool(sigma[-1] < THIN_FLOAT64_BELOW * sigma[0])


def refine_thin(x: torch.Tensor, item: tuple[torch.Tensor, torch.Tensor, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The spectrum of one thin X [F, d] (F < d) from ``eigh``, redone from a float64 Gram when
    :func:`needs_float64` says so; returned in X's dtype."""
    if x.shape[-2] >= x.shape[-1] or not needs_float64(item[0]):
        return item
    return eigh_spectra(gram(x.to(torch.float64))[None], (x.shape[-2], x.shape[-1]), x.dtype).item(0)


def eigh_spectra(grams: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype | None = None) -> SpectrumBatch:
    """Spectra from Gram matrices [c, n, n] of matrices X of ``shape`` = (F, d), returned in
    ``dtype`` (default: the Grams' dtype), whose epsilon sets the rank tolerance.

    λ_m = σ_m² are the Gram's eigenvalues, re-ordered descending; the eigenvectors are v_m
    (F ≥ d) or u_m (F < d)."""
    n_rows, n_cols = shape
    dtype = grams.dtype if dtype is None else dtype
    lam, vec = torch.linalg.eigh(grams)  # ascending
    lam = lam.flip(-1).clamp_min(0.0)
    vec = vec.flip(-1)
    s = lam.sqrt()
    kept = _kept(s, s[:, :1] * (max(n_rows, n_cols) * torch.finfo(dtype).eps), n_rows, n_cols)
    sigma = torch.where(kept, s, torch.zeros_like(s))
    side = OUTPUT_SIDE if n_rows < n_cols else INPUT_SIDE
    return SpectrumBatch(sigma.to(dtype), vec.to(dtype), kept.sum(-1).to(torch.int64), side)


def _kept(values: torch.Tensor, tol: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    """Which directions to keep: all of a complete basis (F ≥ d), else those above ``tol``."""
    if n_rows >= n_cols:
        return torch.ones_like(values, dtype=torch.bool)
    return values > tol


def svd_spectra(x: torch.Tensor) -> SpectrumBatch:
    """Spectra of X [c, F, d] by ``torch.linalg.svd``; the basis is V [c, d, r] (input side)."""
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    n_rows, n_cols = x.shape[-2], x.shape[-1]
    kept = _kept(s, s[:, :1] * (max(n_rows, n_cols) * torch.finfo(s.dtype).eps), n_rows, n_cols)
    sigma = torch.where(kept, s, torch.zeros_like(s))
    return SpectrumBatch(sigma, vh.transpose(-1, -2), kept.sum(-1).to(torch.int64), INPUT_SIDE)


def spectrum_of(x: torch.Tensor, method: str) -> SpectrumBatch:
    """Spectra of X [c, F, d] (already on the compute device and dtype) by ``method``."""
    check_method(method)
    if method == "svd":
        return svd_spectra(x)
    batch = eigh_spectra(gram(x), (x.shape[-2], x.shape[-1]), x.dtype)
    if batch.side == INPUT_SIDE:
        return batch
    return SpectrumBatch.stack([refine_thin(x[i], batch.item(i)) for i in range(len(batch))], batch.side)
