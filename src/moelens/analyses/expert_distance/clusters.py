"""Expert distance within the clusters of a clustering run (docs/methods.md §2's cluster pairings, seed 001).

Pairings are named after the clustering method:

- ``hc-smoe``: every unordered pair i < j of experts in one cluster (as HC-SMoE merges them all
  into one);
- ``m-smoe``: each member with its cluster's dominant expert (as M-SMoE merges members into
  their dominant), the dominant expert first;
- ``…-permuted`` (``permute=True``): the same pairs after every member's F intermediate neurons
  are reordered onto its cluster's anchor (the dominant expert) by weight matching
  (:mod:`moelens.metrics.permutation`, docs/methods.md §3). The reordering leaves what an expert computes
  unchanged but moves its rows and columns, so rel_l2 and sv_align measure how far two experts
  are once their neurons are lined up.

A layer whose clusters are all single experts (a global budget may keep every expert of a layer)
has no pair and no row.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moelens.checkpoint.model import MoELayer, MoEModel
from moelens.metrics.permutation import permute_role


@dataclass(frozen=True)
class ClusterPairing:
    """The clusters a distance run pairs experts within: ``layers`` maps a layer to its
    :class:`~moelens.merge.LayerClusters`."""

    path: str
    method: str
    permute: bool
    layers: dict[int, Any]
    digest: str

    @property
    def pairing(self) -> str:
        return self.method + ("-permuted" if self.permute else "")


def load_cluster_pairing(path: str, model: MoEModel, permute: bool) -> ClusterPairing:
    """The clusters of the clustering run at ``path``, checked to be of ``model``'s weights."""
    from moelens.analyses.clustering.merging import clusters_of
    from moelens.merge import read_clusters

    run, table = clusters_of(path, model)
    digest = hashlib.sha256(pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes()).hexdigest()
    method = str(run.manifest.get("options", {}).get("method"))
    return ClusterPairing(str(Path(path).resolve()), method, bool(permute), read_clusters(table), digest)


def cluster_pairs(method: str, labels: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """[P, 2] int64 pairs of one layer: ``hc-smoe`` every i < j of a cluster, ordered by (i, j);
    ``m-smoe`` (anchor, member) for every member that is not its cluster's anchor, by member."""
    labels = np.asarray(labels, dtype=np.int64)
    if method == "m-smoe":
        members = np.flatnonzero(np.asarray(anchors) != np.arange(labels.size))
        return np.stack([np.asarray(anchors, dtype=np.int64)[members], members], axis=1).astype(np.int64).reshape(-1, 2)
    i, j = np.triu_indices(labels.size, k=1)
    same = labels[i] == labels[j]
    return np.stack([i[same], j[same]], axis=1).astype(np.int64).reshape(-1, 2)


def layer_permutations(layer: MoELayer, anchors: np.ndarray, device: Any) -> np.ndarray:
    """[E, F] weight-matching permutations of every expert onto its anchor (identity for an
    anchor). Needs the layer's three stacks at once; they are freed on return."""
    from moelens.metrics.permutation import layer_permutations as permutations

    gate = layer.expert_stack("gate") if layer.has_role("gate") else None
    return permutations(gate, layer.expert_stack("up"), layer.expert_stack("down"), anchors, device)


__all__ = ["ClusterPairing", "cluster_pairs", "layer_permutations", "load_cluster_pairing", "permute_role"]
