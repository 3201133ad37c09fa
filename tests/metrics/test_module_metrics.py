"""Module metrics (docs/methods.md §5) against a plain float64 numpy reference written apart from moelens."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moelens.errors import ConfigError
from moelens.metrics.module import (
    PAIR_METRICS,
    SINGLE_METRICS,
    check_metric_names,
    metrics_from_spectra,
    pair_and_single_metrics,
    pair_metrics,
    single_metrics,
    spectra,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SHAPES = [(48, 32), (32, 80), (130, 130), (200, 24)]
SMALL_CHUNK = 2048  # bytes: several chunks per matrix even at these sizes


# ----------------------------------------------------------------------------------------------
# Reference: numpy, float64, one matrix at a time, formulas as written in docs/methods.md §5
# ----------------------------------------------------------------------------------------------
def ref_pair(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-3) -> dict[str, float]:
    a, b = a.double().numpy(), b.double().numpy()
    fa, fb = a.ravel(), b.ravel()
    na, nb = np.linalg.norm(fa), np.linalg.norm(fb)
    with np.errstate(all="ignore"):
        corr = np.corrcoef(fa, fb)[0, 1] if fa.std() > 0 and fb.std() > 0 else math.nan
        cos = fa @ fb / (na * nb) if na > 0 and nb > 0 else math.nan
        rel = np.linalg.norm(a / na - b / nb) if na > 0 and nb > 0 else math.nan
        x = a.T - a.T.mean(axis=0)  # X = Aᵀ [in, out], columns centred over the inputs
        y = b.T - b.T.mean(axis=0)
        den = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)  # out×out forms, as written
        cka = np.linalg.norm(y.T @ x) ** 2 / den if den > 0 else math.nan
        sd = a.std()  # ddof 0
        changed = float(np.mean(np.abs(a - b) > tol * sd)) if sd > 0 else math.nan
    return {"corr": corr, "cos": cos, "rel_l2": rel, "cka": cka, "changed_frac": changed}


def ref_single(w: torch.Tensor) -> dict[str, float]:
    m = w.double().numpy()
    s = np.linalg.svd(m, compute_uv=False)
    fro = np.linalg.norm(m)
    if s[0] == 0:
        return {"fro_norm": fro, "spectral_norm": 0.0, "stable_rank": math.nan, "effective_rank": math.nan}
    kept = s[s > max(m.shape) * np.finfo(np.float32).eps * s[0]]
    p = kept / kept.sum()
    return {"fro_norm": fro, "spectral_norm": s[0], "stable_rank": fro**2 / s[0] ** 2,
            "effective_rank": float(np.exp(-np.sum(p * np.log(p))))}


def pair_case(shape: tuple[int, int], n: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B = A + relative noise 1e-2 + a shift of some rows: a fine-tune-like pair."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, *shape, generator=g) * 0.02
    b = a + 2e-4 * torch.randn(n, *shape, generator=g) + 1e-3 * torch.randn(n, shape[0], 1, generator=g)
    return a.to(dtype), b.to(dtype)


def assert_pair_matches(got: dict[str, np.ndarray], a: torch.Tensor, b: torch.Tensor, tol: float = 1e-3, atol: float = 1e-12):
    for k in range(a.shape[0]):
        ref = ref_pair(a[k], b[k], tol)
        for name, arr in got.items():
            if math.isnan(ref[name]):
                assert math.isnan(arr[k]), (name, k)
            else:
                assert arr[k] == pytest.approx(ref[name], rel=1e-10, abs=atol), (name, k, arr[k], ref[name])


# ----------------------------------------------------------------------------------------------
# Pair metrics
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chunk", [SMALL_CHUNK, 1 << 24])
def test_pair_matches_reference(shape, dtype, chunk):
    a, b = pair_case(shape, 3, seed=sum(shape), dtype=dtype)
    got = pair_metrics(a, b, device="cpu", chunk_bytes=chunk)
    assert set(got) == set(PAIR_METRICS)
    assert all(v.shape == (3,) and v.dtype == np.float64 for v in got.values())
    assert_pair_matches(got, a, b)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_pair_unrelated_and_tol(shape):
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(2, *shape, generator=g), torch.randn(2, *shape, generator=g)
    assert_pair_matches(pair_metrics(a, b, device="cpu", chunk_bytes=SMALL_CHUNK), a, b)
    a2, b2 = pair_case(shape, 2, seed=3, dtype=torch.float32)
    for tol in (0.0, 0.05, 2.0):
        got = pair_metrics(a2, b2, ["changed_frac"], tol=tol, device="cpu")
        assert_pair_matches(got, a2, b2, tol=tol)


def test_changed_frac_by_hand():
    """std(A) = 1 with ddof 0 (1.069 with ddof 1; the root mean square is 1.41); |A − B| > tol·std strictly."""
    a = torch.tensor([[2.0, 0.0, 2.0, 0.0], [2.0, 0.0, 2.0, 0.0]])
    d = torch.tensor([[0.0, 1.05, 0.5, 1.0], [-2.0, 0.0, 0.0, 0.0]])
    b = a + d
    assert pair_metrics(a, b, ["changed_frac"], tol=1.0, device="cpu")["changed_frac"][0] == 2 / 8
    assert pair_metrics(a, b, ["changed_frac"], tol=0.0, device="cpu")["changed_frac"][0] == 4 / 8
    assert pair_metrics(a, b, ["changed_frac"], tol=0.4, device="cpu")["changed_frac"][0] == 4 / 8
    assert pair_metrics(a, b, ["changed_frac"], tol=0.6, device="cpu")["changed_frac"][0] == 3 / 8


@pytest.mark.parametrize("shape", [(48, 32), (32, 80)])
def test_pair_known_cases(shape):
    a, _ = pair_case(shape, 1, seed=1, dtype=torch.float32)
    same = pair_metrics(a, a.clone(), device="cpu")
    for name, value in {"corr": 1.0, "cos": 1.0, "rel_l2": 0.0, "cka": 1.0, "changed_frac": 0.0}.items():
        assert same[name][0] == pytest.approx(value, abs=1e-12), name
    neg = pair_metrics(a, -a, device="cpu")
    for name, value in {"corr": -1.0, "cos": -1.0, "rel_l2": 2.0, "cka": 1.0}.items():
        assert neg[name][0] == pytest.approx(value, abs=1e-12), name
    assert neg["changed_frac"][0] == pytest.approx(float(np.mean(np.abs(2 * a.double().numpy()) > 1e-3 * a.double().numpy().std())))
    assert neg["changed_frac"][0] > 0.99
    for c in (2.0, 0.37):  # a power of two is exact in float32; 0.37 rounds each entry
        scaled = pair_metrics(a, c * a, device="cpu")
        for name, value in {"corr": 1.0, "cos": 1.0, "rel_l2": 0.0, "cka": 1.0}.items():
            assert scaled[name][0] == pytest.approx(value, abs=1e-7), (c, name)


@pytest.mark.parametrize("shape", [(48, 32), (32, 80)])
def test_cka_sees_through_output_rotations(shape):
    """CKA is unchanged (= 1) when B's output neurons are permuted or rotated; corr/cos are not."""
    a, _ = pair_case(shape, 1, seed=2, dtype=torch.float64)
    perm = torch.randperm(shape[0], generator=torch.Generator().manual_seed(0))
    q, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    for b in (a[:, perm], q @ a):
        got = pair_metrics(a, b, device="cpu")
        assert got["cka"][0] == pytest.approx(1.0, abs=1e-10)
        assert got["corr"][0] < 0.5 and got["cos"][0] < 0.5
        assert_pair_matches(got, a, b)
    # a change of one input direction is seen
    b = a.clone()
    b[0, :, 0] = -3 * b[0, :, 0]
    assert pair_metrics(a, b, ["cka"], device="cpu")["cka"][0] < 0.999


