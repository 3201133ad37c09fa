"""Null models of router–expert alignment, computed from the energy tensor A (docs/methods.md §1).

A[i, j, k] is the energy of router i on the top-k input subspace of expert j; arrays here are
numpy float64 of shape [E, E, K] (router, expert, k). A true pair is i = j.

- ``shuffle``: a uniformly random permutation π pairs router i with expert π(i), self pairs
  allowed; pooled over i, each of the E² entries is equally likely, so the exact null mean and
  std are those of all E² entries: μ = mean_{ij} A_ij, σ² = mean_{ij} (A_ij − μ)². Because 1/E
  of this null is true pairs, the mean z over experts cannot exceed about √(E−1).
- ``derangement`` (default): only mismatched pairs, i ≠ j; μ, σ over the E(E−1) off-diagonal
  entries.
- ``shuffle-sampled``: GaleMoE's procedure, to reproduce published numbers. One
  ``torch.Generator`` seeded with ``seed``; for each k in ascending order, ``shuffles`` calls of
  ``torch.randperm(E)``; the E·shuffles values A[i, π(i), k] are pooled; μ is their mean and σ
  their std with Bessel's correction plus 1e-12; z = δ/σ, and 0 where σ is only rounding.

Layer-level permutation test. S(π) = mean_i A[i, π(i), k], observed at π = identity. Under a
uniform π, E[S] = ā (the mean of A) and, by Hoeffding's combinatorial CLT,

    Var[S] = 1/(E²(E−1)) Σ_{ij} (A_ij − ā_i· − ā_·j + ā)²,

giving z_layer = (S(id) − ā)/√Var[S]. p_layer = P(S(π) ≥ S(id)): exact over all E! permutations
for E ≤ 8 (identity included, so p ≥ 1/E!), else Monte Carlo, p = (1 + #{S(π_b) ≥ S(id)})/(B + 1).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from moelens.analyses.router_alignment.config import MIN_P_DRAWS, NULLS, check_null  # noqa: F401 (their home is the torch-free config)
from moelens.errors import ConfigError

GALEMOE_EPSILON = 1e-12
EXACT_P_MAX_EXPERTS = 8
# Energies come from float32 (or float64) arithmetic; sums of E of them that differ by less than
# this are ties for the permutation test (counted as ≥, which keeps p conservative).
TIE_TOLERANCE = 1e-6
# A null spread below this is rounding, not signal (A = 1 for every pair at k = d): z is undefined.
ZERO_SPREAD = {"float32": 1e-5, "float64": 1e-10}


def exact_null_moments(a: np.ndarray, null: str) -> tuple[np.ndarray, np.ndarray]:
    """(μ [K], σ [K]) of the ``shuffle`` or ``derangement`` null, exactly (population std)."""
    n = a.shape[0]
    if null == "shuffle":
        values = a.reshape(n * n, -1)
    elif null == "derangement":
        values = a[~np.eye(n, dtype=bool)]  # [E(E-1), K]
    else:
        raise ConfigError(f"null {null!r} has no exact moments; expected shuffle or derangement")
    return values.mean(axis=0), values.std(axis=0, ddof=0)


def galemoe_permutations(n_experts: int, n_k: int, shuffles: int, generator: torch.Generator) -> np.ndarray:
    """[n_k, shuffles, E] permutations drawn exactly as GaleMoE draws them: for each k (ascending)
    ``shuffles`` successive calls of ``torch.randperm(E, generator=generator)``.

    The draws have to be successive calls to reproduce that random stream; all arithmetic on them
    is vectorised."""
    out = np.empty((n_k, shuffles, n_experts), dtype=np.int64)
    for k in range(n_k):
        for s in range(shuffles):
            out[k, s] = torch.randperm(n_experts, generator=generator).numpy()
    return out


def sampled_null_moments(a: np.ndarray, perms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(μ [K], σ [K]) of ``shuffle-sampled``: values A[i, π(i), k] pooled over i and draws,
    std with Bessel's correction, plus GaleMoE's 1e-12."""
    n = a.shape[0]
    n_k = a.shape[2]
    rows = np.arange(n)[None, None, :]
    ks = np.arange(n_k)[:, None, None]
    values = a[rows, perms, ks].reshape(n_k, -1)  # [K, shuffles * E]
    return values.mean(axis=1), values.std(axis=1, ddof=1) + GALEMOE_EPSILON


