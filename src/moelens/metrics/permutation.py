"""Weight-matching permutation of an expert's intermediate neurons (docs/methods.md §3, §7).

An expert x ↦ W_down (act(W_gate x + b_gate) ⊙ (W_up x + b_up)) + b_down computes the same
function when its F intermediate neurons are reordered: rows of W_gate, W_up (and their biases)
and columns of W_down move together. To merge a member b into its cluster's anchor a, b is first
reordered so that its neuron π(p) sits where a has neuron p, π minimising

    C[p, q] = ‖a_gate[p] − b_gate[q]‖² + ‖a_up[p] − b_up[q]‖² + ‖a_down[:, p] − b_down[:, q]‖²,
    π = argmin_π Σ_p C[p, π(p)]

solved exactly by the Hungarian algorithm (``scipy.optimize.linear_sum_assignment``). With
x_p = [a_gate[p] | a_up[p] | a_down[:, p]] ∈ R^{3d} and y_q the same for b, C = ‖x_p‖² + ‖y_q‖²
− 2 x_p·y_q: one [F, 3d] × [3d, F] product in float64 per member. Biases move with their
neurons but are not part of the cost (the C of docs/methods.md §3 is of the weight matrices). An ungated expert
(no W_gate) leaves the gate term out.

``perm`` [F] int64 is read as "new neuron p is old neuron perm[p]": the permuted member has
gate rows b_gate[perm], up rows b_up[perm] and down columns b_down[:, perm].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import torch

from moelens.checkpoint.weights import ExpertWeights
from moelens.errors import ConfigError

ExpertLike = Union[ExpertWeights, Sequence[Optional[torch.Tensor]]]


def as_expert(x: ExpertLike) -> ExpertWeights:
    """An :class:`ExpertWeights` from itself or from a (gate [F, d], up [F, d], down [d, F]) tuple."""
    if isinstance(x, ExpertWeights):
        return x
    if len(x) != 3:
        raise ConfigError("an expert is ExpertWeights or a (gate [F, d], up [F, d], down [d, F]) tuple")
    gate, up, down = x
    return ExpertWeights(gate=gate, up=up, down=down)  # type: ignore[arg-type]


def neuron_rows(expert: ExpertLike, device: str | torch.device = "cpu") -> torch.Tensor:
    """[F, 3d] float64 (or [F, 2d] without a gate): neuron p's gate row, up row and down column."""
    e = as_expert(expert)
    parts = ([e.gate] if e.gate is not None else []) + [e.up, e.down.T]
    return torch.cat([p.to(device=device, dtype=torch.float64) for p in parts], dim=1)


def _check_pair(a: ExpertWeights, b: ExpertWeights) -> None:
    if (a.gate is None) != (b.gate is None):
        raise ConfigError("the anchor and the member must both have a gate matrix or both have none")
    for role in ("gate", "up", "down"):
        ta, tb = getattr(a, role), getattr(b, role)
        if ta is not None and tuple(ta.shape) != tuple(tb.shape):
            raise ConfigError(f"{role} of the anchor is {list(ta.shape)} and of the member {list(tb.shape)}; experts of one layer share a shape")
    f, d = a.up.shape
    if tuple(a.down.shape) != (d, f):
        raise ConfigError(f"down must be [d, F] = [{d}, {f}] for up [F, d] = [{f}, {d}], got {list(a.down.shape)}")


def cost_from_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[F, F] float64 C[p, q] = ‖x_p‖² + ‖y_q‖² − 2 x_p·y_q for neuron rows x, y [F, K]."""
    return (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)


def weight_matching_cost(anchor: ExpertLike, member: ExpertLike, device: str | torch.device = "cpu") -> np.ndarray:
    """[F, F] float64 cost C[p, q] of putting the member's neuron q where the anchor has neuron p."""
    a, b = as_expert(anchor), as_expert(member)
    _check_pair(a, b)
    return cost_from_rows(neuron_rows(a, device), neuron_rows(b, device)).cpu().numpy()


