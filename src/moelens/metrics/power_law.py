"""α: the power-law exponent of a weight matrix's eigenvalue spectrum, fitted as WeightWatcher does.

docs/methods.md §5 and §7 make WeightWatcher 0.7.7's ``alpha`` column, for the same matrix with the default
options of ``WeightWatcher.analyze``, the reference. That fit, written out from its definition:

1. The eigenvalues are λ_i = σ_i² of W [out, in] — the spectrum of WᵀW (or of WWᵀ: the non-zero
   ones are the same) — all min(out, in) of them, W as stored: no normalisation (``glorot_fix``
   and ``normalize`` are off by default; ``conv2d_norm`` touches only convolutions).
2. Eigenvalues at or below an *absolute* floor, λ ≤ 10⁻⁵ (its ``EVALS_THRESH``), are dropped. The
   floor is not relative to λ_max, so α depends on the scale of W when the spectrum reaches below
   it. No upper cut: ``xmax`` is unset and ``fix_fingers`` off by default.
3. With the kept eigenvalues sorted ascending, x_1 ≤ … ≤ x_N (the fit needs N ≥ 2), every value
   but the largest is a candidate x_min = x_i, whose tail is x_i … x_N (n_i = N − i + 1 values):

       α_i = 1 + n_i / Σ_{j ≥ i} ln(x_j / x_i)                     (continuous power-law MLE)
       D_i = max_{j ≥ i} | 1 − (x_j / x_i)^{1 − α_i} − (j − i) / n_i |   (α_i > 1; else D_i = 1)

   D_i is a one-sided Kolmogorov–Smirnov distance: the fitted CDF against the empirical CDF taken
   just below each tail point. The fit keeps the candidate of least D (the first on ties).
4. Fewer than 20 kept eigenvalues (N < 20) switch to a small-sample variant: only tails of
   n_i ≥ 8 values with Σ_{j ≥ i} ln(x_j / x_i) > 10⁻¹² are candidates (the others have D_i = 1),
   with the bias-corrected MLE α_i = 1 + (n_i − 1) / Σ_{j ≥ i} ln(x_j / x_i); the winner is again
   the first candidate of least D. (0.7.7's ``fit_powerlaw_smallN`` also ranks the candidates by
   J = D − 0.868/√n, but ``WWFit.__init__`` then overrides that choice with the argmin of D, so J
   never decides.) Without any candidate (N < 8) the whole sample is the tail: x_min = x_1,
   α = 1 + (N − 1) / Σ_j ln(x_j / x_1).

WeightWatcher skips matrices with min(out, in) < 8 (``min_evals``); :func:`power_law_fit` leaves
that to its caller (:mod:`moelens.metrics.module` returns NaN there). It returns NaN where
WeightWatcher has no fit: fewer than two eigenvalues above the floor (WeightWatcher: α = −1), or
a small sample without candidates whose eigenvalues are all equal (WeightWatcher: α = 0, an
unset slot). WeightWatcher also skips, by default, matrices with min(out, in) > 15000 or
max(out, in) > 50000 (cost limits, not part of the fit); moelens fits those too.

The code is written from the definition above, vectorised over the candidates (WeightWatcher
loops over them in Python); both cost O(N²) comparisons, done in blocks of bounded memory.
Where WeightWatcher's eigenvalues come from: on a machine without CUDA, ``scipy.linalg.svd`` of W
in float64; with CUDA, ``torch.linalg.svdvals`` in float32. The numbers recorded for the tests
(``tests/metrics/data/weightwatcher_alpha.json``) were made without CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

EVALS_FLOOR = 1e-5           # eigenvalues ≤ this are dropped (absolute, WeightWatcher's EVALS_THRESH)
SMALL_N = 20                 # fewer kept eigenvalues than this: the small-sample fit
SMALL_N_MIN_TAIL = 8         # the small-sample fit's shortest tail
DEGENERATE_LOG_SUM = 1e-12   # small-sample fit: a tail with Σ ln(x/x_min) at or below this is no candidate
MIN_EVALS = 8                # WeightWatcher skips matrices with fewer than this many eigenvalues
BLOCK_ELEMENTS = 1 << 22     # candidates × tail values per block of the KS computation (32 MiB float64)


@dataclass(frozen=True)
class PowerLawFit:
    """The fitted tail: ``alpha``; ``xmin`` its smallest eigenvalue; ``D`` the KS distance there;
    ``n_tail`` the eigenvalues ≥ xmin (WeightWatcher's ``num_pl_spikes``); ``sigma`` = (α − 1)/√n
    the MLE's standard error as WeightWatcher reports it; ``n_evals`` the eigenvalues above the
    floor. A fit without a result has NaN α, xmin, D, sigma and n_tail = 0."""

    alpha: float
    xmin: float
    D: float
    n_tail: int
    sigma: float
    n_evals: int


def _empty(n_evals: int = 0) -> PowerLawFit:
    nan = math.nan
    return PowerLawFit(alpha=nan, xmin=nan, D=nan, n_tail=0, sigma=nan, n_evals=n_evals)


def _ks_distances(x: np.ndarray, alphas: np.ndarray, active: np.ndarray) -> np.ndarray:
    """D_i for candidates i (x ascending [N]; alphas [N − 1]); 1 where not ``active``."""
    n_total = x.shape[0]
    n_cand = n_total - 1
    ds = np.ones(n_cand, dtype=np.float64)
    cols = np.arange(n_total)
    step = max(1, BLOCK_ELEMENTS // max(1, n_total))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for i0 in range(0, n_cand, step):
            i1 = min(n_cand, i0 + step)
            rows = np.arange(i0, i1)
            ok = active[i0:i1]
            if not ok.any():
                continue
            xmin = x[i0:i1, None]                                   # [b, 1]
            a = alphas[i0:i1, None]                                 # [b, 1]
            n = (n_total - rows)[:, None].astype(np.float64)        # [b, 1]
            fitted = 1.0 - (x[None, :] / xmin) ** (1.0 - a)         # [b, N]
            empirical = (cols[None, :] - rows[:, None]) / n         # [b, N]
            gap = np.abs(fitted - empirical)
            gap[cols[None, :] < rows[:, None]] = -np.inf            # only the tail j ≥ i
            d = gap.max(axis=1)
            ds[i0:i1] = np.where(ok, d, 1.0)
    return ds


def _suffix_log_sums(logx: np.ndarray) -> np.ndarray:
    """S_i = Σ_{j ≥ i} ln x_j − n_i ln x_i = Σ_{j ≥ i} ln(x_j/x_i) for i < N − 1, as a sum of
    non-negative gaps (no cancellation of two large sums)."""
    gaps = np.diff(logx)                          # [N − 1], ≥ 0: ln x_{k+1} − ln x_k
    n_total = logx.shape[0]
    # Σ_{j>i} (ln x_j − ln x_i) = Σ_{k ≥ i} gap_k · (N − 1 − k)
    weighted = gaps * (n_total - 1 - np.arange(n_total - 1))
    return np.cumsum(weighted[::-1])[::-1]


def power_law_fit(eigenvalues: np.ndarray, floor: float = EVALS_FLOOR) -> PowerLawFit:
    """The WeightWatcher power-law fit of ``eigenvalues`` (any order; λ = σ² of the matrix).

    Eigenvalues ≤ ``floor`` are dropped first (see the module docstring for the whole
    procedure). Raises nothing: without data the fit is NaN."""
    lam = np.asarray(eigenvalues, dtype=np.float64).ravel()
    x = np.sort(lam[np.isfinite(lam) & (lam > floor)])
    n_total = int(x.shape[0])
    if n_total < 2:
        return _empty(n_total)
    logx = np.log(x)
    s = _suffix_log_sums(logx)                                 # [N − 1]
    n = (n_total - np.arange(n_total - 1)).astype(np.float64)  # tail sizes [N − 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        if n_total >= SMALL_N:
            alphas = 1.0 + n / s
            active = alphas > 1.0
        else:
            active = (n >= SMALL_N_MIN_TAIL) & (s > DEGENERATE_LOG_SUM)
            alphas = np.where(active, 1.0 + (n - 1.0) / s, np.nan)
            if not active.any():
                # no tail long enough: the whole sample is the tail
                if s[0] <= DEGENERATE_LOG_SUM:
                    return _empty(n_total)
                active = np.arange(n_total - 1) == 0
                alphas = np.where(active, 1.0 + (n_total - 1.0) / s[0], np.nan)
    ds = _ks_distances(x, alphas, active)
    best = int(np.argmin(ds))
    alpha = float(alphas[best])
    xmin = float(x[best])
    return PowerLawFit(alpha=alpha, xmin=xmin, D=float(ds[best]), n_tail=int(np.count_nonzero(x >= xmin)),
                       sigma=(alpha - 1.0) / math.sqrt(float(n[best])), n_evals=n_total)


def power_law_alpha(eigenvalues: np.ndarray, floor: float = EVALS_FLOOR) -> float:
    """α of :func:`power_law_fit` (NaN without any eigenvalue above ``floor``)."""
    return power_law_fit(eigenvalues, floor).alpha
