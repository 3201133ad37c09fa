"""Null models and the layer permutation test against brute-force enumeration."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from moelens.analyses.router_alignment.nulls import (
    exact_null_moments,
    galemoe_permutations,
    hoeffding_variance,
    layer_permutation_test,
    sampled_null_moments,
    z_scores,
)
from moelens.errors import ConfigError


def _energies(n: int, n_k: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = np.sort(rng.uniform(0, 1, size=(n, n, n_k)), axis=2)  # cumulative energies grow with k
    a[np.arange(n), np.arange(n)] += 0.1  # some alignment of true pairs
    return np.clip(a, 0, 1)


def _pooled_over_permutations(a: np.ndarray, derangements_only: bool) -> np.ndarray:
    """Every value A[i, π(i), k], over every permutation π (or derangement) and every i: [values, K]."""
    n = a.shape[0]
    vals = []
    for perm in itertools.permutations(range(n)):
        if derangements_only and any(perm[i] == i for i in range(n)):
            continue
        vals.extend(a[i, perm[i]] for i in range(n))
    return np.array(vals)


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_exact_moments_equal_enumeration_of_all_permutations(n):
    a = _energies(n, seed=n)
    for null, only_derangements in (("shuffle", False), ("derangement", True)):
        pooled = _pooled_over_permutations(a, only_derangements)
        mu, sd = exact_null_moments(a, null)
        np.testing.assert_allclose(mu, pooled.mean(axis=0), rtol=0, atol=1e-12)
        np.testing.assert_allclose(sd, pooled.std(axis=0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [2, 3, 6, 8])
def test_hoeffding_variance_equals_enumeration(n):
    a = _energies(n, seed=10 + n)
    sums = np.array([[a[i, p[i], k] for i in range(n)] for p in itertools.permutations(range(n)) for k in range(a.shape[2])])
    sums = sums.reshape(math.factorial(n), a.shape[2], n).mean(axis=2)
    np.testing.assert_allclose(hoeffding_variance(a), sums.var(axis=0), rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(a.mean(axis=(0, 1)), sums.mean(axis=0), rtol=0, atol=1e-12)


def test_exact_p_value_counts_every_permutation():
    n = 6
    a = _energies(n, seed=3)
    z, p, method = layer_permutation_test(a)
    assert method == "exact"
    observed = np.einsum("iik->k", a) / n
    for k in range(a.shape[2]):
        sums = [np.mean([a[i, perm[i], k] for i in range(n)]) for perm in itertools.permutations(range(n))]
        assert p[k] == pytest.approx(sum(s >= observed[k] - 1e-6 for s in sums) / math.factorial(n), abs=1e-15)
        expect_z = (observed[k] - np.mean(sums)) / np.std(sums)
        assert z[k] == pytest.approx(expect_z, rel=1e-9)


def test_monte_carlo_p_value_for_many_experts_is_reproducible_and_sensible():
    n = 12
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 0.2, size=(n, n, 2))
    a[np.arange(n), np.arange(n), 1] += 0.5  # strongly aligned at the second k only
    z1, p1, method = layer_permutation_test(a, 10_000, np.random.default_rng(7))
    z2, p2, _ = layer_permutation_test(a, 10_000, np.random.default_rng(7))
    assert method == "monte_carlo"
    assert np.array_equal(p1, p2) and np.array_equal(z1, z2)
    assert p1[1] == pytest.approx(1 / 10_001)
    assert 0.05 < p1[0] <= 1
    with pytest.raises(ConfigError):
        layer_permutation_test(a, 100, np.random.default_rng(0))


def test_galemoe_permutations_are_successive_randperm_calls():
    g1 = torch.Generator().manual_seed(42)
    perms = galemoe_permutations(5, 3, 4, g1)
    g2 = torch.Generator().manual_seed(42)
    expected = [torch.randperm(5, generator=g2).tolist() for _ in range(12)]
    assert perms.reshape(12, 5).tolist() == expected


def test_sampled_moments_reproduce_and_converge_to_the_exact_shuffle_moments():
    n = 6
    a = _energies(n, seed=5)
    def draw(s):
        return galemoe_permutations(n, a.shape[2], s, torch.Generator().manual_seed(9))
    m1, s1 = sampled_null_moments(a, draw(50))
    m2, s2 = sampled_null_moments(a, draw(50))
    assert np.array_equal(m1, m2) and np.array_equal(s1, s2)
    mu, sd = exact_null_moments(a, "shuffle")
    big_m, big_s = sampled_null_moments(a, draw(20_000))
    # 120 000 pooled values: the standard error of the mean is sd/√(20000·E) ≈ sd/350
    np.testing.assert_allclose(big_m, mu, atol=5 * sd.max() / math.sqrt(20_000 * n))
    np.testing.assert_allclose(big_s, sd, rtol=0.01)


def test_z_scores_rules():
    delta = np.array([0.1, 0.0, 0.2, 1e-7])
    sd = np.array([0.05, 1e-9, 1e-13, 2e-7])
    np.testing.assert_allclose(z_scores(delta, sd, "derangement"), [2.0, np.nan, np.nan, np.nan])
    np.testing.assert_allclose(z_scores(delta, sd, "shuffle-sampled"), [2.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(z_scores(delta, sd, "shuffle", "float64"), [2.0, 0.0, np.nan, 0.5])
