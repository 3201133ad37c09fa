"""Projector overlaps of many pairs of matrices, each matrix decomposed once (Ito et al. 2024).

For matrices A, B of one shape with kept counts n_A, n_B and n = min(n_A, n_B),

    overlap = Σ_{i,j≤n} (u_iᴬ·u_jᴮ)(v_iᴬ·v_jᴮ) = ⟨P_nᴬ, P_nᴮ⟩_F,   P_n = U_n V_nᵀ = Σ_{i≤n} u_i v_iᵀ,
    sv_align R = overlap / n.

P_n is unchanged by a sign flip of a pair (u_i, v_i) and by a rotation inside a degenerate block
of σ, so R is too. A pair's n depends on both matrices, so one matrix meets its partners at
several n. The pairs are processed by ascending n ("levels"); each matrix's projector is built
up incrementally, only over the levels it takes part in,

    P⁽ⁿ'⁾ = P⁽ⁿ⁾ + U[:, n:n'] V[:, n:n']ᵀ.

A level's pairs are taken in steps of at most ``max(1, step_bytes // (2 · R·c·itemsize))``
pairs when that holds fewer projectors alive at once than whole levels do, and the overlaps of a step's pairs come from one float64 pass over their projectors
(:func:`moelens.metrics.inner.pair_dots`). A projector lives from the first step its matrix
takes part in to the last, in a slot of a buffer [slots, R, c] with as many slots as projectors
are ever alive at once: up to all E matrices of a layer for within pairs, two for base→tuned
pairs at a real expert's shape (where a step is one pair). The columns U[:, n:n'] an increment
needs are computed then, X V[:, n:n'] / σ: over a projector's life that is the product X V_m
once, without holding U_m. Steps change which projectors are alive at once, not
what is computed: each pair's overlap is the same float64 inner product of the same two
projectors, grouped with other pairs' (which moves its last bits, ~1e-16 relative).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moelens.metrics.inner import DEFAULT_CHUNK_BYTES, pair_dots
from moelens.metrics.singular import Factors, tall

# Projector memory a step may bring in: a few small matrices' worth, one pair at Mixtral's shape
DEFAULT_STEP_BYTES = 256 * 2**20


def _live_spans(levels: torch.Tensor, li: torch.Tensor, ri: torch.Tensor, n_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last level (or step) index [n_nodes] each matrix takes part in (−1 where none)."""
    first = torch.full((n_nodes,), torch.iinfo(torch.int64).max, dtype=torch.int64)
    last = torch.full((n_nodes,), -1, dtype=torch.int64)
    for side in (li, ri):
        first.scatter_reduce_(0, side, levels, reduce="amin")
        last.scatter_reduce_(0, side, levels, reduce="amax")
    first[last < 0] = -1
    return first, last


def _max_alive(first: torch.Tensor, last: torch.Tensor, n_levels: int) -> int:
    """Largest number of [first, last] spans that contain one level (or step)."""
    used = last >= 0
    delta = torch.zeros(n_levels + 1, dtype=torch.int64)
    delta.index_add_(0, first[used], torch.ones(int(used.sum()), dtype=torch.int64))
    delta.index_add_(0, last[used] + 1, -torch.ones(int(used.sum()), dtype=torch.int64))
    return int(delta.cumsum(0).max()) if n_levels else 0


def _steps(level: torch.Tensor, per_step: int) -> torch.Tensor:
    """Step index [A] of pairs sorted by ``level`` [A]: each level's pairs in runs of at most
    ``per_step``, in their order; steps are numbered across levels."""
    _, counts = torch.unique_consecutive(level, return_counts=True)
    chunks = (counts + per_step - 1) // per_step  # steps per level
    start = torch.cumsum(chunks, 0) - chunks  # first step of each level
    offset = torch.cat([torch.arange(int(c)) for c in counts.tolist()])  # rank inside the level
    return torch.repeat_interleave(start, counts) + offset // per_step