def assignment(cost: np.ndarray) -> np.ndarray:
    """[F] int64 perm minimising Σ_p cost[p, perm[p]] (exact; SciPy's Hungarian-type solver)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(cost.shape[0], dtype=np.int64)
    perm[rows] = cols
    return perm


def weight_matching_permutation(anchor: ExpertLike, member: ExpertLike, device: str | torch.device = "cpu") -> np.ndarray:
    """[F] int64 perm aligning ``member`` onto ``anchor``: apply it with :func:`apply_permutation`."""
    return assignment(weight_matching_cost(anchor, member, device))


def check_permutation(perm: np.ndarray | torch.Tensor | Sequence[int], f: int) -> torch.Tensor:
    """``perm`` as a CPU int64 tensor, or :class:`ConfigError` unless it is a permutation of 0..F−1."""
    p = torch.as_tensor(np.asarray(perm, dtype=np.int64) if not isinstance(perm, torch.Tensor) else perm).to("cpu", torch.int64)
    if p.shape != (f,) or not torch.equal(torch.sort(p).values, torch.arange(f)):
        raise ConfigError(f"perm must be a permutation of 0..{f - 1} (one entry per intermediate neuron)")
    return p


def apply_permutation(expert: ExpertLike, perm: np.ndarray | torch.Tensor | Sequence[int]) -> ExpertWeights:
    """The same expert with its neurons reordered: new neuron p = old neuron perm[p] (gate/up
    rows and their biases, down columns; the down bias stays). Computes the same function."""
    e = as_expert(expert)
    p = check_permutation(perm, e.up.shape[0])

    def rows(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t[p.to(t.device)]

    return ExpertWeights(
        gate=rows(e.gate), up=rows(e.up), down=e.down[:, p.to(e.down.device)],
        gate_bias=rows(e.gate_bias), up_bias=rows(e.up_bias), down_bias=e.down_bias,
    )


def cluster_anchors(labels: np.ndarray | Sequence[int], usage: np.ndarray | torch.Tensor | Sequence[float] | None = None,
                    dominant: np.ndarray | Sequence[bool] | None = None) -> np.ndarray:
    """[E] int64: the anchor of each expert's cluster. A cluster's anchor is its ``dominant``
    member where exactly one is marked, else its most used member (ties → lower index); with
    neither ``dominant`` nor ``usage``, its lowest expert."""
    from moelens.metrics.clustering import most_used_members

    lab = np.asarray(labels, dtype=np.int64)
    n = lab.size
    fallback = most_used_members(lab, usage) if usage is not None else most_used_members(lab, np.zeros(n))
    marked = np.zeros(n, dtype=bool) if dominant is None else np.asarray(dominant, dtype=bool)
    if marked.shape != (n,):
        raise ConfigError(f"dominant has {marked.size} entries for {n} experts")
    anchors = np.empty(n, dtype=np.int64)
    for c in np.unique(lab):
        members = np.flatnonzero(lab == c)
        mark = members[marked[members]]
        if mark.size > 1:
            raise ConfigError(f"cluster {int(c)} marks {mark.size} dominant experts ({', '.join(map(str, mark))}); a cluster has one")
        anchors[members] = mark[0] if mark.size == 1 else members[fallback[members]][0]
    return anchors


def layer_permutations(
    gate: Optional[torch.Tensor], up: torch.Tensor, down: torch.Tensor, anchors: np.ndarray | Sequence[int],
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """[E, F] int64: for every expert the permutation aligning it onto its cluster's anchor
    (``anchors`` [E] from :func:`cluster_anchors`; the identity for an anchor itself).

    ``gate``, ``up`` [E, F, d] (``gate`` may be None) and ``down`` [E, d, F] are one layer's
    stacks in any dtype. Each anchor's neuron rows are built once in float64; members stream
    through one at a time (memory: two experts in float64 and one F×F cost)."""
    n, f = up.shape[0], up.shape[1]
    anc = np.asarray(anchors, dtype=np.int64)
    if anc.shape != (n,) or (anc < 0).any() or (anc >= n).any() or (anc[anc] != anc).any():
        raise ConfigError(f"anchors must give, for each of the {n} experts, an expert that anchors itself")
    perms = np.tile(np.arange(f, dtype=np.int64), (n, 1))

    def expert(e: int) -> ExpertWeights:
        return ExpertWeights(gate=None if gate is None else gate[e], up=up[e], down=down[e])

    _check_pair(expert(0), expert(0))
    for a in np.unique(anc):
        members = [int(e) for e in np.flatnonzero(anc == a) if e != a]
        if not members:
            continue
        x = neuron_rows(expert(int(a)), device)                 # [F, 3d]
        x_sq = (x * x).sum(1)[:, None]
        for e in members:
            y = neuron_rows(expert(e), device)                  # [F, 3d]
            cost = x_sq + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)  # [F, F]
            perms[e] = assignment(cost.cpu().numpy())
    return perms


def permute_role(stack: torch.Tensor, role: str, perms: np.ndarray | torch.Tensor | None) -> torch.Tensor:
    """``stack`` [E, out, in] of one role with each expert's neurons reordered by ``perms`` [E, F]
    (new neuron p = old neuron perm[p]): rows of gate and up [E, F, d], columns of down [E, d, F].
    ``perms`` None leaves the stack as it is."""
    if perms is None:
        return stack
    p = torch.as_tensor(np.asarray(perms, dtype=np.int64) if not isinstance(perms, torch.Tensor) else perms).to(stack.device, torch.int64)
    if role == "down":
        return torch.take_along_dim(stack, p[:, None, :], dim=2)
    return torch.take_along_dim(stack, p[:, :, None], dim=1)


def permute_stacks(gate: Optional[torch.Tensor], up: torch.Tensor, down: torch.Tensor, perms: np.ndarray | torch.Tensor
                   ) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """One layer's stacks with each expert's neurons reordered by ``perms`` [E, F]."""
    g = None if gate is None else permute_role(gate, "gate", perms)
    return g, permute_role(up, "up", perms), permute_role(down, "down", perms)
