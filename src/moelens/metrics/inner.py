"""Frobenius inner products of many pairs of equal-shape matrices, accumulated in float64.

    dots[p] = ⟨L[li[p]], R[ri[p]]⟩_F = Σ_{r,c} L[li[p], r, c] · R[ri[p], r, c]

Why float64: the distances built on these products cancel. rel_l2² = 2 − 2⟨A,B⟩/(‖A‖‖B‖) for
near-identical experts is a difference of numbers near 2, and an error δ in the cosine moves
rel_l2 by √(2δ) at zero distance; float32 sums (δ ≈ 1e-7) would give 4e-4. The stacks may be
stored in bfloat16 or float32: every such value is exact in float64, so the products are exact
and only the float64 summation rounds (relative 1e-13 at N = 6e7 terms).

The matrices are streamed in chunks of rows, each converted to float64 on the compute device,
so memory above the inputs is bounded by ``chunk_bytes``. Two layouts of the work:

- block: when the pairs cover much of the grid of their distinct left × right matrices (within
  pairs, all i < j), one matrix product of the chunk [|L|, k] × [k, |R|] per chunk;
- gathered: otherwise (base→tuned pairs, e with e), the pairs' own rows side by side, summed
  elementwise, so E pairs cost E products, not E².
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_BYTES = 16 * 2**20
# block layout when |distinct left| · |distinct right| ≤ this × P: a GEMM does a product much
# faster than an elementwise multiply-sum, so some wasted grid cells still pay off
BLOCK_WASTE = 4


def pair_dots(
    left: torch.Tensor,
    right: torch.Tensor,
    li: torch.Tensor,
    ri: torch.Tensor,
    device: torch.device,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """float64 [P] on ``device``: ⟨left[li[p]], right[ri[p]]⟩_F for stacks [K, rows, cols] of
    equal matrix shape (any dtype, any device; indexed where they lie)."""
    n_pairs = int(li.numel())
    out = torch.zeros(n_pairs, dtype=torch.float64, device=device)
    if n_pairs == 0:
        return out
    ul, inv_l = torch.unique(li, return_inverse=True)
    ur, inv_r = torch.unique(ri, return_inverse=True)
    block = ul.numel() * ur.numel() <= BLOCK_WASTE * n_pairs
    if block:
        lsel, rsel = ul.to(left.device), ur.to(right.device)
        inv_l, inv_r = inv_l.to(device), inv_r.to(device)
    else:
        lsel, rsel = li.to(left.device), ri.to(right.device)
    rows, row_numel = left.shape[-2], left.shape[-1]
    width = lsel.numel() + rsel.numel()
    step = max(1, chunk_bytes // max(1, width * row_numel * 8))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        lc = left[lsel, r0:r1].to(device=device, dtype=torch.float64).reshape(lsel.numel(), -1)  # [|L|, k]
        rc = right[rsel, r0:r1].to(device=device, dtype=torch.float64).reshape(rsel.numel(), -1)  # [|R|, k]
        if block:
            out += (lc @ rc.T)[inv_l, inv_r]
        else:
            out += torch.bmm(lc.unsqueeze(1), rc.unsqueeze(2)).view(-1)  # row-wise dots, no [P, k] temporary
    return out


def squared_norms(stack: torch.Tensor, index: torch.Tensor, device: torch.device, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """float64 [len(index)] on ``device``: ‖stack[index[p]]‖_F², each distinct matrix summed once."""
    uniq, inv = torch.unique(index, return_inverse=True)
    return pair_dots(stack, stack, uniq, uniq, device, chunk_bytes)[inv.to(device)]
