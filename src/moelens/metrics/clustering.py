"""Expert clustering (docs/methods.md §3, §7): HC-SMoE's agglomerative clustering and M-SMoE's grouping
around dominant experts, as plain functions of arrays.

Conventions shared by every function here:

- ``labels`` [E] int64: cluster id of each expert, ids 0..G−1 ordered by each cluster's lowest
  expert (expert 0 is always in cluster 0);
- ``dominant`` [E] bool: one expert per cluster, the anchor its members are aligned onto;
- ties (usage, similarity, distance) break toward the lower expert index.

Groups from a ratio: ``--ratio R`` is the fraction of experts removed, G = E − round(R·E) with
round half up; every way of asking for G checks 1 ≤ G < E (:func:`resolve_groups`).

HC-SMoE (Chen et al., ICML 2025). The feature of expert e is the mean of its output over all
calibration tokens (not weighted by the router), f_e ∈ R^d. Distances are Euclidean
‖f_i − f_j‖ (what HC-SMoE's ``hierarchical_clustering`` computes on raw expert outputs) or cosine
1 − cos(f_i, f_j) (REAP's statement). Clusters merge bottom-up, the two closest first; the
distance of a merged cluster i∪j to a cluster k follows Lance and Williams:

    single    min(D_ik, D_jk)                 complete  max(D_ik, D_jk)
    average   (n_i D_ik + n_j D_jk)/(n_i + n_j)          (UPGMA: mean over all pairs of members)
    ward      √(((n_i+n_k) D_ik² + (n_j+n_k) D_jk² − n_k D_ij²)/(n_i + n_j + n_k))

which are also SciPy's ``linkage`` updates. HC-SMoE's own code differs (docs/peers.md, HC-SMoE):
its run scripts pass ``--cluster="hirarchical"``, which falls through to k-means with a k-means++
start drawn from torch's global generator (no seed of its own), so they never reach its
hierarchical clustering; there, its ``complete`` merges the two farthest clusters and its Ward
step scores n_i n_j/(n_i+n_j)·‖μ_i − μ_j‖ (not the increase in variance). moelens keeps the
textbook (and SciPy) linkages. The tree is cut after exactly E − G merges, so there are always
exactly G clusters, also when merge heights tie (SciPy's ``fcluster(…, "maxclust")`` cuts at a
height and returns fewer clusters when several merges share it). Among pairs at the smallest
distance the pair whose lowest experts come first merges first (lexicographic on (lowest expert
of one, lowest expert of the other)). HC-SMoE's own representative is the member nearest the
cluster mean; moelens's ``dominant`` is the most used member (docs/methods.md §7,
:func:`most_used_members`).

M-SMoE (Li et al., ICLR 2024). Dominant experts are the G most used (usage f_e = share of the
layer's top-k selections); every other expert joins the dominant expert whose router-logit
column over the calibration tokens, z_e = (logit_{t,e})_t ∈ R^N, has the highest cosine
similarity with its own. MC-SMoE's global budget (:func:`global_group_budget`) gives layer ℓ a
G_ℓ from one usage threshold across layers, every layer keeping at least its most used expert.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from moelens.choices import DISTANCES, LINKAGES
from moelens.errors import ConfigError


class Grouping(NamedTuple):
    """A layer's clusters: ``labels`` [E] int64 (ids ordered by lowest expert) and
    ``dominant`` [E] bool (one per cluster)."""

    labels: np.ndarray
    dominant: np.ndarray


# ----------------------------------------------------------------------------------------------
# How many groups
# ----------------------------------------------------------------------------------------------
def check_groups(n_experts: int, groups: int) -> int:
    """``groups`` as an int, or :class:`ConfigError` unless 1 ≤ G < E."""
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
        raise ConfigError(f"--groups must be a whole number, got {groups!r}")
    g, e = int(groups), int(n_experts)
    if not 1 <= g < e:
        raise ConfigError(f"--groups {g} is outside 1..{e - 1}: a layer of {e} experts can be merged into 1 to {e - 1} groups")
    return g


def groups_from_ratio(n_experts: int, ratio: float) -> int:
    """G = E − round(R·E), R the fraction of experts removed (round half up), with 1 ≤ G < E.

    >>> groups_from_ratio(128, 0.25)
    96
    """
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not math.isfinite(float(ratio)):
        raise ConfigError(f"--ratio must be a number in (0, 1), the fraction of experts removed; got {ratio!r}")
    r, e = float(ratio), int(n_experts)
    if not 0.0 < r < 1.0:
        raise ConfigError(f"--ratio {r:g} is outside (0, 1): it is the fraction of experts removed (0.5 halves each layer)")
    # R·E rounded half up; the 1e-9 absorbs binary fractions such as 0.35·20 = 6.999999999999999
    removed = math.floor(r * e + 0.5 + 1e-9)
    g = e - removed
    if not 1 <= g < e:
        raise ConfigError(f"--ratio {r:g} removes {removed} of {e} experts, leaving {g} groups; choose a ratio that leaves 1 to {e - 1}")
    return g


def resolve_groups(n_experts: int, groups: int | None = None, ratio: float | None = None) -> int:
    """The number of groups G from exactly one of ``groups`` and ``ratio``, checked 1 ≤ G < E."""
    if (groups is None) == (ratio is None):
        raise ConfigError("give exactly one of --groups G and --ratio R (the fraction of experts removed)")
    return check_groups(n_experts, groups) if groups is not None else groups_from_ratio(n_experts, ratio)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------
def as_float64(x: np.ndarray | torch.Tensor | Sequence, name: str, ndim: int) -> np.ndarray:
    """``x`` as a finite float64 numpy array of ``ndim`` dimensions."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to(device="cpu", dtype=torch.float64).numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != ndim:
        raise ConfigError(f"{name} must have {ndim} dimensions, got shape {list(a.shape)}")
    if not np.isfinite(a).all():
        raise ConfigError(f"{name} holds {int((~np.isfinite(a)).sum())} NaN/inf values")
    return a