def test_zero_matrix_or_delta_gives_nan():
    a, b = pair_case((40, 24), 2, seed=4, dtype=torch.bfloat16)
    zero = torch.zeros_like(a)
    got = pair_metrics(zero, b, device="cpu")
    for name in PAIR_METRICS:
        assert np.isnan(got[name]).all(), name
    got = pair_metrics(a, zero, device="cpu")
    for name in ("corr", "cos", "rel_l2", "cka"):
        assert np.isnan(got[name]).all(), name
    assert_pair_matches(got, a, zero)  # changed_frac is defined: every non-zero entry of A changed
    # deltas of a model identical to its base (A − base = 0) next to a real delta
    base = a
    tuned = b
    delta = pair_metrics(base - base, tuned - base, device="cpu")
    assert np.isnan(delta["corr"]).all() and np.isnan(delta["cka"]).all()
    # a constant matrix has no Pearson correlation and no centred CKA, but a cosine
    const = torch.full_like(a, 0.5)
    got = pair_metrics(const, b, device="cpu")
    assert np.isnan(got["corr"]).all() and np.isnan(got["cka"]).all() and np.isfinite(got["cos"]).all()


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_constant_rows_and_rounded_constants(shape):
    """Rows constant along the inputs centre to zero: no CKA. A constant that float64 cannot sum
    exactly (0.1 in float32) is still constant: no corr, no changed_frac, no CKA."""
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(1, shape[0], 1, generator=g).expand(1, *shape).contiguous()
    b = torch.randn(1, *shape, generator=g)
    got = pair_metrics(rows, b, device="cpu")
    assert np.isnan(got["cka"]).all() and np.isfinite(got["corr"]).all()
    const = torch.full((1, *shape), 0.1)
    got = pair_metrics(const, b, device="cpu")
    for name in ("corr", "cka", "changed_frac"):
        assert np.isnan(got[name]).all(), name
    assert np.isfinite(got["cos"]).all() and np.isfinite(got["rel_l2"]).all()


