"""A slow, plain reference of router–expert alignment, written apart from moelens' code path.

It follows GaleMoE's published procedure: per expert a full ``torch.linalg.svd`` (float64 for the
reference tables, float32 where GaleMoE's own numbers are mimicked), then
one matrix–vector product per (router, expert, k) in Python loops, and for the sampled null
``shuffles`` calls of ``torch.randperm`` per k, pooling the values. Exact nulls and the layer test
are enumerated with plain loops. It reads weights with ``safetensors`` directly where asked.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence

import torch

EPS = 1e-12


def input_singular_vectors(weight: torch.Tensor, role: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Input-side singular vectors as columns [d, r]: right singular vectors of gate/up [F, d],
    left singular vectors of down [d, F] (its rows meet the hidden state). float64 by default:
    a float32 SVD moves subspace energies of nearly degenerate σ by ~2e-5, more than moelens'
    tolerance."""
    w = weight.to(dtype)
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    return u if role == "down" else vh.transpose(0, 1)


def float32_slack(weight: torch.Tensor, role: str, ks: Sequence[int]) -> list[float]:
    """How far one float32 decomposition may move the energy in the top-k input subspace, per k:
    ε₃₂ σ₁ / (σ_k − σ_{k+1}), the first-order (Wedin) bound on the subspace's rotation. Energies at
    a near-tie of σ_k and σ_{k+1} are ill-conditioned whatever the method, and which way float32
    rounding falls there depends on the CPU's kernels (seen: up to 0.66 of this bound, against a
    float64 SVD, on the tiny checkpoints; typically ≈ 3e-6 here). 0 where the subspace is the whole
    space (k ≥ r)."""
    s = torch.linalg.svdvals(weight.to(torch.float64)).tolist()
    eps = torch.finfo(torch.float32).eps
    out = []
    for k in ks:
        gap = s[k - 1] - s[k] if k < len(s) else math.inf
        out.append(eps * s[0] / gap if gap > 0 else math.inf)
    return out


def normalized_routers(router: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    r = router.to(dtype)
    return r / (r.norm(dim=1, keepdim=True) + EPS)


def energy(router_vec: torch.Tensor, basis: torch.Tensor, k: int) -> float:
    k = min(k, basis.shape[1])
    proj = basis[:, :k].transpose(0, 1) @ router_vec
    return float((proj * proj).sum().clamp(0.0, 1.0).item())


def energy_table(routers: torch.Tensor, bases: Sequence[torch.Tensor], ks: Sequence[int]) -> list[list[list[float]]]:
    """A[i][j][ki] with Python loops."""
    n = len(bases)
    return [[[energy(routers[i], bases[j], k) for k in ks] for j in range(n)] for i in range(n)]


def galemoe_shuffle_stats(routers, bases, ks, shuffles: int, generator: torch.Generator) -> dict[int, tuple[float, float]]:
    """GaleMoE's sampled null: for each k, ``shuffles`` randperm draws, values pooled,
    mean and Bessel std (+1e-12), in float32 like the original."""
    n = len(bases)
    stats = {}
    for k in ks:
        vals = []
        for _ in range(shuffles):
            perm = torch.randperm(n, generator=generator)
            for i in range(n):
                vals.append(energy(routers[i], bases[int(perm[i])], k))
        t = torch.tensor(vals)
        stats[int(k)] = (float(t.mean().item()), float(t.std().item() + EPS))
    return stats


def galemoe_layer(router: torch.Tensor, weights: Sequence[torch.Tensor], role: str, ks, shuffles, generator):
    """Per-expert results of one layer as GaleMoE computes them: rows (expert, k, align, mu, sd, z)."""
    routers = normalized_routers(router, torch.float32)  # GaleMoE computes in float32
    bases = [input_singular_vectors(w, role, torch.float32) for w in weights]
    stats = galemoe_shuffle_stats(routers, bases, ks, shuffles, generator)
    rows = []
    for e in range(len(bases)):
        for k in ks:
            a = energy(routers[e], bases[e], k)
            mu, sd = stats[int(k)]
            z = (a - mu) / sd if sd > EPS else 0.0
            rows.append({"expert": e, "k": int(k), "align": a, "shuffle_mean": mu, "shuffle_std": sd, "z_vs_shuffle": z})
    return rows


def exact_moments(table, ki: int, derangement: bool) -> tuple[float, float]:
    n = len(table)
    vals = [table[i][j][ki] for i in range(n) for j in range(n) if not (derangement and i == j)]
    return statistics.fmean(vals), statistics.pstdev(vals)


def permutation_sums(table, ki: int) -> list[float]:
    """S(π) for every permutation, in itertools order."""
    n = len(table)
    return [sum(table[i][p[i]][ki] for i in range(n)) / n for p in itertools.permutations(range(n))]


def enumerated_layer_test(table, ki: int) -> tuple[float, float, float]:
    """(mean, variance, p) of S(π) over all n! permutations; p counts S(π) ≥ S(id) − 1e-6."""
    n = len(table)
    sums = permutation_sums(table, ki)
    observed = sum(table[i][i][ki] for i in range(n)) / n
    mean = statistics.fmean(sums)
    var = statistics.pvariance(sums)
    p = sum(1 for s in sums if s >= observed - 1e-6) / math.factorial(n)
    return mean, var, p