def _schedule(
    level: torch.Tensor, li: torch.Tensor, ri: torch.Tensor, n_nodes: int, per_step: int,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(step [A], last step [n_nodes], slots) for pairs sorted by level.

    Steps of at most ``per_step`` pairs when they hold fewer projectors alive at once than whole
    levels; otherwise (within pairs: every expert meets every other) one step per level, since
    :func:`pair_dots` is fastest with all of a level's pairs at once."""
    first_level, last_level = _live_spans(level, li, ri, n_nodes)
    by_level = _max_alive(first_level, last_level, int(level[-1]) + 1)
    step = _steps(level, per_step)
    first, last = _live_spans(step, li, ri, n_nodes)
    slots = _max_alive(first, last, int(step[-1]) + 1)
    if slots >= by_level:
        # levels are numbered 0.. without gaps here: the caller's levels are ranks of values
        return level, last_level, by_level
    return step, last, slots


def projector_overlaps(
    matrices: Sequence[torch.Tensor],
    factors: Factors,
    li: torch.Tensor,
    ri: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    step_bytes: int = DEFAULT_STEP_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(overlap float64 [P], n int64 [P]) for pairs (matrices[li[p]], matrices[ri[p]]).

    ``matrices`` [out, in] as stored, ``factors`` their decompositions; projectors are built in
    ``dtype`` (float64 when any matrix was refined in float64). overlap is 0 where n = 0.
    ``step_bytes`` bounds the projectors a step of pairs brings in (see the module's text)."""
    n_pairs = int(li.numel())
    n_pair = torch.minimum(factors.n[li], factors.n[ri])  # [P]
    overlap = torch.zeros(n_pairs, dtype=torch.float64, device=device)
    active = n_pair > 0
    if not bool(active.any()):
        return overlap, n_pair
    values = torch.unique(n_pair[active])  # ascending
    level = torch.searchsorted(values, n_pair)  # [P] level index (meaningless where n = 0)
    act = active.nonzero().squeeze(1)
    act = act[torch.argsort(level[act], stable=True)]  # by level, pairs' order kept inside one

    buf_dtype = torch.float64 if bool(factors.refined.any()) else dtype
    rows, cols = tall(matrices[0]).shape
    itemsize = torch.empty((), dtype=buf_dtype).element_size()
    per_step = max(1, int(step_bytes) // (2 * rows * cols * itemsize))
    step, last, slots = _schedule(level[act], li[act], ri[act], len(matrices), per_step)
    n_steps = int(step[-1]) + 1

    proj = torch.zeros(slots, rows, cols, dtype=buf_dtype, device=device)  # [S, R, c] P⁽ⁿ⁾ per live matrix
    slot_of = torch.full((len(matrices),), -1, dtype=torch.int64)
    built = torch.zeros(len(matrices), dtype=torch.int64)  # n of each live projector
    free = list(range(slots - 1, -1, -1))
    bounds = torch.searchsorted(step, torch.arange(n_steps + 1)).tolist()  # pairs of step t: act[bounds[t]:bounds[t+1]]

    for t in range(n_steps):
        at = act[bounds[t]:bounds[t + 1]]  # pairs of this step, all of one level
        n = int(n_pair[at[0]])
        nodes = torch.unique(torch.cat([li[at], ri[at]])).tolist()
        for e in nodes:
            if int(slot_of[e]) < 0:
                s = free.pop()
                slot_of[e] = s
                built[e] = 0
                proj[s].zero_()
            s, b = int(slot_of[e]), int(built[e])
            if b < n:
                v = factors.basis[e][:, b:n]  # [c, n − b]
                x = tall(matrices[e]).to(device=device, dtype=v.dtype)  # [R, c]
                u = (x @ v) / factors.sigma[e][b:n]  # U[:, b:n] = X V[:, b:n] / σ[b:n]
                proj[s].addmm_(u.to(buf_dtype), v.to(buf_dtype).T)
                built[e] = n
        overlap[at.to(device)] = pair_dots(proj, proj, slot_of[li[at]], slot_of[ri[at]], device, chunk_bytes)
        for e in nodes:
            if int(last[e]) == t:
                free.append(int(slot_of[e]))
                slot_of[e] = -1
    return overlap, n_pair