@pytest.mark.parametrize("shape", [(48, 32), (32, 80)])
def test_module_metrics_is_pair_and_single(shape):
    a, b = pair_case(shape, 3, seed=12, dtype=torch.bfloat16)
    both = pair_and_single_metrics(a, b, device="cpu", chunk_bytes=SMALL_CHUNK)
    pm = pair_metrics(a, b, device="cpu")
    for name in PAIR_METRICS:
        np.testing.assert_allclose(both.pair[name], pm[name], rtol=1e-12, atol=1e-14, err_msg=name)
    for side, w in (("a", a), ("b", b)):
        sm = single_metrics(w, device="cpu")
        for name in SINGLE_METRICS:
            np.testing.assert_allclose(getattr(both, side)[name], sm[name], rtol=1e-12, err_msg=f"{side} {name}")
    only_pair = pair_and_single_metrics(a, b, single=(), device="cpu")
    assert only_pair.a == {} and only_pair.b == {} and set(only_pair.pair) == set(PAIR_METRICS)
    only_single = pair_and_single_metrics(a, b, pair=(), single="alpha", device="cpu")
    assert only_single.pair == {} and list(only_single.a) == ["alpha"]
    np.testing.assert_allclose(only_single.b["alpha"], both.b["alpha"], rtol=1e-12)


def test_deltas_are_pairs_of_differences():
    base, a = pair_case((48, 32), 2, seed=5, dtype=torch.float32)
    _, b = pair_case((48, 32), 2, seed=6, dtype=torch.float32)
    got = pair_metrics(a - base, b - base, device="cpu")
    assert_pair_matches(got, a - base, b - base)


def test_inputs_are_left_alone():
    """float64 contiguous inputs are streamed as views: nothing may write into them."""
    a, b = pair_case((40, 24), 2, seed=14, dtype=torch.float64)
    a0, b0 = a.clone(), b.clone()
    pair_and_single_metrics(a, b, device="cpu", chunk_bytes=SMALL_CHUNK)
    pair_and_single_metrics(a.transpose(1, 2), b.transpose(1, 2), device="cpu", chunk_bytes=SMALL_CHUNK)
    assert torch.equal(a, a0) and torch.equal(b, b0)