def canonical_labels(labels: np.ndarray | Sequence[int]) -> np.ndarray:
    """Renumber clusters 0..G−1 in the order of their lowest expert (the same partition)."""
    lab = np.asarray(labels, dtype=np.int64)
    _, first, inverse = np.unique(lab, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # old id rank -> position by lowest member
    new_id = np.empty_like(order)
    new_id[order] = np.arange(order.size)
    return new_id[inverse.reshape(-1)].astype(np.int64)


def most_used_members(labels: np.ndarray | Sequence[int], usage: np.ndarray | torch.Tensor | Sequence[float]) -> np.ndarray:
    """[E] bool: the most used member of each cluster (ties → lower expert index)."""
    lab = np.asarray(labels, dtype=np.int64)
    use = as_float64(usage, "usage", 1)
    if use.shape != lab.shape:
        raise ConfigError(f"usage has {use.size} entries for {lab.size} experts")
    dominant = np.zeros(lab.size, dtype=bool)
    # sort by (cluster, −usage, index): the first of each cluster is its most used, lowest index
    order = np.lexsort((np.arange(lab.size), -use, lab))
    first = np.ones(lab.size, dtype=bool)
    first[1:] = lab[order][1:] != lab[order][:-1]
    dominant[order[first]] = True
    return dominant


def usage_order(usage: np.ndarray) -> np.ndarray:
    """Expert indices by usage, most used first, ties → lower index."""
    return np.lexsort((np.arange(usage.size), -usage))


# ----------------------------------------------------------------------------------------------
# HC-SMoE
# ----------------------------------------------------------------------------------------------
def feature_distances(features: np.ndarray | torch.Tensor, distance: str = "euclidean") -> np.ndarray:
    """[E, E] float64 distances between the rows of ``features`` [E, d]: ‖f_i − f_j‖ (from the
    differences themselves, so near-identical features give ≈ 0, not the noise of a Gram
    formula) or 1 − cos(f_i, f_j)."""
    from scipy.spatial.distance import pdist, squareform

    if distance not in DISTANCES:
        raise ConfigError(f"unknown distance {distance!r}; expected one of {', '.join(DISTANCES)}")
    f = as_float64(features, "features", 2)
    if distance == "euclidean":
        return squareform(pdist(f, "euclidean"))
    norms = np.linalg.norm(f, axis=1)
    if (norms == 0).any():
        raise ConfigError(f"expert {int(np.flatnonzero(norms == 0)[0])} has an all-zero feature, whose cosine distance is undefined; use --distance euclidean")
    unit = f / norms[:, None]
    d = np.clip(1.0 - unit @ unit.T, 0.0, 2.0)
    np.fill_diagonal(d, 0.0)
    return d


def agglomerative_merges(distances: np.ndarray, n_merges: int, linkage: str = "average") -> list[tuple[int, int, float]]:
    """The first ``n_merges`` merges of bottom-up clustering on the [E, E] ``distances``:
    (i, j, height) with i < j the lowest experts of the two clusters merged (the merged cluster
    is then known by i). Lance–Williams updates (module docstring); ties → the pair whose lowest
    experts come first. O(E²) per merge, vectorised over the other clusters."""
    if linkage not in LINKAGES:
        raise ConfigError(f"unknown linkage {linkage!r}; expected one of {', '.join(LINKAGES)}")
    d = np.array(distances, dtype=np.float64, copy=True)
    n = d.shape[0]
    if d.shape != (n, n):
        raise ConfigError(f"distances must be a square matrix, got shape {list(d.shape)}")
    if not 0 <= n_merges <= max(n - 1, 0):
        raise ConfigError(f"{n_merges} merges asked of {n} experts; at most {n - 1} are possible")
    np.fill_diagonal(d, np.inf)
    size = np.ones(n, dtype=np.float64)
    merges: list[tuple[int, int, float]] = []
    for _ in range(n_merges):
        # np.argmin returns the first minimum in row-major order; rows and columns are indexed by
        # each cluster's lowest expert and d is symmetric, so that is the smallest (i, j), i < j.
        i, j = divmod(int(np.argmin(d)), n)
        h = float(d[i, j])
        ni, nj = size[i], size[j]
        di, dj = d[i], d[j]
        if linkage == "single":
            new = np.minimum(di, dj)
        elif linkage == "complete":
            new = np.maximum(di, dj)
        elif linkage == "average":
            new = (ni * di + nj * dj) / (ni + nj)
        else:  # ward
            nk = size
            with np.errstate(invalid="ignore"):  # inf rows of merged-away clusters stay inf
                new = np.sqrt(np.maximum(((ni + nk) * di**2 + (nj + nk) * dj**2 - nk * h**2) / (ni + nj + nk), 0.0))
        d[i, :] = new
        d[:, i] = new
        d[i, i] = np.inf
        d[j, :] = np.inf
        d[:, j] = np.inf
        size[i] += nj
        merges.append((i, j, h))
    return merges


def labels_from_merges(n_experts: int, merges: Sequence[tuple[int, int, float]]) -> np.ndarray:
    """[E] canonical labels of the partition that ``merges`` (from :func:`agglomerative_merges`)
    leave: E − len(merges) clusters."""
    root = np.arange(n_experts)
    for i, j, _ in merges:
        root[root == j] = i  # j's whole cluster joins i's
    return canonical_labels(root)


def hc_smoe_clusters(features: np.ndarray | torch.Tensor, groups: int, linkage: str = "average", distance: str = "euclidean") -> np.ndarray:
    """[E] labels: HC-SMoE's agglomerative clustering of the expert features [E, d] into exactly
    ``groups`` clusters (module docstring). Ward needs Euclidean distances."""
    if linkage not in LINKAGES:
        raise ConfigError(f"unknown linkage {linkage!r}; expected one of {', '.join(LINKAGES)}")
    if distance not in DISTANCES:
        raise ConfigError(f"unknown distance {distance!r}; expected one of {', '.join(DISTANCES)}")
    if linkage == "ward" and distance != "euclidean":
        raise ConfigError("--linkage ward needs --distance euclidean (Ward's update is defined for Euclidean distances)")
    f = as_float64(features, "features", 2)
    g = check_groups(f.shape[0], groups)
    d = feature_distances(f, distance)
    return labels_from_merges(f.shape[0], agglomerative_merges(d, f.shape[0] - g, linkage))


# ----------------------------------------------------------------------------------------------
# M-SMoE
# ----------------------------------------------------------------------------------------------
def router_logit_similarity(router_logits: np.ndarray | torch.Tensor) -> np.ndarray:
    """[E, E] float64 cosine similarity of the router-logit columns of ``router_logits`` [N, E]:
    cos(z_i, z_j) = z_i·z_j / (‖z_i‖ ‖z_j‖); a zero column has similarity 0 with every column."""
    z = as_float64(router_logits, "router_logits", 2)
    norms = np.linalg.norm(z, axis=0)
    safe = np.where(norms > 0, norms, 1.0)
    unit = z / safe[None, :]
    return unit.T @ unit


def group_around_dominant(similarity: np.ndarray, usage: np.ndarray, groups: int) -> Grouping:
    """M-SMoE's rule for a given G (1 ≤ G ≤ E, unchecked): the G most used experts are dominant,
    every other expert joins the dominant one it is most similar to (ties → lower index)."""
    n = usage.size
    dom_idx = np.sort(usage_order(usage)[:groups])  # by expert index, so argmax ties → lower index
    dominant = np.zeros(n, dtype=bool)
    dominant[dom_idx] = True
    anchor = dom_idx[np.argmax(similarity[:, dom_idx], axis=1)]
    anchor[dom_idx] = dom_idx  # a dominant expert anchors its own cluster, whatever its similarities
    return Grouping(canonical_labels(anchor), dominant)


def _check_layer(router_logits: np.ndarray | torch.Tensor, usage: np.ndarray | torch.Tensor | Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    z = as_float64(router_logits, "router_logits", 2)
    use = as_float64(usage, "usage", 1)
    if use.size != z.shape[1]:
        raise ConfigError(f"usage has {use.size} entries where router_logits [N, E] has E = {z.shape[1]}")
    if (use < 0).any():
        raise ConfigError("usage frequencies must be ≥ 0")
    return z, use


def m_smoe_clusters(router_logits: np.ndarray | torch.Tensor, usage: np.ndarray | torch.Tensor | Sequence[float], groups: int) -> Grouping:
    """M-SMoE grouping of one layer from its calibration router logits [N, E] and usage [E]."""
    z, use = _check_layer(router_logits, usage)
    g = check_groups(use.size, groups)
    return group_around_dominant(router_logit_similarity(z), use, g)


def global_group_budget(usages: Sequence[np.ndarray | torch.Tensor | Sequence[float]], groups: int) -> list[int]:
    """G_ℓ per layer from MC-SMoE's global budget of G·L groups over L layers.

    Every layer's most used expert is kept first (so G_ℓ ≥ 1); the remaining G·L − L places go
    to the most used experts across all layers (usage normalised per layer to sum 1, as MC-SMoE
    does; ties → lower layer, then lower expert index). MC-SMoE thresholds at the (G·L+1)-th
    frequency with a strict ``>``, which keeps fewer than G·L experts when frequencies tie at
    the threshold; here exactly G·L are kept. ``groups`` is the average G, 1 ≤ G < min E_ℓ."""
    if not len(usages):
        raise ConfigError("the global budget needs at least one layer")
    uses = [as_float64(u, f"usage of layer {i}", 1) for i, u in enumerate(usages)]
    g = check_groups(min(u.size for u in uses), groups)
    layer_of, expert_of, freq, forced = [], [], [], []
    for ell, u in enumerate(uses):
        if (u < 0).any():
            raise ConfigError(f"usage of layer {ell} has negative frequencies")
        total = u.sum()
        f = u / total if total > 0 else np.zeros_like(u)
        top = usage_order(u)[0]
        layer_of.append(np.full(u.size, ell))
        expert_of.append(np.arange(u.size))
        freq.append(f)
        forced.append(np.arange(u.size) == top)
    layer_a, expert_a = np.concatenate(layer_of), np.concatenate(expert_of)
    freq_a, forced_a = np.concatenate(freq), np.concatenate(forced)
    # rank: forced first, then by frequency descending, then layer, then expert
    order = np.lexsort((expert_a, layer_a, -freq_a, ~forced_a))
    kept = order[: g * len(uses)]
    return np.bincount(layer_a[kept], minlength=len(uses)).astype(int).tolist()


def m_smoe_clusters_global(
    router_logits: Sequence[np.ndarray | torch.Tensor], usages: Sequence[np.ndarray | torch.Tensor | Sequence[float]], groups: int,
) -> list[Grouping]:
    """M-SMoE grouping of several layers under MC-SMoE's global budget (:func:`global_group_budget`);
    a layer whose G_ℓ equals its E keeps every expert (one cluster each)."""
    if len(router_logits) != len(usages):
        raise ConfigError(f"{len(router_logits)} layers of router logits for {len(usages)} layers of usage")
    layers = [_check_layer(z, u) for z, u in zip(router_logits, usages)]
    budget = global_group_budget([u for _, u in layers], groups)
    return [group_around_dominant(router_logit_similarity(z), u, g) for (z, u), g in zip(layers, budget)]
