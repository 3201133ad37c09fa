"""α, the WeightWatcher power-law exponent: against WeightWatcher 0.7.7's recorded numbers, a
plain loop over the candidates written from the definition, and spectra of known exponent."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from moelens.metrics import power_law
from moelens.metrics.module import single_metrics
from moelens.metrics.power_law import power_law_alpha, power_law_fit
from tests.metrics.data.weightwatcher_matrices import RECIPES, build

DATA = Path(__file__).resolve().parent / "data"
RECORDED = json.loads((DATA / "weightwatcher_alpha.json").read_text())["matrices"]


def loop_fit(evals: np.ndarray, floor: float = 1e-5) -> tuple[float, float, float]:
    """(α, x_min, D) by an explicit loop over the candidate x_min, from the definition in
    :mod:`moelens.metrics.power_law` (WeightWatcher 0.7.7's default fit); NaN without a fit."""
    x = sorted(float(v) for v in evals if v > floor)
    n_all = len(x)
    if n_all < 2:
        return math.nan, math.nan, math.nan
    small = n_all < 20
    best = (math.inf, math.nan, math.nan)  # (D, α, x_min)
    for i in range(n_all - 1):
        tail = x[i:]
        n = len(tail)
        s = sum(math.log(v / x[i]) for v in tail)
        if small:
            if n < 8 or s <= 1e-12:
                continue
            alpha = 1.0 + (n - 1.0) / s
        else:
            alpha = 1.0 + n / s if s > 0 else math.inf
        if not alpha > 1.0:
            continue
        d = max(abs(1.0 - (v / x[i]) ** (1.0 - alpha) - j / n) for j, v in enumerate(tail))
        if d < best[0]:
            best = (d, alpha, x[i])
    if math.isinf(best[0]):
        # small sample without a tail of 8: the whole sample
        s = sum(math.log(v / x[0]) for v in x)
        if s <= 1e-12:
            return math.nan, math.nan, math.nan
        alpha = 1.0 + (n_all - 1.0) / s
        d = max(abs(1.0 - (v / x[0]) ** (1.0 - alpha) - j / n_all) for j, v in enumerate(x))
        return alpha, x[0], d
    return best[1], best[2], best[0]


# ----------------------------------------------------------------------------------------------
# WeightWatcher 0.7.7, recorded (tests/metrics/data/README.md)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_alpha_matches_weightwatcher(name):
    rec = RECORDED[name]
    w = torch.from_numpy(build(name))
    assert list(w.shape) == rec["shape"]
    got = float(single_metrics(w, ["alpha"], device="cpu")["alpha"][0])
    if rec["alpha"] == -1.0:  # WeightWatcher's failed fit
        assert math.isnan(got)
        return
    # same eigenvalues up to rounding (float64 Gram here, float64 SVD there): the same candidate wins
    assert got == pytest.approx(rec["alpha"], rel=1e-9)
    fit = power_law_fit(np.linalg.svd(build(name).astype(np.float64), compute_uv=False) ** 2)
    assert fit.xmin == pytest.approx(rec["xmin"], rel=1e-9)
    assert fit.D == pytest.approx(rec["D"], rel=1e-6, abs=1e-12)
    assert fit.n_tail == rec["num_pl_spikes"]


def test_weightwatcher_record_covers_both_fits():
    """The record holds the large-sample fit, the small-sample fit and its whole-sample case."""
    n_evals = [r.get("num_evals") for r in RECORDED.values() if r.get("alpha", -1) != -1]
    shapes = [min(r["shape"]) for r in RECORDED.values()]
    assert max(shapes) >= 256 and min(shapes) < 20
    assert any(n is not None and n < 20 for n in n_evals)


# ----------------------------------------------------------------------------------------------
# The definition, by a plain loop
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [3, 7, 12, 19, 20, 57, 300])
def test_fit_matches_loop(seed, n):
    rng = np.random.default_rng(seed)
    evals = np.exp(rng.normal(0.0, 1.5, n)) * 1e-2
    if seed % 2:
        evals = np.concatenate([evals, rng.uniform(0, 1e-5, 5)])  # below the floor: dropped
    alpha, xmin, d = loop_fit(evals)
    fit = power_law_fit(evals)
    if math.isnan(alpha):
        assert math.isnan(fit.alpha)
        return
    assert fit.alpha == pytest.approx(alpha, rel=1e-10)
    assert fit.xmin == xmin
    assert fit.D == pytest.approx(d, rel=1e-9, abs=1e-14)
    assert fit.n_tail == int(np.sum(evals >= xmin))


