"""Module metrics (docs/methods.md §5, §7): pair measures of two models' matrices and single-matrix measures.

One matrix role at a time: a batch [B, out, in] is a layer's B experts of one role, or [1, out, in]
for one attention matrix. Every sum is accumulated in float64; the matrices are streamed to the
compute device in chunks of rows of their tall orientation T (T = W when out ≥ in, else Wᵀ;
T is [R, c], R ≥ c), each chunk converted to float64 there, so that memory above the inputs is
a few chunks plus c×c float64 Gram matrices (128 MiB each at c = 4096).

>>> pm = pair_metrics(a, b)                 # a, b [E, out, in]: {"corr": [E], ...}
>>> sm = single_metrics(a)                  # {"fro_norm": [E], ..., "alpha": [E]}
>>> both = pair_and_single_metrics(a, b)    # both at once, each Gram formed once
>>> both.pair["cka"], both.a["alpha"], both.b["stable_rank"]

Pair metrics of A, B [out, in] (n = out·in entries, means ā, b̄ over all entries):

    corr          Σ(a − ā)(b − b̄) / √(Σ(a − ā)² Σ(b − b̄)²)          Pearson, flattened weights
    cos           ⟨A, B⟩_F / (‖A‖_F ‖B‖_F)
    rel_l2        ‖A/‖A‖_F − B/‖B‖_F‖_F                              ∈ [0, 2]
    cka           ‖YᵀX‖_F² / (‖XᵀX‖_F ‖YᵀY‖_F)                      linear CKA, ∈ [0, 1]
    changed_frac  #{|a − b| > tol·std(A)} / n                          std with ddof 0

CKA takes the input dimensions as samples: X = Aᵀ, Y = Bᵀ [in, out] (rows = inputs), each
column (output neuron) centred over the rows: X = A_cᵀ with A_c = A − (row means of A) 1ᵀ.
Since ‖YᵀX‖² = tr(XᵀYYᵀX) = ⟨XXᵀ, YYᵀ⟩ and ‖XᵀX‖ = ‖XXᵀ‖, the work takes the smaller side:

- in ≤ out (Mixtral's gate/up: in = 4096, out = 14336): the in×in Grams K_A = XXᵀ = A_cᵀA_c and
  K_B, numerator ⟨K_A, K_B⟩_F;
- out < in (down): the out×out matrices K_A = XᵀX = A_cA_cᵀ, K_B and the cross product
  YᵀX = B_cA_cᵀ, numerator ‖YᵀX‖_F² — never an in×in matrix.

The centred K come from the uncentred Grams G = TᵀT, which the spectra need too, by a rank-one
or rank-two correction: with m the row means of A (in ≤ out, T = A) or μ the column means of
T = Aᵀ (out < in),

    A_cᵀA_c = G − u1ᵀ − 1uᵀ + ‖m‖² 11ᵀ,  u = Aᵀm;        A_cA_cᵀ = G − in·μμᵀ,  B_cA_cᵀ = T_BᵀT_A − in·μ_B μ_Aᵀ.

CKA is invariant to any rotation or permutation of the output neurons of either matrix and to
scaling either; it does not see a change of the row means (they are centred out).

Deltas (docs/methods.md §5, ``pair_delta``): pass A − base and B − base as ``a`` and ``b``; nothing changes.

Undefined values are NaN, never an exception: corr where A or B is constant (a zero matrix or
delta included), cos and rel_l2 where a matrix is zero, cka where a centred matrix is zero
(zero, or every row constant), changed_frac where std(A) = 0 (no scale for "changed"). "Zero"
allows for rounding: a spread below 1e-10 of the root mean square (Σ(a − ā)² ≤ 1e-20 Σa²), a
centred Gram below 2c·ε₆₄ of its uncentred one. corr and cos are clipped to [−1, 1], cka to
[0, 1] (rounding can step past by 1e-16).

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

The spectrum, ``dtype="float64"`` (default): the eigenvalues of the float64 Gram G = TᵀT [c, c]
(``torch.linalg.eigvalsh``), accumulated chunk by chunk (BLAS ``dsyrk`` on the CPU: one
triangle, half the flops of a product). Products of bfloat16 or float32 values are exact in
float64, and the eigenvalues carry an absolute error of about c·ε₆₄·λ₁, i.e. σ_i to relative
1e-7 down to σ_i ≈ 1e-4·σ₁, far below the rank cut (1.7e-3·σ₁ at 14336 rows): as accurate as an
SVD for every metric here (α agrees with WeightWatcher's float64 SVD to 1e-13), and 2–3× cheaper
than a float64 SVD on the CPU. ``dtype="float32"`` (:func:`single_metrics` only):
``torch.linalg.svdvals`` in float32, batched on CUDA (‖W‖_F² stays the exact float64 sum):
about 1e-6 relative in σ₁ and stable_rank, 1e-7 in effective_rank, 1e-5 in α (α can jump where
two candidate x_min have nearly equal KS distances).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import blas

from moelens.choices import DEFAULT_DEVICE, PAIR_METRICS, SINGLE_METRICS, check_metric_names
from moelens.errors import ConfigError
from moelens.metrics.inner import DEFAULT_CHUNK_BYTES
from moelens.metrics.power_law import EVALS_FLOOR, MIN_EVALS, power_law_alpha
from moelens.spectral import full_precision, resolve_device

SPECTRUM_DTYPES = ("float64", "float32")
RANK_EPS = float(torch.finfo(torch.float32).eps)
EPS64 = float(torch.finfo(torch.float64).eps)
DEFAULT_TOL = 1e-3
ZERO_SPREAD = 1e-20          # Σ(a − ā)² ≤ this · Σa²: a constant matrix, up to rounding
DEFAULT_SVD_BYTES = 1 << 30  # dtype="float32" on CUDA: matrices per svdvals batch, in float32 bytes


def _check_tol(tol: float) -> float:
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not math.isfinite(float(tol)) or float(tol) < 0:
        raise ConfigError(f"tol must be a finite number ≥ 0, got {tol!r}; the default 1e-3 counts |A − B| > 1e-3·std(A)")
    return float(tol)


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


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise ConfigError(f"a and b must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}: "
                          "compare the same module of two models of one architecture")


def _tall(w: torch.Tensor) -> torch.Tensor:
    """W [out, in] as T [R, c], R ≥ c: W, or its transpose (a view)."""
    return w if w.shape[-2] >= w.shape[-1] else w.transpose(-1, -2)


def _chunks(t: torch.Tensor, device: torch.device, chunk_bytes: int) -> Iterator[torch.Tensor]:
    """Row blocks of T [R, c] as C-ordered float64 tensors on ``device``."""
    step = max(1, int(chunk_bytes) // max(1, int(t.shape[1]) * 8))
    for r0 in range(0, int(t.shape[0]), step):
        x = t[r0:r0 + step].to(device=device, dtype=torch.float64, memory_format=torch.contiguous_format)
        yield x.contiguous()  # [r, c]; a no-op unless .to() had nothing to convert


class _Gram:
    """G = Σ_chunks xᵀx [c, c] in float64: BLAS ``dsyrk`` on the CPU (the lower triangle only),
    ``addmm`` on CUDA."""

    def __init__(self, c: int, device: torch.device):
        self.cpu = device.type == "cpu"
        if self.cpu:
            self.k: np.ndarray | torch.Tensor = np.zeros((c, c), dtype=np.float64, order="F")
        else:
            self.k = torch.zeros(c, c, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        """G += xᵀx for a C-ordered chunk x [r, c]."""
        if self.cpu:
            # xᵀ is a Fortran [c, r] array a, and a·aᵀ = xᵀx
            self.k = blas.dsyrk(1.0, x.numpy().T, beta=1.0, c=self.k, trans=0, lower=1, overwrite_c=1)
        else:
            self.k.addmm_(x.T, x)  # type: ignore[union-attr]

    def full(self) -> torch.Tensor:
        """The symmetric G [c, c] on the device (the CPU's lower triangle mirrored, its buffer freed)."""
        if not self.cpu:
            return self.k  # type: ignore[return-value]
        low = torch.from_numpy(self.k)  # type: ignore[arg-type]
        out = low.tril()
        out += low.tril(-1).T
        self.k = np.empty((0, 0))
        return out


def _eigenvalues(g: torch.Tensor) -> np.ndarray:
    """λ [c] of a symmetric G, descending, clamped at 0."""
    return torch.linalg.eigvalsh(g).flip(-1).clamp_min(0.0).cpu().numpy()


def _fro2(g: torch.Tensor) -> float:
    return float(torch.dot(g.reshape(-1), g.reshape(-1)))


def _centred_norm2(k: torch.Tensor, g_fro2: float) -> tuple[float, bool]:
    """(‖K‖_F², whether K is zero up to the rounding of the centring: ‖K‖ ≤ 2c·ε₆₄·‖G‖)."""
    k2 = _fro2(k)
    c = int(k.shape[0])
    return k2, k2 <= (2 * c * EPS64) ** 2 * g_fro2


class _Moments:
    """One matrix's running float64 moments over the entries seen: their count, mean, centred sum
    of squares M2 = Σ(x − mean)² and raw sum of squares ‖·‖²."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2, self.sq = 0, 0.0, 0.0, 0.0

    def merge(self, v: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        """Add a chunk (flat float64) by Chan et al.'s pairwise update,
        M2 ← M2 + M2_chunk + δ²·n·m/(n + m), δ = mean_chunk − mean; returns what the cross term of
        a pair needs: the chunk centred on its own mean, δ, and n·m/(n + m)."""
        m = int(v.numel())
        total = self.count + m
        w = self.count * m / total
        chunk_mean = float(v.mean())
        centred = v - chunk_mean
        shift = chunk_mean - self.mean
        self.sq += float(torch.dot(v, v))
        self.m2 += float(torch.dot(centred, centred)) + shift * shift * w
        self.mean += shift * m / total
        self.count = total
        return centred, shift, w


class _Sums:
    """What one pass over A (and B) leaves: each matrix's moments, and the pair's co-moment
    C = Σ(a − ā)(b − b̄) and dot product ⟨A, B⟩."""

    def __init__(self) -> None:
        self.a, self.b = _Moments(), _Moments()
        self.c_ab, self.dot = 0.0, 0.0

    def merge(self, va: torch.Tensor, vb: torch.Tensor | None) -> None:
        """Add a chunk's entries of A (and the same entries of B), merging centred moments."""
        da, shift_a, w = self.a.merge(va)
        if vb is not None:
            db, shift_b, _ = self.b.merge(vb)
            self.dot += float(torch.dot(va, vb))
            self.c_ab += float(torch.dot(da, db)) + shift_a * shift_b * w


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def _one(
    a: torch.Tensor,
    b: torch.Tensor | None,
    pair: tuple[str, ...],
    single_a: bool,
    single_b: bool,
    tol: float,
    device: torch.device,
    chunk_bytes: int,
) -> tuple[dict[str, float], np.ndarray | None, np.ndarray | None, float, float]:
    """Pair metrics of A, B [out, in] (``pair``; b may be None when it is empty) and the
    eigenvalues of AᵀA, BᵀB when asked: (pair values, λ_A or None, λ_B or None, ‖A‖², ‖B‖²)."""
    out_dim, in_dim = int(a.shape[0]), int(a.shape[1])
    wide = out_dim < in_dim                      # T = Aᵀ: output neurons are T's columns
    ta = _tall(a)
    tb = None if b is None else _tall(b)
    rows, c = int(ta.shape[0]), int(ta.shape[1])
    want_cka = "cka" in pair
    gram_a = _Gram(c, device) if (want_cka or single_a) else None
    gram_b = _Gram(c, device) if (want_cka or single_b) and tb is not None else None
    per = max(1, chunk_bytes // (2 if tb is not None else 1))
    vec = lambda: torch.zeros(c, dtype=torch.float64, device=device)  # noqa: E731
    # in ≤ out: u = Tᵀm and ‖m‖² (m = row means); out < in: T's column sums and B_c A_cᵀ
    u_a, u_b = (vec(), vec()) if want_cka else (None, None)
    mm = [0.0, 0.0]
    cross = torch.zeros(c, c, dtype=torch.float64, device=device) if want_cka and wide else None

    sums = _Sums()
    chunks_b = _chunks(tb, device, per) if tb is not None else None
    for xa in _chunks(ta, device, per):
        xb = next(chunks_b) if chunks_b is not None else None
        sums.merge(xa.view(-1), None if xb is None else xb.view(-1))
        for x, g, u, i in ((xa, gram_a, u_a, 0), (xb, gram_b, u_b, 1)):
            if x is None:
                continue
            if g is not None:
                g.add(x)
            if want_cka:
                if wide:
                    u += x.sum(0)  # type: ignore[operator]
                else:
                    m = x.mean(1)  # [r] row means
                    u.addmv_(x.T, m)  # type: ignore[union-attr]
                    mm[i] += float(torch.dot(m, m))
        if cross is not None:
            cross.addmm_(xb.T, xa)  # type: ignore[union-attr]

    res: dict[str, float] = {}
    spread_a = sums.a.m2 > ZERO_SPREAD * sums.a.sq
    spread_b = sums.b.m2 > ZERO_SPREAD * sums.b.sq
    if "corr" in pair:
        res["corr"] = float(np.clip(_ratio(sums.c_ab, math.sqrt(sums.a.m2 * sums.b.m2)), -1, 1)) if spread_a and spread_b else math.nan
    if "cos" in pair:
        res["cos"] = float(np.clip(_ratio(sums.dot, math.sqrt(sums.a.sq * sums.b.sq)), -1, 1))
    std_a = math.sqrt(sums.a.m2 / sums.a.count) if spread_a else 0.0
    norm_a, norm_b = math.sqrt(sums.a.sq), math.sqrt(sums.b.sq)
    want_changed = "changed_frac" in pair and std_a > 0
    want_rel = "rel_l2" in pair and norm_a > 0 and norm_b > 0
    if want_changed or want_rel:
        # pass 2: what needs pass 1's totals
        thr = tol * std_a
        changed, rel2 = 0, 0.0
        for xa, xb in zip(_chunks(ta, device, per), _chunks(tb, device, per)):  # type: ignore[arg-type]
            if want_changed:
                changed += int(((xa - xb).abs_() > thr).sum())
            if want_rel:
                d = (xa / norm_a).sub_(xb, alpha=1.0 / norm_b).view(-1)
                rel2 += float(torch.dot(d, d))
        if want_changed:
            res["changed_frac"] = changed / sums.a.count
        if want_rel:
            res["rel_l2"] = min(2.0, math.sqrt(rel2))
    if "changed_frac" in pair and not want_changed:
        res["changed_frac"] = math.nan
    if "rel_l2" in pair and not want_rel:
        res["rel_l2"] = math.nan

    lam_a = lam_b = None
    ga = gram_a.full() if gram_a is not None else None
    gb = gram_b.full() if gram_b is not None else None
    if single_a:
        lam_a = _eigenvalues(ga)  # type: ignore[arg-type]
    if single_b:
        lam_b = _eigenvalues(gb)  # type: ignore[arg-type]
    if want_cka:
        # centre the Grams in place (λ are taken): K = G − u1ᵀ − 1uᵀ + ‖m‖²11ᵀ, or G − R·μμᵀ
        zero = False
        norms = []
        for g, u, i in ((ga, u_a, 0), (gb, u_b, 1)):
            g2 = _fro2(g)  # type: ignore[arg-type]
            if wide:
                mu = u / rows  # type: ignore[operator]
                g.addr_(mu, mu, alpha=-float(rows))  # type: ignore[union-attr]
            else:
                g.sub_(u[:, None]).sub_(u[None, :]).add_(mm[i])  # type: ignore[union-attr,index]
            k2, is_zero = _centred_norm2(g, g2)  # type: ignore[arg-type]
            zero = zero or is_zero
            norms.append(math.sqrt(k2))
        if zero:
            res["cka"] = math.nan
        else:
            if wide:
                cross.addr_(u_b / rows, u_a / rows, alpha=-float(rows))  # type: ignore[union-attr,operator]
                num = _fro2(cross)  # type: ignore[arg-type]
            else:
                num = float(torch.dot(ga.reshape(-1), gb.reshape(-1)))  # type: ignore[union-attr]
            res["cka"] = float(np.clip(_ratio(num, norms[0] * norms[1]), 0.0, 1.0))
    return res, lam_a, lam_b, sums.a.sq, sums.b.sq


# ----------------------------------------------------------------------------------------------
# Single-matrix metrics from spectra
# ----------------------------------------------------------------------------------------------
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


def _effective_rank(sigma: np.ndarray, shape: tuple[int, int]) -> float:
    s1 = float(sigma[0])
    if not s1 > 0:
        return math.nan
    kept = sigma[sigma > max(shape) * RANK_EPS * s1]
    p = kept / kept.sum()
    return float(math.exp(-np.sum(p * np.log(p))))


def metrics_from_spectra(sp: Spectra, metrics: str | Iterable[str] = SINGLE_METRICS,
                         floor: float = EVALS_FLOOR) -> dict[str, np.ndarray]:
    """The single-matrix metrics from :class:`Spectra`: {name: float64 array [B]}. ``floor`` is
    α's eigenvalue floor (WeightWatcher's 1e-5, see :mod:`moelens.metrics.power_law`)."""
    names = check_metric_names(metrics, "single")
    lam = sp.eigenvalues
    lam1 = lam[:, 0]
    out: dict[str, np.ndarray] = {}
    out["fro_norm"] = np.sqrt(sp.fro2)
    out["spectral_norm"] = np.sqrt(lam1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["stable_rank"] = np.where(lam1 > 0, sp.fro2 / lam1, np.nan)
    if "effective_rank" in names:
        out["effective_rank"] = np.array([_effective_rank(np.sqrt(row), sp.shape) for row in lam], dtype=np.float64)
    if "alpha" in names:
        if min(sp.shape) < MIN_EVALS:
            out["alpha"] = np.full(lam.shape[0], np.nan)
        else:
            out["alpha"] = np.array([power_law_alpha(row, floor) for row in lam], dtype=np.float64)
    return {n: out[n] for n in names}


def spectra(
    w: torch.Tensor,
    device: str | torch.device = DEFAULT_DEVICE,
    dtype: str = "float64",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    svd_bytes: int = DEFAULT_SVD_BYTES,
) -> Spectra:
    """The eigenvalues of WᵀW of every matrix of ``w`` [B, out, in] (or one [out, in]).

    ``dtype="float64"``: eigenvalues of the float64 Gram TᵀT [c, c], streamed in chunks (memory:
    one Gram, twice while it is mirrored). ``dtype="float32"``: ``torch.linalg.svdvals`` in
    float32, one matrix at a time on the CPU, batches of up to ``svd_bytes`` on CUDA."""
    if dtype not in SPECTRUM_DTYPES:
        raise ConfigError(f"unknown spectrum dtype {dtype!r}; expected {' or '.join(SPECTRUM_DTYPES)}")
    s = _as_stack(w, "w")
    dev = resolve_device(device)
    n_mat = int(s.shape[0])
    shape = (int(s.shape[1]), int(s.shape[2]))
    lam = np.zeros((n_mat, min(shape)), dtype=np.float64)
    fro2 = np.zeros(n_mat, dtype=np.float64)
    with torch.no_grad(), full_precision():
        if dtype == "float64":
            for k in range(n_mat):
                _, lam_k, _, fro2[k], _ = _one(s[k], None, (), True, False, 0.0, dev, int(chunk_bytes))
                lam[k] = lam_k  # type: ignore[assignment]
        else:
            for k in range(n_mat):
                for x in _chunks(_tall(s[k]), dev, chunk_bytes):
                    fro2[k] += float(torch.dot(x.view(-1), x.view(-1)))
            per = 1 if dev.type == "cpu" else max(1, int(svd_bytes) // (shape[0] * shape[1] * 4))
            for g0 in range(0, n_mat, per):
                block = s[g0:g0 + per].to(device=dev, dtype=torch.float32)  # [g, out, in]
                sig = torch.linalg.svdvals(block).double().cpu().numpy()      # [g, c] descending
                lam[g0:g0 + sig.shape[0]] = sig * sig
                del block
    return Spectra(eigenvalues=lam, fro2=fro2, shape=shape, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# The API
# ----------------------------------------------------------------------------------------------
def pair_metrics(
    a: torch.Tensor,
    b: torch.Tensor,
    metrics: str | Iterable[str] = PAIR_METRICS,
    tol: float = DEFAULT_TOL,
    device: str | torch.device = DEFAULT_DEVICE,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, np.ndarray]:
    """Pair metrics of A[k] vs B[k] for each k of two stacks [B, out, in] (or two matrices [out, in]).

    ``a`` and ``b`` as stored (bfloat16, float32, ...; any device); each matrix is streamed to
    ``device`` in float64 chunks of about ``chunk_bytes`` for the pair (a few are alive at once),
    plus for ``cka`` two c×c float64 Grams (three when out < in). Each pair is read once, twice
    when ``changed_frac`` or ``rel_l2`` is asked for (their threshold and norms need the first
    pass's totals).

    Returns {name: float64 array [B]} for the names of ``metrics`` (see the module docstring for
    the formulas; NaN where a metric is undefined). For deltas pass A − base and B − base."""
    return pair_and_single_metrics(a, b, metrics, (), tol, device, chunk_bytes).pair


def single_metrics(
    w: torch.Tensor,
    metrics: str | Iterable[str] = SINGLE_METRICS,
    device: str | torch.device = DEFAULT_DEVICE,
    dtype: str = "float64",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, np.ndarray]:
    """Single-matrix metrics of every matrix of ``w`` [B, out, in] (or one [out, in]):
    {name: float64 array [B]}.

    ``fro_norm`` alone is one float64 pass over each matrix; the others come from
    :func:`spectra` with ``dtype`` (see the module docstring for precision and cost)."""
    names = check_metric_names(metrics, "single")
    if names == ("fro_norm",):
        s = _as_stack(w, "w")
        dev = resolve_device(device)
        fro2 = np.zeros(int(s.shape[0]))
        with torch.no_grad():
            for k in range(int(s.shape[0])):
                for x in _chunks(_tall(s[k]), dev, chunk_bytes):
                    fro2[k] += float(torch.dot(x.view(-1), x.view(-1)))
        return {"fro_norm": np.sqrt(fro2)}
    return metrics_from_spectra(spectra(w, device=device, dtype=dtype, chunk_bytes=chunk_bytes), names)


@dataclass(frozen=True)
class PairAndSingleMetrics:
    """:func:`pair_and_single_metrics`' result: ``pair`` (A vs B), ``a`` and ``b`` (single-matrix),
    each {name: float64 array [B]} (empty dicts for what was not asked)."""

    pair: dict[str, np.ndarray]
    a: dict[str, np.ndarray]
    b: dict[str, np.ndarray]


def pair_and_single_metrics(
    a: torch.Tensor,
    b: torch.Tensor,
    pair: str | Iterable[str] = PAIR_METRICS,
    single: str | Iterable[str] = SINGLE_METRICS,
    tol: float = DEFAULT_TOL,
    device: str | torch.device = DEFAULT_DEVICE,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> PairAndSingleMetrics:
    """Pair metrics of A vs B and single metrics of A and of B for two stacks [B, out, in], in one
    streaming pass (two with ``changed_frac``/``rel_l2``): each matrix's Gram is formed once
    and serves both its spectrum (float64) and CKA. Same values as :func:`pair_metrics` and
    :func:`single_metrics` (to rounding), about 1.5–2× less work than calling both. ``pair`` or
    ``single`` may be empty (``()``)."""
    pair = pair if isinstance(pair, str) else tuple(pair)
    single = single if isinstance(single, str) else tuple(single)
    pair_names = check_metric_names(pair, "pair") if pair else ()
    single_names = check_metric_names(single, "single") if single else ()
    tol = _check_tol(tol)
    sa, sb = _as_stack(a, "a"), _as_stack(b, "b")
    _same_shape(sa, sb)
    dev = resolve_device(device)
    n_mat = int(sa.shape[0])
    shape = (int(sa.shape[1]), int(sa.shape[2]))
    want_spectra = bool(single_names)
    rows: list[dict[str, float]] = []
    lam = np.zeros((2, n_mat, min(shape)), dtype=np.float64)
    fro2 = np.zeros((2, n_mat), dtype=np.float64)
    with torch.no_grad(), full_precision():
        for k in range(n_mat):
            res, la, lb, fro2[0, k], fro2[1, k] = _one(sa[k], sb[k], pair_names, want_spectra, want_spectra,
                                                      tol, dev, int(chunk_bytes))
            rows.append(res)
            if want_spectra:
                lam[0, k], lam[1, k] = la, lb  # type: ignore[assignment]
    pair_out = {n: np.array([r[n] for r in rows], dtype=np.float64) for n in pair_names}
    singles = [
        metrics_from_spectra(Spectra(lam[i], fro2[i], shape, "float64"), single_names) if single_names else {}
        for i in (0, 1)
    ]
    return PairAndSingleMetrics(pair=pair_out, a=singles[0], b=singles[1])
