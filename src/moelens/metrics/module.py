"""Module metrics (SPEC §5, §7): pair measures of two models' matrices and single-matrix measures.

One matrix role at a time: a batch [B, out, in] is a layer's B experts of one role, or [1, out, in]
for one attention matrix. Every sum is accumulated in float64; the matrices are streamed to the
compute device in chunks of rows of their tall orientation T (T = W when out ≥ in, else Wᵀ;
T is [R, c], R ≥ c), each chunk converted to float64 there, so that memory above the inputs is
a few chunks plus, for CKA and the spectra, c×c float64 Gram matrices.

Pair metrics of A, B [out, in] (n = out·in entries, means ā, b̄ over all entries):

    corr          Σ(a − ā)(b − b̄) / √(Σ(a − ā)² Σ(b − b̄)²)          Pearson, flattened weights
    cos           ⟨A, B⟩_F / (‖A‖_F ‖B‖_F)
    rel_l2        ‖A/‖A‖_F − B/‖B‖_F‖_F                              ∈ [0, 2]
    cka           ⟨K_A, K_B⟩_F / (‖K_A‖_F ‖K_B‖_F)                   linear CKA, ∈ [0, 1]
    changed_frac  #{|a − b| > tol·std(A)} / n                          std with ddof 0

CKA takes the input dimensions as samples: X = Aᵀ, Y = Bᵀ [in, out] (rows = inputs), each
column (output neuron) centred over the rows, i.e. A_c = A − (row means of A). Then

    CKA = ‖YᵀX‖_F² / (‖XᵀX‖_F ‖YᵀY‖_F) = ⟨XXᵀ, YYᵀ⟩_F / (‖XXᵀ‖_F ‖YYᵀ‖_F)

(‖YᵀX‖² = tr(XᵀYYᵀX) = ⟨XXᵀ, YYᵀ⟩ and ‖XᵀX‖ = ‖XXᵀ‖). The work takes the smaller side:

- in ≤ out (Mixtral's gate/up: in = 4096, out = 14336): the in×in Grams K_A = XXᵀ = A_cᵀA_c and
  K_B, numerator ⟨K_A, K_B⟩_F — two symmetric rank-k updates, in²·out flops each;
- out < in (down): the out×out products YᵀX = B_cA_cᵀ, XᵀX = A_cA_cᵀ and YᵀY, numerator
  ‖YᵀX‖_F² — never an in×in matrix.

CKA is invariant to any rotation or permutation of the output neurons of either matrix and to
scaling either; it does not see a change of the row means (they are centred out).

Deltas (SPEC ``pair_delta``): pass A − base and B − base as ``a`` and ``b``; nothing changes.

Undefined values are NaN, never an exception: corr where A or B is constant (a zero matrix or
delta included), cos and rel_l2 where a matrix is zero, cka where a centred matrix is zero
(zero, or every row constant), changed_frac where std(A) = 0 (no scale for "changed").
corr and cos are clipped to [−1, 1], cka to [0, 1] (rounding can step past by 1e-16).

Single-matrix metrics of W [out, in], σ₁ ≥ σ₂ ≥ … its singular values, λ_i = σ_i²:

    fro_norm        ‖W‖_F = √(Σ w²)
    spectral_norm   σ₁
    stable_rank     ‖W‖_F² / σ₁²
    effective_rank  exp(−Σ p_i ln p_i),  p_i = σ_i / Σ_k σ_k  over σ_i > max(out, in)·ε₃₂·σ₁
    alpha           the WeightWatcher power-law exponent of the λ (:mod:`moelens.metrics.power_law`)

ε₃₂ = 2⁻²³ is float32's machine epsilon whatever the stored or compute dtype, as for the
numerical rank of :mod:`moelens.metrics.singular`: weights are stored in float32 or coarser, so
σ below that bound are rounding noise (numpy's ``matrix_rank`` convention with float32's ε;
bfloat16's own ε would cut at 32·σ₁ for d = 4096 and keep nothing). A zero matrix has
fro_norm = spectral_norm = 0 and NaN for the rest; alpha is NaN where min(out, in) < 8
(WeightWatcher skips such matrices) or no fit exists.

The spectrum, ``dtype="float64"`` (default): the eigenvalues of the float64 Gram TᵀT [c, c]
(``torch.linalg.eigvalsh``), accumulated chunk by chunk. Products of bfloat16 or float32 values
are exact in float64, and the eigenvalues carry an absolute error of about c·ε₆₄·λ₁, i.e.
σ_i to relative 1e-7 down to σ_i ≈ 1e-4·σ₁, far below the rank cut (1.7e-3·σ₁ at 14336 rows) —
as accurate as an SVD for every metric here, and 2–3× cheaper than a float64 SVD on the CPU.
``dtype="float32"``: ``torch.linalg.svdvals`` in float32 (λ = σ² in float64; ‖W‖_F² still the
exact float64 sum): faster on some GPUs, about 1e-6 relative in σ₁, stable_rank and
effective_rank; α can move more where two candidate x_min have nearly equal KS distances.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import blas

from moelens.errors import ConfigError
from moelens.metrics.inner import DEFAULT_CHUNK_BYTES
from moelens.metrics.power_law import EVALS_FLOOR, MIN_EVALS, power_law_alpha
from moelens.spectral import full_precision, resolve_device

PAIR_METRICS = ("corr", "cos", "rel_l2", "cka", "changed_frac")
SINGLE_METRICS = ("fro_norm", "spectral_norm", "stable_rank", "effective_rank", "alpha")
METRIC_KINDS = {"pair": PAIR_METRICS, "single": SINGLE_METRICS}
SPECTRUM_DTYPES = ("float64", "float32")
RANK_EPS = float(torch.finfo(torch.float32).eps)
DEFAULT_TOL = 1e-3
# CUDA: Grams [c, c] of one batch decomposed together up to this size (the CPU takes one at a time)
DEFAULT_GRAM_BYTES = 1 << 30


def check_metric_names(names: str | Iterable[str], kind: str) -> tuple[str, ...]:
    """The metric names of ``kind`` ("pair" or "single") asked for, in the canonical order of
    :data:`PAIR_METRICS` / :data:`SINGLE_METRICS`, duplicates dropped. ``names`` is an iterable
    or one comma-separated string. Raises :class:`ConfigError` for an unknown or empty set."""
    if kind not in METRIC_KINDS:
        raise ConfigError(f"unknown metric kind {kind!r}; expected one of {', '.join(METRIC_KINDS)}")
    known = METRIC_KINDS[kind]
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    asked = [str(n).strip() for n in names]
    asked = [n for n in asked if n]
    for n in asked:
        if n not in known:
            other = "single" if kind == "pair" else "pair"
            hint = f" ({n!r} is a {other} metric)" if n in METRIC_KINDS[other] else ""
            raise ConfigError(f"unknown {kind} metric {n!r}{hint}; expected some of {', '.join(known)}")
    if not asked:
        raise ConfigError(f"no {kind} metric asked for; choose some of {', '.join(known)}")
    return tuple(n for n in known if n in asked)


def _as_stack(w: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        w = torch.as_tensor(np.asarray(w))
    if w.ndim == 2:
        w = w.unsqueeze(0)
    if w.ndim != 3:
        raise ConfigError(f"{name} must be a matrix [out, in] or a stack [B, out, in]; got shape {tuple(w.shape)}")
    if w.shape[1] == 0 or w.shape[2] == 0:
        raise ConfigError(f"{name} holds empty matrices of shape {tuple(w.shape[1:])}; expected out, in ≥ 1")
    if not w.is_floating_point():
        raise ConfigError(f"{name} has dtype {w.dtype}; expected real weights (bfloat16, float16, float32, float64)")
    return w


def _tall(w: torch.Tensor) -> torch.Tensor:
    """W [out, in] as T [R, c], R ≥ c: W, or its transpose (a view)."""
    return w if w.shape[-2] >= w.shape[-1] else w.transpose(-1, -2)


def _chunks(t: torch.Tensor, device: torch.device, chunk_bytes: int) -> Iterator[torch.Tensor]:
    """Row blocks of T [R, c] as contiguous float64 tensors on ``device``."""
    rows, cols = int(t.shape[0]), int(t.shape[1])
    step = max(1, int(chunk_bytes) // max(1, cols * 8))
    for r0 in range(0, rows, step):
        yield t[r0:r0 + step].to(device=device, dtype=torch.float64).contiguous()  # [r, c]


class _Gram:
    """K = Σ_chunks xᵀx [c, c] in float64: BLAS ``dsyrk`` on the CPU (the lower triangle only,
    half the flops; the upper one stays 0), ``addmm`` on CUDA (both triangles)."""

    def __init__(self, c: int, device: torch.device):
        self.cpu = device.type == "cpu"
        if self.cpu:
            self.k = np.zeros((c, c), dtype=np.float64, order="F")
        else:
            self.k = torch.zeros(c, c, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        """K += xᵀx for a C-ordered chunk x [r, c]."""
        if self.cpu:
            # xᵀ is a Fortran [c, r] array a, and a·aᵀ = xᵀx
            self.k = blas.dsyrk(1.0, x.numpy().T, beta=1.0, c=self.k, trans=0, lower=1, overwrite_c=1)
        else:
            self.k.addmm_(x.T, x)

    def lower(self) -> torch.Tensor:
        """K [c, c] on the device; only its lower triangle is to be read."""
        return torch.from_numpy(self.k) if self.cpu else self.k

    def diagonal(self) -> torch.Tensor:
        return torch.diagonal(self.lower())

    def inner(self, other: _Gram) -> float:
        """⟨K, K'⟩_F (from the lower triangles on the CPU: twice their sum less the diagonal's)."""
        if self.cpu:
            both = float(np.einsum("ij,ij->", self.k, other.k))
            return 2.0 * both - float(np.dot(np.diagonal(self.k), np.diagonal(other.k)))
        return float(torch.sum(self.k * other.k))


def _check_tol(tol: float) -> float:
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not math.isfinite(float(tol)) or float(tol) < 0:
        raise ConfigError(f"tol must be a finite number ≥ 0, got {tol!r}; the default 1e-3 counts |A − B| > 1e-3·std(A)")
    return float(tol)


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def _pair(a: torch.Tensor, b: torch.Tensor, names: tuple[str, ...], tol: float, device: torch.device,
          chunk_bytes: int) -> dict[str, float]:
    """The pair metrics of one A, B [out, in]."""
    out_dim, in_dim = int(a.shape[0]), int(a.shape[1])
    transposed = out_dim < in_dim          # T = Aᵀ: output neurons are T's columns
    ta, tb = _tall(a), _tall(b)            # [R, c]
    c = int(ta.shape[1])
    want_cka = "cka" in names
    gram_a = _Gram(c, device) if want_cka else None
    gram_b = _Gram(c, device) if want_cka else None
    half = max(1, chunk_bytes // 2)

    # pass 1: moments (merged chunk by chunk, Chan et al.), ⟨A, B⟩, ‖A‖², ‖B‖²; CKA's Grams when
    # each chunk row is an output neuron (centred on its own), else T's column sums
    count = 0
    mean_a = mean_b = 0.0
    m2_a = m2_b = c_ab = 0.0
    dot = sq_a = sq_b = 0.0
    col_a = torch.zeros(c, dtype=torch.float64, device=device) if want_cka and transposed else None
    col_b = torch.zeros(c, dtype=torch.float64, device=device) if want_cka and transposed else None
    # out < in: YᵀX = B_c A_cᵀ [out, out], summed over chunks of inputs (rows of T)
    cross = torch.zeros(c, c, dtype=torch.float64, device=device) if want_cka and transposed else None
    for xa, xb in zip(_chunks(ta, device, half), _chunks(tb, device, half)):
        m = xa.numel()
        va, vb = xa.view(-1), xb.view(-1)
        dot += float(torch.dot(va, vb))
        sq_a += float(torch.dot(va, va))
        sq_b += float(torch.dot(vb, vb))
        ma, mb = float(va.mean()), float(vb.mean())
        da, db = va - ma, vb - mb
        cm2a, cm2b, ccab = float(torch.dot(da, da)), float(torch.dot(db, db)), float(torch.dot(da, db))
        del da, db
        total = count + m
        dma, dmb = ma - mean_a, mb - mean_b
        w = count * m / total
        m2_a += cm2a + dma * dma * w
        m2_b += cm2b + dmb * dmb * w
        c_ab += ccab + dma * dmb * w
        mean_a += dma * m / total
        mean_b += dmb * m / total
        count = total
        if want_cka:
            if transposed:
                col_a += xa.sum(0)
                col_b += xb.sum(0)
            else:
                gram_a.add(xa - xa.mean(1, keepdim=True))  # type: ignore[union-attr]
                gram_b.add(xb - xb.mean(1, keepdim=True))  # type: ignore[union-attr]

    res: dict[str, float] = {}
    if "corr" in names:
        res["corr"] = float(np.clip(_ratio(c_ab, math.sqrt(m2_a * m2_b)), -1.0, 1.0))
    if "cos" in names:
        res["cos"] = float(np.clip(_ratio(dot, math.sqrt(sq_a * sq_b)), -1.0, 1.0))
    std_a = math.sqrt(m2_a / count)
    thr = tol * std_a
    norm_a, norm_b = math.sqrt(sq_a), math.sqrt(sq_b)
    want_changed = "changed_frac" in names and std_a > 0
    want_rel = "rel_l2" in names and norm_a > 0 and norm_b > 0

    # pass 2: what needs pass 1's totals
    if want_changed or want_rel or (want_cka and transposed):
        changed = 0
        rel2 = 0.0
        mean_col_a = None if col_a is None else col_a / tb.shape[0]
        mean_col_b = None if col_b is None else col_b / tb.shape[0]
        for xa, xb in zip(_chunks(ta, device, half), _chunks(tb, device, half)):
            if want_changed:
                changed += int(((xa - xb).abs_() > thr).sum())
            if want_rel:
                d = (xa / norm_a).sub_(xb, alpha=1.0 / norm_b).view(-1)
                rel2 += float(torch.dot(d, d))
                del d
            if want_cka and transposed:
                ca, cb = xa - mean_col_a, xb - mean_col_b  # type: ignore[operator]
                gram_a.add(ca)  # type: ignore[union-attr]
                gram_b.add(cb)  # type: ignore[union-attr]
                cross.addmm_(cb.T, ca)  # type: ignore[union-attr]
                del ca, cb
        if want_changed:
            res["changed_frac"] = changed / count
        if want_rel:
            res["rel_l2"] = min(2.0, math.sqrt(rel2))
    if "changed_frac" in names and not want_changed:
        res["changed_frac"] = math.nan
    if "rel_l2" in names and not want_rel:
        res["rel_l2"] = math.nan
    if want_cka:
        if cross is None:
            num = gram_a.inner(gram_b)  # type: ignore[union-attr,arg-type]
        else:
            flat = cross.view(-1)
            num = float(torch.dot(flat, flat))
        den = math.sqrt(max(gram_a.inner(gram_a), 0.0)) * math.sqrt(max(gram_b.inner(gram_b), 0.0))  # type: ignore[union-attr,arg-type]
        res["cka"] = float(np.clip(_ratio(num, den), 0.0, 1.0))
    return res


def pair_metrics(
    a: torch.Tensor,
    b: torch.Tensor,
    metrics: str | Iterable[str] = PAIR_METRICS,
    tol: float = DEFAULT_TOL,
    device: str | torch.device = "auto",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, np.ndarray]:
    """Pair metrics of A[k] vs B[k] for each k of two stacks [B, out, in] (or two matrices [out, in]).

    ``a`` and ``b`` as stored (bfloat16, float32, ...; any device); each matrix is streamed to
    ``device`` in float64 chunks of about ``chunk_bytes`` (a few are alive at once), plus two
    c×c float64 Grams for ``cka`` (c = min(out, in): 128 MiB each at c = 4096). Each pair is read
    twice when ``changed_frac``/``rel_l2`` or a wide matrix's ``cka`` is asked for (their
    thresholds and centring need the first pass's totals), else once.

    Returns {name: float64 array [B]} for the names of ``metrics`` (see the module docstring for
    the formulas; NaN where a metric is undefined). For deltas pass A − base and B − base."""
    names = check_metric_names(metrics, "pair")
    tol = _check_tol(tol)
    sa, sb = _as_stack(a, "a"), _as_stack(b, "b")
    if tuple(sa.shape) != tuple(sb.shape):
        raise ConfigError(f"a and b must have the same shape; got {tuple(sa.shape)} and {tuple(sb.shape)}: "
                          "compare the same module of two models of one architecture")
    dev = resolve_device(device)
    rows = []
    with torch.no_grad(), full_precision():
        for k in range(int(sa.shape[0])):
            rows.append(_pair(sa[k], sb[k], names, tol, dev, int(chunk_bytes)))
    return {n: np.array([r[n] for r in rows], dtype=np.float64) for n in names}


@dataclass(frozen=True)
class Spectra:
    """Eigenvalues of WᵀW for a stack of B matrices of one ``shape`` (out, in).

    ``eigenvalues`` [B, c] float64, descending, c = min(out, in) (λ_i = σ_i², ≥ 0);
    ``fro2`` [B] the float64 ‖W‖_F²; ``dtype`` how λ was computed (see the module docstring)."""

    eigenvalues: np.ndarray
    fro2: np.ndarray
    shape: tuple[int, int]
    dtype: str

    @property
    def singular_values(self) -> np.ndarray:
        """σ [B, c], descending."""
        return np.sqrt(self.eigenvalues)


def _eigvalsh_desc(grams: torch.Tensor) -> np.ndarray:
    """Eigenvalues [g, c], descending and ≥ 0, of symmetric [g, c, c] given by their lower triangles."""
    lam = torch.linalg.eigvalsh(grams, UPLO="L")  # [g, c] ascending
    return lam.flip(-1).clamp_min(0.0).cpu().numpy()


def spectra(
    w: torch.Tensor,
    device: str | torch.device = "auto",
    dtype: str = "float64",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    gram_bytes: int = DEFAULT_GRAM_BYTES,
) -> Spectra:
    """The eigenvalues of WᵀW of every matrix of ``w`` [B, out, in] (or one [out, in]).

    ``dtype="float64"``: eigenvalues of the float64 Gram TᵀT [c, c], streamed in chunks (memory:
    one Gram, or on CUDA a batch of them up to ``gram_bytes``). ``dtype="float32"``:
    ``torch.linalg.svdvals`` of each matrix in float32 (a float32 copy of one matrix at a time on
    the CPU, batches up to ``gram_bytes`` on CUDA)."""
    if dtype not in SPECTRUM_DTYPES:
        raise ConfigError(f"unknown spectrum dtype {dtype!r}; expected {' or '.join(SPECTRUM_DTYPES)}")
    s = _as_stack(w, "w")
    dev = resolve_device(device)
    n_mat = int(s.shape[0])
    shape = (int(s.shape[1]), int(s.shape[2]))
    c = min(shape)
    lam = np.zeros((n_mat, c), dtype=np.float64)
    fro2 = np.zeros(n_mat, dtype=np.float64)
    with torch.no_grad(), full_precision():
        if dtype == "float64":
            per = 1 if dev.type == "cpu" else max(1, int(gram_bytes) // (c * c * 8 * 2))
            for g0 in range(0, n_mat, per):
                grams = []
                for k in range(g0, min(n_mat, g0 + per)):
                    g = _Gram(c, dev)
                    for x in _chunks(_tall(s[k]), dev, chunk_bytes):
                        g.add(x)
                    fro2[k] = float(g.diagonal().sum())
                    grams.append(g.lower())
                    del g
                batch = grams[0].unsqueeze(0) if len(grams) == 1 else torch.stack(grams)  # [g, c, c]
                lam[g0:g0 + len(grams)] = _eigvalsh_desc(batch)
                del grams, batch
        else:
            per = 1 if dev.type == "cpu" else max(1, int(gram_bytes) // (shape[0] * shape[1] * 4 * 3))
            for k in range(n_mat):
                for x in _chunks(_tall(s[k]), dev, chunk_bytes):
                    v = x.view(-1)
                    fro2[k] += float(torch.dot(v, v))
            for g0 in range(0, n_mat, per):
                block = s[g0:g0 + per].to(device=dev, dtype=torch.float32)  # [g, out, in]
                sig = torch.linalg.svdvals(block).double().cpu().numpy()      # [g, c] descending
                lam[g0:g0 + sig.shape[0]] = sig * sig
                del block
    return Spectra(eigenvalues=lam, fro2=fro2, shape=shape, dtype=dtype)


def _effective_rank(sigma: np.ndarray, shape: tuple[int, int]) -> float:
    s1 = float(sigma[0])
    if not s1 > 0:
        return math.nan
    kept = sigma[sigma > max(shape) * RANK_EPS * s1]
    p = kept / kept.sum()
    return float(math.exp(-np.sum(p * np.log(p))))


def metrics_from_spectra(sp: Spectra, metrics: str | Iterable[str] = SINGLE_METRICS,
                         floor: float = EVALS_FLOOR) -> dict[str, np.ndarray]:
    """The single-matrix metrics from precomputed :class:`Spectra`: {name: float64 [B]}."""
    names = check_metric_names(metrics, "single")
    lam = sp.eigenvalues
    lam1 = lam[:, 0] if lam.shape[1] else np.zeros(lam.shape[0])
    out: dict[str, np.ndarray] = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        if "fro_norm" in names:
            out["fro_norm"] = np.sqrt(sp.fro2)
        if "spectral_norm" in names:
            out["spectral_norm"] = np.sqrt(lam1)
        if "stable_rank" in names:
            out["stable_rank"] = np.where(lam1 > 0, sp.fro2 / lam1, np.nan)
    if "effective_rank" in names:
        out["effective_rank"] = np.array([_effective_rank(np.sqrt(row), sp.shape) for row in lam], dtype=np.float64)
    if "alpha" in names:
        if min(sp.shape) < MIN_EVALS:
            out["alpha"] = np.full(lam.shape[0], np.nan)
        else:
            out["alpha"] = np.array([power_law_alpha(row, floor) for row in lam], dtype=np.float64)
    return {n: out[n] for n in names}


def single_metrics(
    w: torch.Tensor,
    metrics: str | Iterable[str] = SINGLE_METRICS,
    device: str | torch.device = "auto",
    dtype: str = "float64",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, np.ndarray]:
    """Single-matrix metrics of every matrix of ``w`` [B, out, in] (or one [out, in]):
    {name: float64 array [B]}.

    Only ``fro_norm`` needs no spectrum (one float64 pass over each matrix); the others come
    from :func:`spectra` with ``dtype`` (see the module docstring for precision and cost)."""
    names = check_metric_names(metrics, "single")
    if names == ("fro_norm",):
        s = _as_stack(w, "w")
        dev = resolve_device(device)
        fro2 = np.zeros(int(s.shape[0]))
        with torch.no_grad():
            for k in range(int(s.shape[0])):
                for x in _chunks(_tall(s[k]), dev, chunk_bytes):
                    v = x.view(-1)
                    fro2[k] += float(torch.dot(v, v))
        return {"fro_norm": np.sqrt(fro2)}
    return metrics_from_spectra(spectra(w, device=device, dtype=dtype, chunk_bytes=chunk_bytes), names)
