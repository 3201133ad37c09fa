"""A plain float64 reference of expert distance, written apart from moelens' code path.

Per pair: ``torch.linalg.svd`` of both matrices in float64, n from the float64 σ, and the
alignment as the explicit double sum R = (1/n) Σ_{i,j≤n} (u_iᴬ·u_jᴮ)(v_iᴬ·v_jᴮ); rel_l2 as the
norm of the difference of the normalised matrices.
"""

from __future__ import annotations

import math

import torch

CUT_TOLERANCE = 1e-6


def kept(w: torch.Tensor, gamma: float = 0.3, top_sv: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """U [out, r], V [in, r] and n_X of one matrix, in float64."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    s1 = float(s[0])
    if s1 == 0.0:
        return u, vh.T, 0
    rank = int((s > max(w.shape) * torch.finfo(torch.float32).eps * s1).sum())  # float32 ε, as moelens
    if top_sv is not None:
        n = min(top_sv, rank)
    else:
        n = min(int((s >= (gamma - CUT_TOLERANCE) * s1).sum()), rank)
    return u, vh.T, n


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return math.nan
    return float((a / na - b / nb).norm())


def overlap(a: torch.Tensor, b: torch.Tensor, gamma: float = 0.3, top_sv: int | None = None) -> tuple[float, int]:
    """(Σ_{i,j≤n} (u_iᴬ·u_jᴮ)(v_iᴬ·v_jᴮ), n) by an explicit double loop."""
    ua, va, na = kept(a, gamma, top_sv)
    ub, vb, nb = kept(b, gamma, top_sv)
    n = min(na, nb)
    uu = (ua[:, :n].T @ ub[:, :n]).tolist()  # uu[i][j] = u_iᴬ·u_jᴮ
    vv = (va[:, :n].T @ vb[:, :n]).tolist()  # vv[i][j] = v_iᴬ·v_jᴮ
    total = 0.0
    for i in range(n):
        for j in range(n):
            total += uu[i][j] * vv[i][j]
    return total, n


def sv_align(a: torch.Tensor, b: torch.Tensor, gamma: float = 0.3, top_sv: int | None = None) -> float:
    total, n = overlap(a, b, gamma, top_sv)
    return total / n if n else math.nan


def pair_table(a: torch.Tensor, b: torch.Tensor | None, pairs, gamma: float = 0.3, top_sv: int | None = None) -> dict[str, list]:
    """Per pair: rel_l2, sv_align, overlap, n_sv, as lists in the order of ``pairs``."""
    right = a if b is None else b
    out: dict[str, list] = {"rel_l2": [], "sv_align": [], "overlap": [], "n_sv": []}
    for i, j in [(int(p[0]), int(p[1])) for p in pairs]:
        ov, n = overlap(a[i], right[j], gamma, top_sv)
        out["rel_l2"].append(rel_l2(a[i], right[j]))
        out["sv_align"].append(ov / n if n else math.nan)
        out["overlap"].append(ov)
        out["n_sv"].append(n)
    return out