def test_blocks_do_not_change_the_fit(monkeypatch):
    evals = np.random.default_rng(3).pareto(2.0, 700) + 0.5
    whole = power_law_fit(evals)
    monkeypatch.setattr(power_law, "BLOCK_ELEMENTS", 1000)  # 1 candidate … a few per block
    assert power_law_fit(evals) == whole


# ----------------------------------------------------------------------------------------------
# Known exponents
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("a,seed", [(2.0, 0), (2.5, 1), (3.0, 2), (4.5, 3)])
def test_recovers_pareto_exponent(a, seed):
    """λ drawn from p(λ) ∝ λ^(−a), λ ≥ 0.1: the MLE recovers a within its sampling error."""
    rng = np.random.default_rng(seed)
    lam = 0.1 * (1.0 - rng.random(4000)) ** (-1.0 / (a - 1.0))
    fit = power_law_fit(lam)
    assert fit.n_tail >= 200
    assert abs(fit.alpha - a) < 4.0 * (a - 1.0) / math.sqrt(fit.n_tail), (fit, a)


def test_recovers_exponent_of_a_matrix_spectrum():
    """W = U diag(√λ) Vᵀ with Pareto λ (a = 3): α of the matrix ≈ 3."""
    from tests.metrics.data.weightwatcher_matrices import pareto_spectrum

    w = torch.from_numpy(pareto_spectrum(21, (1500, 1000), 3.0, 0.05))
    alpha = float(single_metrics(w, ["alpha"], device="cpu")["alpha"][0])
    assert abs(alpha - 3.0) < 4.0 * 2.0 / math.sqrt(1000)


def test_scale_and_floor():
    rng = np.random.default_rng(5)
    lam = 0.1 * (1.0 - rng.random(500)) ** (-1.0 / 1.5)
    base = power_law_fit(lam)
    # scale invariant while every eigenvalue stays above the floor
    assert power_law_fit(lam * 7.0).alpha == pytest.approx(base.alpha, rel=1e-12)
    # eigenvalues ≤ 1e-5 (zeros of a rank-deficient matrix) are not part of the fit
    assert power_law_fit(np.concatenate([lam, np.zeros(300), np.full(10, 1e-5)])) == base
    assert power_law_fit(lam, floor=0.2).n_evals == int(np.sum(lam > 0.2))


def test_no_fit_is_nan():
    assert math.isnan(power_law_alpha(np.array([])))
    assert math.isnan(power_law_alpha(np.array([0.5])))
    assert math.isnan(power_law_alpha(np.zeros(30)))
    assert math.isnan(power_law_alpha(np.full(5, 0.3)))  # a small sample of equal values
    fit = power_law_fit(np.array([1e-6, 2.0]))
    assert math.isnan(fit.alpha) and fit.n_evals == 1


def test_alpha_nan_below_weightwatcher_min_evals():
    """WeightWatcher skips matrices with min(out, in) < 8."""
    w = torch.from_numpy(np.random.default_rng(0).standard_normal((64, 7)).astype(np.float32))
    out = single_metrics(w, ["alpha", "stable_rank"], device="cpu")
    assert math.isnan(out["alpha"][0]) and np.isfinite(out["stable_rank"][0])
