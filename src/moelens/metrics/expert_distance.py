"""Expert distance (docs/methods.md §2, §7): relative L2 and singular-vector alignment of pairs of experts.

For two matrices A, B of one shape [out, in]:

    rel_l2(A, B)   = ‖A/‖A‖_F − B/‖B‖_F‖_F = √(2 − 2⟨A, B⟩ / (‖A‖_F ‖B‖_F))   ∈ [0, 2]
    sv_align(A, B) = R = ⟨U_nᴬ V_nᴬᵀ, U_nᴮ V_nᴮᵀ⟩_F / n,   n = min(n_A, n_B)

with n_X the singular values of X kept (σ_i ≥ γσ₁, or a fixed ``top_sv``; see
:mod:`moelens.metrics.singular`). Unrelated experts give rel_l2 ≈ √2 and R ≈ 0; identical
ones 0 and 1. For the whole expert (row ``matrix = "expert"``) A is gate, up and down
concatenated, so its rel_l2 needs the per-role sums ⟨A_m, B_m⟩, ‖A_m‖², ‖B_m‖² (kept here in
float64, which is what makes 2 − 2cos exact enough at tiny distances, see
:mod:`moelens.metrics.inner`); its sv_align pools the roles' R (:func:`expert_distances`).

Work is one role at a time — memory holds one role of one layer of the two stacks — and each
expert is decomposed once per role, whatever the number of pairs it is in:

>>> pairs = within_pairs(layer.n_experts)
>>> per_role = {r: role_distances(layer.expert_stack(r), None, pairs) for r in ("gate", "up", "down")}
>>> row = expert_distances(per_role, pool="mean")      # rel_l2, sv_align, n_sv per pair
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from moelens.choices import DEFAULT_DEVICE, DEFAULT_GAMMA, POOLS, check_options
from moelens.errors import ConfigError
from moelens.metrics.inner import DEFAULT_CHUNK_BYTES, pair_dots, squared_norms
from moelens.metrics.pairs import check_pairs
from moelens.metrics.singular import decompose
from moelens.metrics.sv_align import projector_overlaps
from moelens.spectral import full_precision, resolve_device, resolve_dtype


@dataclass(frozen=True)
class RoleDistances:
    """Distances of P pairs of experts for one matrix role, or pooled over roles (``"expert"``).

    Arrays are [P], in the order of ``pairs`` [P, 2] (left index, right index):

    - ``dot`` ⟨A, B⟩_F, ``norm_a2`` ‖A‖_F², ``norm_b2`` ‖B‖_F² (float64; sums over roles when pooled);
    - ``n_a``, ``n_b`` kept singular values of each side, ``n_sv`` = min(n_a, n_b) (pooled: Σ_m);
    - ``overlap`` = n_sv · R = ⟨U_nᴬV_nᴬᵀ, U_nᴮV_nᴮᵀ⟩_F (pooled: Σ_m);
    - ``rel_l2`` ∈ [0, 2], NaN where a matrix is zero;
    - ``sv_align`` R, NaN where n_sv = 0 (a zero matrix): see :attr:`undefined`."""

    pairs: np.ndarray
    dot: np.ndarray
    norm_a2: np.ndarray
    norm_b2: np.ndarray
    n_a: np.ndarray
    n_b: np.ndarray
    n_sv: np.ndarray
    overlap: np.ndarray
    rel_l2: np.ndarray
    sv_align: np.ndarray

    def __len__(self) -> int:
        return int(self.pairs.shape[0])

    @property
    def undefined(self) -> np.ndarray:
        """[P] bool: pairs without an sv_align (NaN), for the caller to count and warn about."""
        return np.isnan(self.sv_align)


def rel_l2_from(dot: np.ndarray, norm_a2: np.ndarray, norm_b2: np.ndarray) -> np.ndarray:
    """rel_l2 = √(2 − 2⟨A,B⟩/(‖A‖‖B‖)), clipped to [0, 2]; NaN where a norm is 0."""
    dot, na, nb = (np.asarray(v, dtype=np.float64) for v in (dot, norm_a2, norm_b2))
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = dot / np.sqrt(na * nb)
        out = np.sqrt(np.clip(2.0 - 2.0 * cos, 0.0, 4.0))
    return np.where((na > 0) & (nb > 0), out, np.nan)


def sv_align_from(overlap: np.ndarray, n_sv: np.ndarray) -> np.ndarray:
    """R = overlap / n_sv; NaN where n_sv = 0."""
    n = np.asarray(n_sv, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n > 0, np.asarray(overlap, dtype=np.float64) / n, np.nan)


def role_distances(
    a: torch.Tensor,
    b: torch.Tensor | None,
    pairs: np.ndarray | torch.Tensor | Sequence[Sequence[int]],
    gamma: float = DEFAULT_GAMMA,
    top_sv: int | None = None,
    device: str | torch.device = DEFAULT_DEVICE,
    dtype: str = "float32",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> RoleDistances:
    """rel_l2 and sv_align of ``pairs`` of experts for one matrix role.

    ``a`` [E_a, out, in] and ``b`` [E_b, out, in] (or None: the pairs lie within ``a``) as stored
    (bf16 is fine; each matrix is converted on ``device`` when used); ``pairs`` [P, 2] index a and
    b (or a). Decompositions run in ``dtype`` ("float32" or "float64"; see
    :mod:`moelens.metrics.singular` for when float32 is redone in float64), every inner product
    is accumulated in float64. A zero matrix gives NaN, never an exception.

    Memory above the inputs, in ``dtype`` on ``device``: the factors V [c, c] of every matrix in
    a pair (c = min(out, in)), and a projector [max(out, in), c] for each matrix whose pairs are
    not all done (:mod:`moelens.metrics.sv_align`): two for base→tuned pairs at a real shape,
    up to E for within pairs, i.e. at most one role of one layer in float32; plus
    ``chunk_bytes`` for the float64 inner products."""
    check_options(gamma, top_sv, None)
    if a.ndim != 3 or (b is not None and b.ndim != 3):
        raise ConfigError(f"expert stacks must be [E, out, in]; got {tuple(a.shape)} and {None if b is None else tuple(b.shape)}")
    if b is not None and tuple(b.shape[1:]) != tuple(a.shape[1:]):
        raise ConfigError(f"the two stacks hold matrices of different shapes, {tuple(a.shape[1:])} and {tuple(b.shape[1:])}; pair experts of the same role and architecture")
    check_options(gamma, top_sv, a.shape[1:])
    right = a if b is None else b
    p = check_pairs(pairs, a.shape[0], right.shape[0])
    dev = resolve_device(device)
    compute = resolve_dtype(dtype)
    li, ri = p[:, 0].contiguous(), p[:, 1].contiguous()

    with torch.no_grad(), full_precision():
        dot = pair_dots(a, right, li, ri, dev, chunk_bytes)
        norm_a2 = squared_norms(a, li, dev, chunk_bytes)
        norm_b2 = squared_norms(right, ri, dev, chunk_bytes)

        # one node per distinct matrix: indices of a, then of b (shared with a for within pairs)
        ua = torch.unique(li if b is not None else torch.cat([li, ri]))
        ub = torch.unique(ri) if b is not None else ua
        matrices = [a[int(i)] for i in ua] + ([b[int(j)] for j in ub] if b is not None else [])
        lnode = torch.searchsorted(ua, li)
        rnode = torch.searchsorted(ub, ri) + (len(ua) if b is not None else 0)
        factors = decompose(matrices, float(gamma), top_sv, dev, compute)
        overlap, n_sv = projector_overlaps(matrices, factors, lnode, rnode, dev, compute, chunk_bytes)

    dot_np, na_np, nb_np = (t.cpu().numpy() for t in (dot, norm_a2, norm_b2))
    ov = overlap.cpu().numpy()
    n_np = n_sv.numpy()
    return RoleDistances(
        pairs=p.numpy(), dot=dot_np, norm_a2=na_np, norm_b2=nb_np,
        n_a=factors.n[lnode].numpy(), n_b=factors.n[rnode].numpy(),
        n_sv=n_np, overlap=ov, rel_l2=rel_l2_from(dot_np, na_np, nb_np), sv_align=sv_align_from(ov, n_np),
    )


def expert_distances(per_role: Mapping[str, RoleDistances], pool: str = "mean") -> RoleDistances:
    """The row ``matrix = "expert"``: the roles of one set of pairs pooled.

    rel_l2 of the concatenation, from the summed ⟨A_m, B_m⟩, ‖A_m‖², ‖B_m‖²; n_sv = Σ_m n_m;
    sv_align

        pool="mean":  (1/M) Σ_m R_m                      (NaN if any role's R is NaN)
        pool="ito":   Σ_m n_m R_m / Σ_m n_m = Σ_m overlap_m / Σ_m n_m   (Ito et al.'s pooled ratio)

    A zero matrix (n_m = 0) adds nothing to Ito's ratio, which stays defined while Σ_m n_m > 0."""
    if pool not in POOLS:
        raise ConfigError(f"unknown pool {pool!r}; expected one of {', '.join(POOLS)}")
    if not per_role:
        raise ConfigError("no matrix roles to pool; pass at least one of gate, up, down")
    rows = list(per_role.values())
    first = rows[0]
    for r in rows[1:]:
        if r.pairs.shape != first.pairs.shape or not np.array_equal(r.pairs, first.pairs):
            raise ConfigError("the roles to pool hold different pairs; compute every role with the same pairs")

    def total(name: str) -> np.ndarray:
        return np.sum([getattr(r, name) for r in rows], axis=0)

    dot, na, nb, overlap, n_sv = (total(k) for k in ("dot", "norm_a2", "norm_b2", "overlap", "n_sv"))
    if pool == "mean":
        sv = np.mean([r.sv_align for r in rows], axis=0)
    else:
        sv = sv_align_from(overlap, n_sv)
    return RoleDistances(
        pairs=first.pairs, dot=dot, norm_a2=na, norm_b2=nb, n_a=total("n_a"), n_b=total("n_b"),
        n_sv=n_sv, overlap=overlap, rel_l2=rel_l2_from(dot, na, nb), sv_align=np.asarray(sv, dtype=np.float64),
    )
