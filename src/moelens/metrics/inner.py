"""Frobenius inner products of many pairs of equal-shape matrices, accumulated in float64.

    dots[p] = ⟨L[li[p]], R[ri[p]]⟩_F = Σ_{r,c} L[li[p], r, c] · R[ri[p], r, c]

Why float64: the distances built on these products cancel. rel_l2² = 2 − 2⟨A,B⟩/(‖A‖‖B‖) for
near-identical experts is a difference of numbers near 2, and an error δ in the cosine moves
rel_l2 by √(2δ) at zero distance; float32 sums (δ ≈ 1e-7) would give 4e-4. The stacks may be
stored in bfloat16 or float32: every such value is exact in float64, so the products are exact
and only the float64 summation rounds (relative 1e-13 at N = 6e7 terms).

The matrices are streamed in chunks of rows, each converted to float64 on the compute device,
so memory above the inputs is bounded by ``chunk_bytes``. A chunk takes the rows of every matrix
of a stack when the pairs use at least half of them (a strided view, no gather from the large
stack), else of the matrices used only. Two layouts of the work:

- block: when the pairs cover much of the grid of their distinct left × right matrices (within
  pairs, all i < j), one matrix product of the chunk [|L|, k] × [k, |R|] per chunk;
- gathered: otherwise (base→tuned pairs, e with e), the pairs' own rows side by side, so E pairs
  cost E dot products, not E².
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_BYTES = 16 * 2**20
# block layout when |distinct left| · |distinct right| ≤ this × P: a GEMM does a product much
# faster than a batch of dot products, so some wasted grid cells still pay off
BLOCK_WASTE = 16


def _source(stack: torch.Tensor, used: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(matrices a chunk takes from ``stack``: None for all, else indices on its device;
    position of each ``used`` index [n] among them, CPU)."""
    k = int(stack.shape[0])
    uniq, pos = torch.unique(used, return_inverse=True)
    if 2 * uniq.numel() >= k:
        return None, used
    return uniq.to(stack.device), pos


def _chunk(stack: torch.Tensor, take: torch.Tensor | None, r0: int, r1: int, device: torch.device) -> torch.Tensor:
    """Rows r0:r1 of the taken matrices, float64 on ``device``, flattened: [n, (r1 − r0)·cols]."""
    part = stack[:, r0:r1] if take is None else stack[take, r0:r1]
    return part.to(device=device, dtype=torch.float64).reshape(part.shape[0], -1)


def _grid_side(n_distinct: int, inv: torch.Tensor, pos: torch.Tensor, n_chunk: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """For one side of the block layout: which chunk rows enter the product (None: all of
    them) and, per pair, its row in that product. ``inv`` [P] numbers the side's distinct
    matrices, ``pos`` [P] is each pair's row in the chunk of ``n_chunk`` rows."""
    if 2 * n_distinct >= n_chunk:
        return None, pos
    rows = torch.zeros(n_distinct, dtype=torch.int64).scatter_(0, inv, pos)
    return rows, inv


def pair_dots(
    left: torch.Tensor,
    right: torch.Tensor,
    li: torch.Tensor,
    ri: torch.Tensor,
    device: torch.device,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """float64 [P] on ``device``: ⟨left[li[p]], right[ri[p]]⟩_F for stacks [K, rows, cols] of
    equal matrix shape (any dtype, any device; indices are CPU int64)."""
    n_pairs = int(li.numel())
    out = torch.zeros(n_pairs, dtype=torch.float64, device=device)
    if n_pairs == 0:
        return out
    ul, inv_l = torch.unique(li, return_inverse=True)
    ur, inv_r = torch.unique(ri, return_inverse=True)
    block = ul.numel() * ur.numel() <= BLOCK_WASTE * n_pairs
    shared = left is right
    if shared:
        take_l, pos = _source(left, torch.cat([li, ri]))
        take_r, pos_l, pos_r = take_l, pos[:n_pairs], pos[n_pairs:]
    else:
        take_l, pos_l = _source(left, li)
        take_r, pos_r = _source(right, ri)
    n_l = left.shape[0] if take_l is None else take_l.numel()
    n_r = 0 if shared else (right.shape[0] if take_r is None else take_r.numel())
    if block:
        # the product of the chunks' distinct rows, or of the whole chunk when that is most of
        # it (a gather would copy the chunk); each pair reads its cell of the grid
        sel_l, cell_l = _grid_side(ul.numel(), inv_l, pos_l, n_l)
        sel_r, cell_r = _grid_side(ur.numel(), inv_r, pos_r, n_r or n_l)
        sel_l = None if sel_l is None else sel_l.to(device)
        sel_r = None if sel_r is None else sel_r.to(device)
        cell_l, cell_r = cell_l.to(device), cell_r.to(device)
    else:
        sel_l, sel_r = pos_l.to(device), pos_r.to(device)
    rows, cols = left.shape[-2], left.shape[-1]
    # float64 rows alive per chunk row: the chunks, plus the pairs' gathered rows
    width = n_l + n_r + (0 if block else 2 * n_pairs)
    step = max(1, chunk_bytes // max(1, width * cols * 8))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        cl = _chunk(left, take_l, r0, r1, device)  # [n_l, k]
        cr = cl if shared else _chunk(right, take_r, r0, r1, device)  # [n_r, k]
        lc = cl if sel_l is None else cl[sel_l]
        rc = cr if sel_r is None else cr[sel_r]
        if block:
            out += (lc @ rc.T)[cell_l, cell_r]
        else:
            out += torch.bmm(lc.unsqueeze(1), rc.unsqueeze(2)).view(-1)  # row-wise dots, no [P, k] temporary
    return out


def squared_norms(stack: torch.Tensor, index: torch.Tensor, device: torch.device, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """float64 [len(index)] on ``device``: ‖stack[index[p]]‖_F², each distinct matrix summed once."""
    uniq, inv = torch.unique(index, return_inverse=True)
    return pair_dots(stack, stack, uniq, uniq, device, chunk_bytes)[inv.to(device)]
