"""Jensen–Shannon divergence between next-token distributions, in bits.

JSD(P, Q) = ½ KL(P‖M) + ½ KL(Q‖M),  M = (P + Q) / 2,  KL(P‖M) = Σ_i p_i log₂(p_i / m_i)

with 0 · log 0 = 0. It is symmetric, 0 exactly when P = Q, and at most 1 bit (disjoint supports).
This is the divergence itself, not scipy's ``jensenshannon``, which returns its square root.
"""

from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """JSD in bits over the last axis of two probability tensors of the same shape, computed in
    float64; rounding is clipped to [0, 1]."""
    if p.shape != q.shape:
        raise ValueError(f"p {tuple(p.shape)} and q {tuple(q.shape)} must have the same shape")
    p = p.double()
    q = q.double()
    m = 0.5 * (p + q)
    # xlogy(0, 0) = 0, so zero-probability tokens contribute nothing.
    kl_pm = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1)
    kl_qm = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)
    return (0.5 * (kl_pm + kl_qm) / LN2).clamp(0.0, 1.0)


__all__ = ["js_divergence"]