def z_scores(delta: np.ndarray, sd: np.ndarray, null: str, dtype: str = "float32") -> np.ndarray:
    """δ/σ broadcast over experts, where σ is above the rounding floor. Below it (k = d: every
    energy is 1) z is NaN for the exact nulls; ``shuffle-sampled`` gives 0 there, the value
    GaleMoE's rule (z = 0 unless σ > 1e-12) returns when the pooled energies are all equal."""
    with np.errstate(divide="ignore", invalid="ignore"):
        z = delta / sd
    informative = sd >= ZERO_SPREAD.get(dtype, ZERO_SPREAD["float32"])
    return np.where(informative, z, 0.0 if null == "shuffle-sampled" else np.nan)


def hoeffding_variance(a: np.ndarray) -> np.ndarray:
    """Var[S(π)] [K] under a uniform permutation π (Hoeffding's combinatorial CLT)."""
    n = a.shape[0]
    if n < 2:
        return np.zeros(a.shape[2])
    row = a.mean(axis=1, keepdims=True)
    col = a.mean(axis=0, keepdims=True)
    grand = a.mean(axis=(0, 1), keepdims=True)
    resid = a - row - col + grand
    return (resid ** 2).sum(axis=(0, 1)) / (n * n * (n - 1))


def all_permutations(n: int) -> np.ndarray:
    """Every permutation of range(n), [n!, n]."""
    return np.array(list(itertools.permutations(range(n))), dtype=np.int64).reshape(math.factorial(n), n)


def permutation_means(a: np.ndarray, perms: np.ndarray) -> np.ndarray:
    """S(π) = mean_i A[i, π(i), k] for each permutation row of ``perms`` [B, E] -> [B, K]."""
    n = a.shape[0]
    return a[np.arange(n)[None, :], perms, :].mean(axis=1)


def layer_permutation_test(
    a: np.ndarray, draws: int = MIN_P_DRAWS, rng: np.random.Generator | None = None, dtype: str = "float32"
) -> tuple[np.ndarray, np.ndarray, str]:
    """(z_layer [K], p_layer [K], p_layer_method) of the layer-level permutation test."""
    n, _, n_k = a.shape
    observed = np.einsum("iik->k", a) / n
    mean = a.mean(axis=(0, 1))
    sd = np.sqrt(hoeffding_variance(a))
    floor = ZERO_SPREAD.get(dtype, ZERO_SPREAD["float32"]) / math.sqrt(max(n, 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(sd >= floor, (observed - mean) / sd, np.nan)
    if n <= EXACT_P_MAX_EXPERTS:
        s = permutation_means(a, all_permutations(n))
        p = (s >= observed[None, :] - TIE_TOLERANCE).mean(axis=0)
        return z, p, "exact"
    if draws < MIN_P_DRAWS:
        raise ConfigError(f"p_draws={draws} is too few for a Monte Carlo p-value; use at least {MIN_P_DRAWS}")
    rng = rng if rng is not None else np.random.default_rng(0)
    count = np.zeros(n_k, dtype=np.int64)
    block = max(1, min(draws, 2_000_000 // max(n * n_k, 1)))
    base = np.arange(n)
    done = 0
    while done < draws:
        b = min(block, draws - done)
        perms = rng.permuted(np.tile(base, (b, 1)), axis=1)
        count += (permutation_means(a, perms) >= observed[None, :] - TIE_TOLERANCE).sum(axis=0)
        done += b
    return z, (1.0 + count) / (draws + 1.0), "monte_carlo"
