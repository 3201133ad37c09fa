"""Pairs of experts: which expert of the left stack meets which expert of the right stack.

A pairing is an int64 array [P, 2]: column 0 indexes the left stack ``a``, column 1 the right
stack (``b``, or ``a`` again when the pairs lie within one stack). docs/methods.md §2 names three:

- base→tuned: expert e of model A with expert e of model B, :func:`same_index_pairs`;
- within: every unordered pair i < j of one layer of one model, :func:`within_pairs`;
- clusters: any list of (a, b) pairs inside one model, built by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from moelens.errors import ConfigError, IndexOutOfRangeError


def within_pairs(n_experts: int) -> np.ndarray:
    """[E(E−1)/2, 2]: every (i, j) with i < j, ordered by i then j."""
    i, j = np.triu_indices(int(n_experts), k=1)
    return np.stack([i, j], axis=1).astype(np.int64)


def same_index_pairs(n_experts: int) -> np.ndarray:
    """[E, 2]: (e, e) for every expert e, the base→tuned pairing."""
    e = np.arange(int(n_experts), dtype=np.int64)
    return np.stack([e, e], axis=1)


def check_pairs(pairs: np.ndarray | torch.Tensor | Sequence[Sequence[int]], n_left: int, n_right: int) -> torch.Tensor:
    """``pairs`` as a CPU int64 tensor [P, 2], every index inside its stack."""
    p = torch.as_tensor(np.asarray(pairs, dtype=np.int64) if not isinstance(pairs, torch.Tensor) else pairs)
    p = p.to(device="cpu", dtype=torch.int64)
    if p.numel() == 0:
        return p.reshape(0, 2)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ConfigError(f"pairs must be an integer array [P, 2], got shape {tuple(p.shape)}; build them with within_pairs or same_index_pairs")
    for col, n, side in ((0, n_left, "left"), (1, n_right, "right")):
        bad = (p[:, col] < 0) | (p[:, col] >= n)
        if bool(bad.any()):
            raise IndexOutOfRangeError(f"pair index {int(p[bad.nonzero()[0, 0], col])} is outside the {side} stack of {n} experts")
    return p
