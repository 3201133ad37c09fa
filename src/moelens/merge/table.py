"""The clusters table a merge reads, checked: ``layer, expert, cluster, dominant, frequency``.

One row per expert of each clustered layer: its cluster id (0..G_ℓ−1), whether it is its
cluster's dominant expert (the anchor of the permutation; at most one per cluster, the most used
member where none is marked) and its usage frequency (share of the layer's top-k selections).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from moelens.errors import ConfigError
from moelens.metrics.permutation import cluster_anchors

CLUSTER_COLUMNS = ("layer", "expert", "cluster", "dominant", "frequency")


@dataclass(frozen=True)
class LayerClusters:
    """One layer's clusters: ``labels`` [E] (ids 0..G−1), ``dominant`` [E] bool, ``frequency``
    [E] float64 and ``anchors`` [E] (the anchor expert of each expert's cluster)."""

    layer: int
    labels: np.ndarray
    dominant: np.ndarray
    frequency: np.ndarray
    anchors: np.ndarray

    @property
    def n_experts(self) -> int:
        return int(self.labels.size)

    @property
    def groups(self) -> int:
        return int(self.labels.max()) + 1


def _integers(series: pd.Series, column: str) -> np.ndarray:
    values = series.to_numpy()
    if series.isna().any():
        raise ConfigError(f"the clusters table has empty values in column {column!r}")
    if values.dtype.kind == "f" and not np.all(values == np.round(values)):
        raise ConfigError(f"column {column!r} of the clusters table must hold whole numbers")
    if values.dtype.kind not in "iuf":
        raise ConfigError(f"column {column!r} of the clusters table must hold whole numbers, got {values.dtype}")
    return values.astype(np.int64)


def read_clusters(table: pd.DataFrame) -> dict[int, LayerClusters]:
    """Check ``table`` and split it by layer: every layer lists experts 0..E−1 once each, its
    cluster ids run 0..G−1 without gaps, at most one dominant per cluster, frequencies ≥ 0."""
    if not isinstance(table, pd.DataFrame):
        raise ConfigError("clusters must be a pandas DataFrame with columns layer, expert, cluster, dominant, frequency")
    missing = [c for c in CLUSTER_COLUMNS if c not in table.columns]
    if missing:
        raise ConfigError(f"the clusters table lacks column(s) {', '.join(missing)}; expected {', '.join(CLUSTER_COLUMNS)}")
    if table.empty:
        raise ConfigError("the clusters table is empty")
    layers = _integers(table["layer"], "layer")
    experts = _integers(table["expert"], "expert")
    clusters = _integers(table["cluster"], "cluster")
    if table["dominant"].isna().any():
        raise ConfigError("the clusters table has empty values in column 'dominant'")
    dominant = table["dominant"].to_numpy().astype(bool)
    frequency = pd.to_numeric(table["frequency"], errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(frequency).all() or (frequency < 0).any():
        raise ConfigError("column 'frequency' of the clusters table must hold finite numbers ≥ 0")
    out: dict[int, LayerClusters] = {}
    for layer in sorted(set(layers.tolist())):
        rows = np.flatnonzero(layers == layer)
        order = rows[np.argsort(experts[rows], kind="stable")]
        e = experts[order]
        n = e.size
        if not np.array_equal(e, np.arange(n)):
            dup = sorted(set(e[1:][e[1:] == e[:-1]].tolist()))
            what = f"expert {dup[0]} appears twice" if dup else f"expert {int(np.setdiff1d(np.arange(n), e)[0])} is missing"
            raise ConfigError(f"layer {layer} of the clusters table must list its experts 0..E−1 once each; {what}")
        labels = clusters[order]
        groups = int(labels.max()) + 1 if labels.size else 0
        if labels.min() < 0 or np.unique(labels).size != groups:
            raise ConfigError(f"layer {layer}: cluster ids must run 0..G−1 without gaps, got {sorted(set(labels.tolist()))}")
        try:
            anchors = cluster_anchors(labels, frequency[order], dominant[order])  # at most one dominant per cluster
        except ConfigError as err:
            raise ConfigError(f"layer {layer}: {err}") from None
        out[layer] = LayerClusters(layer, labels, dominant[order], frequency[order], anchors)
    return out
