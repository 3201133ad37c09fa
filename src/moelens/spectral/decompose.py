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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moelens.errors import ConfigError

METHODS = ("eigh", "svd")
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
    input side, n = F on the output side), ``rank`` [c] (int64) the number of directions kept
    (a prefix: r when F ≥ d, the numerical rank when F < d), ``side`` as above."""

    sigma: torch.Tensor
    basis: torch.Tensor
    rank: torch.Tensor
    side: str

    def __len__(self) -> int:
        return int(self.sigma.shape[0])

    def to(self, device: torch.device) -> SpectrumBatch:
        return SpectrumBatch(self.sigma.to(device), self.basis.to(device), self.rank.to(device), self.side)

    @staticmethod
    def stack(items: list[tuple[torch.Tensor, torch.Tensor, int]], side: str) -> SpectrumBatch:
        """Build a batch from per-matrix ``(sigma [r], basis [n, r], rank)`` items."""
        sigma = torch.stack([s for s, _, _ in items])
        basis = torch.stack([b for _, b, _ in items])
        rank = torch.tensor([int(k) for _, _, k in items], dtype=torch.int64, device=sigma.device)
        return SpectrumBatch(sigma, basis, rank, side)

    def item(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.sigma[i], self.basis[i], int(self.rank[i])

    def valid(self) -> torch.Tensor:
        """[c, r] boolean mask of the directions inside the numerical rank."""
        r = self.sigma.shape[-1]
        return torch.arange(r, device=self.sigma.device)[None, :] < self.rank[:, None]


THIN_FLOAT64_BELOW = 0.05


def gram(x: torch.Tensor) -> torch.Tensor:
    """The smaller Gram matrix of X [..., F, d]: XᵀX (d×d) when F ≥ d, else XXᵀ (F×F)."""
    xt = x.transpose(-1, -2)
    return xt @ x if x.shape[-2] >= x.shape[-1] else x @ xt


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
