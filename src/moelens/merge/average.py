"""Usage-weighted averages of experts and router rows (docs/methods.md §3, §7).

A cluster c with members m and usage frequencies f_m merges into

    W_c = Σ_m w_m W_m^π,   w_m = f_m / Σ_{m∈c} f_m   (w_m = 1/|c| when Σ f_m = 0)

for each of gate, up, down and every bias, where W_m^π is member m with its neurons permuted
onto the cluster's anchor (:mod:`moelens.metrics.permutation`; no permutation with
``permute=False``). Router rows, router biases and score-correction biases of a compact export
are merged with the same weights (an approximation of the original routing: the softmax over
G merged rows is not the softmax over E rows summed per cluster). Sums run in float64 and the
result takes the members' dtype.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Optional

import numpy as np
import torch

from moelens.checkpoint.weights import ExpertWeights
from moelens.errors import ConfigError
from moelens.metrics.clustering import as_float64, usage_order
from moelens.metrics.permutation import (
    ExpertLike,
    apply_permutation,
    as_expert,
    layer_permutations,
    weight_matching_permutation,
)

EXPERT_FIELDS = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")


def usage_weights(usage: np.ndarray | torch.Tensor | Sequence[float]) -> np.ndarray:
    """[m] float64 w = f / Σf, or uniform 1/m when Σf = 0."""
    f = as_float64(usage, "usage", 1)
    if f.size == 0:
        raise ConfigError("a cluster needs at least one member")
    if (f < 0).any():
        raise ConfigError("usage frequencies must be ≥ 0")
    total = f.sum()
    return f / total if total > 0 else np.full(f.size, 1.0 / f.size)


def weighted_sum(tensors: Iterable[torch.Tensor], weights: np.ndarray) -> torch.Tensor:
    """Σ_i w_i T_i accumulated in float64, returned in the dtype of the first tensor. ``tensors``
    may be a generator: one term is in memory at a time."""
    acc: Optional[torch.Tensor] = None
    dtype = torch.float64
    for t, w in zip(tensors, weights):
        if acc is None:
            acc, dtype = torch.zeros(t.shape, dtype=torch.float64, device=t.device), t.dtype
        acc.add_(t.to(torch.float64), alpha=float(w))
    if acc is None:
        raise ConfigError("a cluster needs at least one member")
    return acc.to(dtype)


def merge_cluster(members: Sequence[ExpertLike], usage: np.ndarray | torch.Tensor | Sequence[float], permute: bool = True,
                  anchor: Optional[int] = None, device: str | torch.device = "cpu") -> ExpertWeights:
    """One expert from a cluster's ``members``: the usage-weighted average of each matrix and bias
    after aligning every member's neurons onto the ``anchor`` (a position in ``members``; default
    the most used member, ties → the earlier one). The merged expert is in the anchor's neuron
    order. A bias present in some members and not others is an error."""
    experts = [as_expert(m) for m in members]
    w = usage_weights(usage)
    if w.size != len(experts):
        raise ConfigError(f"{w.size} usage frequencies for {len(experts)} members")
    a = int(usage_order(np.asarray(as_float64(usage, "usage", 1)))[0]) if anchor is None else int(anchor)
    if not 0 <= a < len(experts):
        raise ConfigError(f"anchor {a} is not a member position (0..{len(experts) - 1})")
    if permute:
        experts = [e if i == a else apply_permutation(e, weight_matching_permutation(experts[a], e, device)) for i, e in enumerate(experts)]
    merged: dict[str, Optional[torch.Tensor]] = {}
    for name in EXPERT_FIELDS:
        parts = [getattr(e, name) for e in experts]
        present = [p is not None for p in parts]
        if not any(present):
            merged[name] = None
            continue
        if not all(present):
            raise ConfigError(f"some members have a {name} and others not; experts of one layer share their form")
        merged[name] = weighted_sum(parts, w)  # type: ignore[arg-type]
    return ExpertWeights(**merged)  # type: ignore[arg-type]


def merge_rows(rows: torch.Tensor, labels: np.ndarray | Sequence[int], usage: np.ndarray | torch.Tensor | Sequence[float]) -> torch.Tensor:
    """[G, ...]: per cluster (ids 0..G−1) the usage-weighted mean of ``rows`` [E, ...] (router
    rows [E, d], router or score-correction biases [E]); zero total usage → the plain mean."""
    lab = np.asarray(labels, dtype=np.int64)
    use = as_float64(usage, "usage", 1)
    if rows.shape[0] != lab.size or use.size != lab.size:
        raise ConfigError(f"{rows.shape[0]} rows, {lab.size} labels and {use.size} usage frequencies do not match")
    groups = int(lab.max()) + 1
    out = []
    for c in range(groups):
        members = np.flatnonzero(lab == c)
        if members.size == 0:
            raise ConfigError(f"cluster ids must run 0..{groups - 1}; cluster {c} has no member")
        out.append(weighted_sum([rows[int(m)] for m in members], usage_weights(use[members])))
    return torch.stack(out)


def merge_layer(
    gate: Optional[torch.Tensor], up: torch.Tensor, down: torch.Tensor, labels: np.ndarray | Sequence[int],
    usage: np.ndarray | torch.Tensor | Sequence[float], anchors: np.ndarray | Sequence[int], permute: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """One layer's merged stacks (gate [G, F, d] or None, up [G, F, d], down [G, d, F]) from its
    stacks [E, …], cluster ``labels`` (ids 0..G−1), ``usage`` [E] and ``anchors`` [E]
    (:func:`moelens.metrics.permutation.cluster_anchors`). Each member is permuted onto its
    anchor (:func:`~moelens.metrics.permutation.layer_permutations`) and folded into its
    cluster's float64 sum as it streams past."""
    lab = np.asarray(labels, dtype=np.int64)
    use = as_float64(usage, "usage", 1)
    n = up.shape[0]
    if lab.shape != (n,) or use.shape != (n,):
        raise ConfigError(f"labels and usage must have one entry per expert ({n})")
    perms = layer_permutations(gate, up, down, anchors, device) if permute else np.tile(np.arange(up.shape[1]), (n, 1))
    groups = int(lab.max()) + 1
    out_gate = None if gate is None else torch.empty((groups, *gate.shape[1:]), dtype=gate.dtype)
    out_up = torch.empty((groups, *up.shape[1:]), dtype=up.dtype)
    out_down = torch.empty((groups, *down.shape[1:]), dtype=down.dtype)
    for c in range(groups):
        members = np.flatnonzero(lab == c)
        if members.size == 0:
            raise ConfigError(f"cluster ids must run 0..{groups - 1}; cluster {c} has no member")
        w = usage_weights(use[members])
        p = [torch.as_tensor(perms[m]) for m in members]
        # generators: one permuted member at a time beside the float64 sum
        if gate is not None:
            out_gate[c] = weighted_sum((gate[int(m)][q] for m, q in zip(members, p)), w)  # type: ignore[index]
        out_up[c] = weighted_sum((up[int(m)][q] for m, q in zip(members, p)), w)
        out_down[c] = weighted_sum((down[int(m)][:, q] for m, q in zip(members, p)), w)
    return out_gate, out_up, out_down