def test_pair_subset_and_two_dimensional_input():
    a, b = pair_case((30, 20), 1, seed=8, dtype=torch.float32)
    got = pair_metrics(a[0], b[0], "cka,corr", device="cpu")
    assert list(got) == ["corr", "cka"]
    full = pair_metrics(a, b, device="cpu")
    assert got["cka"][0] == full["cka"][0] and got["corr"][0] == full["corr"][0]


def test_pair_errors():
    a, b = pair_case((30, 20), 2, seed=9, dtype=torch.float32)
    with pytest.raises(ConfigError, match="same shape"):
        pair_metrics(a, b[:, :10], device="cpu")
    with pytest.raises(ConfigError, match="tol"):
        pair_metrics(a, b, tol=-1.0, device="cpu")
    with pytest.raises(ConfigError, match="tol"):
        pair_metrics(a, b, tol=float("nan"), device="cpu")
    with pytest.raises(ConfigError, match="stack"):
        pair_metrics(a[None], b[None], device="cpu")
    with pytest.raises(ConfigError, match="real weights"):
        pair_metrics(a.long(), b.long(), device="cpu")


# ----------------------------------------------------------------------------------------------
# Single-matrix metrics
# ----------------------------------------------------------------------------------------------
def decaying(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """U diag(σ) Vᵀ with σ_i = exp(−i/5): effective rank near the cut matters."""
    g = torch.Generator().manual_seed(seed)
    r = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], r, generator=g, dtype=torch.float64))
    s = torch.exp(-torch.arange(r, dtype=torch.float64) / 5.0)
    return ((u * s) @ v.T).float()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["gaussian-bf16", "decaying"])
def test_single_matches_reference(shape, kind):
    if kind == "decaying":
        w = torch.stack([decaying(shape, s) for s in range(2)])
    else:
        w = (torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    got = single_metrics(w, device="cpu", chunk_bytes=SMALL_CHUNK)
    assert list(got) == list(SINGLE_METRICS)
    got32 = single_metrics(w, device="cpu", dtype="float32")
    for k in range(2):
        ref = ref_single(w[k])
        for name, value in ref.items():
            assert got[name][k] == pytest.approx(value, rel=1e-9), (name, k)
            assert got32[name][k] == pytest.approx(value, rel=1e-5), (name, k)
        assert got32["alpha"][k] == pytest.approx(got["alpha"][k], rel=1e-4)


@pytest.mark.parametrize("shape,rank", [((60, 40), 5), ((40, 90), 1), ((64, 64), 12)])
def test_rank_r_matrix(shape, rank):
    g = torch.Generator().manual_seed(rank)
    w = (torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g))[None]
    got = single_metrics(w, device="cpu")
    assert 1.0 - 1e-9 <= got["stable_rank"][0] <= rank + 1e-9
    assert 1.0 - 1e-9 <= got["effective_rank"][0] <= rank + 1e-9
    assert got["effective_rank"][0] == pytest.approx(ref_single(w[0])["effective_rank"], rel=1e-9)
    # an orthogonal matrix: every σ = 1, both ranks are min(out, in)
    q, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=g, dtype=torch.float64))
    ortho = q[:, : min(shape)] if shape[0] >= shape[1] else q[: min(shape)].T
    got = single_metrics(ortho.reshape(1, *ortho.shape), ["stable_rank", "effective_rank"], device="cpu")
    assert got["stable_rank"][0] == pytest.approx(min(shape), rel=1e-9)
    assert got["effective_rank"][0] == pytest.approx(min(shape), rel=1e-9)


def test_zero_matrix_single():
    w = torch.zeros(2, 40, 24, dtype=torch.bfloat16)
    for dtype in ("float64", "float32"):
        got = single_metrics(w, device="cpu", dtype=dtype)
        assert (got["fro_norm"] == 0).all() and (got["spectral_norm"] == 0).all()
        for name in ("stable_rank", "effective_rank", "alpha"):
            assert np.isnan(got[name]).all(), name


