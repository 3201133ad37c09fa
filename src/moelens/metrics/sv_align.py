"""Projector overlaps of many pairs of matrices, each matrix decomposed once (Ito et al. 2024).

For matrices A, B of one shape with kept counts n_A, n_B and n = min(n_A, n_B),

    overlap = Σ_{i,j≤n} (u_iᴬ·u_jᴮ)(v_iᴬ·v_jᴮ) = ⟨P_nᴬ, P_nᴮ⟩_F,   P_n = U_n V_nᵀ = Σ_{i≤n} u_i v_iᵀ,
    sv_align R = overlap / n.

P_n is unchanged by a sign flip of a pair (u_i, v_i) and by a rotation inside a degenerate block
of σ, so R is too. A pair's n depends on both matrices, so one matrix meets its partners at
several n. The pairs are processed by ascending n ("levels"); each matrix's projector is built
up incrementally, only over the levels it takes part in,

    P⁽ⁿ'⁾ = P⁽ⁿ⁾ + U[:, n:n'] V[:, n:n']ᵀ,

and the overlaps of all pairs of a level come from one float64 pass over their projectors
(:func:`moelens.metrics.inner.pair_dots`). A projector lives from the first level its matrix
takes part in to the last, in a slot of a buffer [slots, R, c] with as many slots as projectors
are ever alive at once: all E matrices of a layer for within pairs, two for base→tuned pairs.
U_m (m the last level) is cached beside it in a buffer [slots, R, m_max].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moelens.metrics.inner import DEFAULT_CHUNK_BYTES, pair_dots
from moelens.metrics.singular import Factors, tall


def _live_spans(levels: torch.Tensor, li: torch.Tensor, ri: torch.Tensor, n_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last level index [n_nodes] each matrix takes part in (−1 where none)."""
    first = torch.full((n_nodes,), torch.iinfo(torch.int64).max, dtype=torch.int64)
    last = torch.full((n_nodes,), -1, dtype=torch.int64)
    for side in (li, ri):
        first.scatter_reduce_(0, side, levels, reduce="amin")
        last.scatter_reduce_(0, side, levels, reduce="amax")
    first[last < 0] = -1
    return first, last


def _max_alive(first: torch.Tensor, last: torch.Tensor, n_levels: int) -> int:
    """Largest number of [first, last] spans that contain one level."""
    used = last >= 0
    delta = torch.zeros(n_levels + 1, dtype=torch.int64)
    delta.index_add_(0, first[used], torch.ones(int(used.sum()), dtype=torch.int64))
    delta.index_add_(0, last[used] + 1, -torch.ones(int(used.sum()), dtype=torch.int64))
    return int(delta.cumsum(0).max()) if n_levels else 0


def projector_overlaps(
    matrices: Sequence[torch.Tensor],
    factors: Factors,
    li: torch.Tensor,
    ri: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(overlap float64 [P], n int64 [P]) for pairs (matrices[li[p]], matrices[ri[p]]).

    ``matrices`` [out, in] as stored, ``factors`` their decompositions; projectors are built in
    ``dtype`` (float64 when any matrix was refined in float64). overlap is 0 where n = 0."""
    n_pairs = int(li.numel())
    n_pair = torch.minimum(factors.n[li], factors.n[ri])  # [P]
    overlap = torch.zeros(n_pairs, dtype=torch.float64, device=device)
    active = n_pair > 0
    if not bool(active.any()):
        return overlap, n_pair
    values = torch.unique(n_pair[active])  # ascending
    level = torch.searchsorted(values, n_pair)  # [P] level index (meaningless where n = 0)
    act = active.nonzero().squeeze(1)
    first, last = _live_spans(level[act], li[act], ri[act], len(matrices))
    slots = _max_alive(first, last, len(values))

    buf_dtype = torch.float64 if bool(factors.refined.any()) else dtype
    rows, cols = tall(matrices[0]).shape
    m_max = int(values[-1])
    proj = torch.zeros(slots, rows, cols, dtype=buf_dtype, device=device)  # [S, R, c] P⁽ⁿ⁾ per live matrix
    ucache = torch.zeros(slots, rows, m_max, dtype=buf_dtype, device=device)  # [S, R, m] U_m per live matrix
    slot_of = torch.full((len(matrices),), -1, dtype=torch.int64)
    built = torch.zeros(len(matrices), dtype=torch.int64)  # n of each live projector
    free = list(range(slots - 1, -1, -1))

    for t, n in enumerate(values.tolist()):
        at = act[level[act] == t]  # pairs of this level
        nodes = torch.unique(torch.cat([li[at], ri[at]])).tolist()
        for e in nodes:
            if int(slot_of[e]) < 0:
                s = free.pop()
                slot_of[e] = s
                built[e] = 0
                proj[s].zero_()
                m = int(values[int(last[e])])
                v = factors.basis[e][:, :m]
                x = tall(matrices[e]).to(device=device, dtype=v.dtype)  # [R, c]
                ucache[s, :, :m] = (x @ v) / factors.sigma[e][:m]  # U_m = X V_m / σ_m
            s, b = int(slot_of[e]), int(built[e])
            if b < n:
                v = factors.basis[e][:, b:n].to(buf_dtype)  # [c, n − b]
                proj[s].addmm_(ucache[s, :, b:n], v.T)
                built[e] = n
        overlap[at.to(device)] = pair_dots(proj, proj, slot_of[li[at]], slot_of[ri[at]], device, chunk_bytes)
        for e in nodes:
            if int(last[e]) == t:
                free.append(int(slot_of[e]))
                slot_of[e] = -1
    return overlap, n_pair