def test_fro_norm_alone_and_spectra_reuse():
    w = (torch.randn(3, 50, 30, generator=torch.Generator().manual_seed(1)) * 0.02).bfloat16()
    alone = single_metrics(w, ["fro_norm"], device="cpu")
    sp = spectra(w, device="cpu")
    assert sp.eigenvalues.shape == (3, 30) and (np.diff(sp.eigenvalues, axis=1) <= 0).all()
    np.testing.assert_allclose(alone["fro_norm"], np.sqrt(sp.fro2), rtol=1e-12)
    np.testing.assert_allclose(sp.fro2, sp.eigenvalues.sum(1), rtol=1e-12)
    again = metrics_from_spectra(sp)
    direct = single_metrics(w, device="cpu")
    for name in SINGLE_METRICS:
        np.testing.assert_array_equal(again[name], direct[name])


def test_single_errors():
    w = torch.randn(2, 20, 10)
    with pytest.raises(ConfigError, match="spectrum dtype"):
        single_metrics(w, dtype="float16", device="cpu")
    with pytest.raises(ConfigError, match="unknown single metric 'cka'.*pair metric"):
        single_metrics(w, ["cka"], device="cpu")


# ----------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------
def test_check_metric_names():
    assert check_metric_names(["cka", "corr", "cka"], "pair") == ("corr", "cka")
    assert check_metric_names("alpha, fro_norm", "single") == ("fro_norm", "alpha")
    assert check_metric_names(PAIR_METRICS, "pair") == PAIR_METRICS
    with pytest.raises(ConfigError, match="'pearson'.*corr, cos, rel_l2, cka, changed_frac"):
        check_metric_names(["corr", "pearson"], "pair")
    with pytest.raises(ConfigError, match="no pair metric"):
        check_metric_names([], "pair")
    with pytest.raises(ConfigError, match="kind"):
        check_metric_names(["corr"], "both")


# ----------------------------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(48, 32), (32, 80)])
def test_torch_gram_path_on_the_cpu(shape, monkeypatch):
    """The Grams CUDA forms (full ``addmm``, both triangles) agree with the CPU's ``dsyrk``:
    CUDA's code path, run on the CPU."""
    from moelens.metrics import module

    a, b = pair_case(shape, 2, seed=13, dtype=torch.bfloat16)
    blas = pair_and_single_metrics(a, b, device="cpu", chunk_bytes=SMALL_CHUNK)

    def torch_gram(self, c, device):
        self.cpu = False
        self.k = torch.zeros(c, c, dtype=torch.float64, device=device)

    monkeypatch.setattr(module._Gram, "__init__", torch_gram)
    full = pair_and_single_metrics(a, b, device="cpu", chunk_bytes=SMALL_CHUNK)
    for side in ("pair", "a", "b"):
        for name, values in getattr(blas, side).items():
            np.testing.assert_allclose(getattr(full, side)[name], values, rtol=1e-10, atol=1e-13, err_msg=f"{side} {name}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(96, 64), (64, 160)])
def test_cuda_matches_cpu(shape):
    a, b = pair_case(shape, 3, seed=11, dtype=torch.bfloat16)
    cpu = pair_metrics(a, b, device="cpu")
    gpu = pair_metrics(a.cuda(), b, device="cuda", chunk_bytes=SMALL_CHUNK)
    for name in PAIR_METRICS:
        np.testing.assert_allclose(gpu[name], cpu[name], rtol=1e-10, atol=1e-12, err_msg=name)
    both_cpu = pair_and_single_metrics(a, b, device="cpu")
    both_gpu = pair_and_single_metrics(a.cuda(), b.cuda(), device="cuda")
    for side in ("pair", "a", "b"):
        for name, values in getattr(both_cpu, side).items():
            np.testing.assert_allclose(getattr(both_gpu, side)[name], values, rtol=1e-9, atol=1e-12, err_msg=f"{side} {name}")
    for dtype in ("float64", "float32"):
        cpu = single_metrics(a, device="cpu", dtype=dtype)
        gpu = single_metrics(a.cuda(), device="cuda", dtype=dtype)
        for name in SINGLE_METRICS:
            np.testing.assert_allclose(gpu[name], cpu[name], rtol=1e-9 if dtype == "float64" else 1e-4, err_msg=f"{dtype} {name}")
