"""Tables of an expert clustering.

- ``clusters``: one row per (layer, expert): ``cluster`` id (0..G−1, ordered by each cluster's
  lowest expert), ``dominant`` (M-SMoE: the G most used experts; HC-SMoE: the most used member of
  each cluster, docs/methods.md §7: the anchor that members are permuted onto and the expert a merge keeps),
  ``frequency`` (usage frequency f_e of the calibration). The table ``moelens merge`` reads.
- ``cluster_layers``: one row per layer: ``method``, ``n_experts`` E, ``groups`` G, ``largest``
  cluster size, ``singletons`` (clusters of one expert), ``dominant_frequency`` (the share of the
  layer's top-k selections that went to dominant experts).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from moelens.results.schema import TableSchema

CLUSTERS_SCHEMA = TableSchema("clusters", (
    ("layer", "int"), ("expert", "int"), ("cluster", "int"), ("dominant", "bool"), ("frequency", "float"),
))
CLUSTER_LAYERS_SCHEMA = TableSchema("cluster_layers", (
    ("layer", "int"), ("method", "str"), ("n_experts", "int"), ("groups", "int"), ("largest", "int"), ("singletons", "int"),
    ("dominant_frequency", "float"),
))


def cluster_rows(layer: int, labels: np.ndarray, dominant: np.ndarray, frequency: np.ndarray) -> pd.DataFrame:
    e = labels.size
    return pd.DataFrame({
        "layer": np.full(e, layer, dtype=np.int64), "expert": np.arange(e, dtype=np.int64),
        "cluster": np.asarray(labels, dtype=np.int64), "dominant": np.asarray(dominant, dtype=bool),
        "frequency": np.asarray(frequency, dtype=np.float64),
    }, columns=CLUSTERS_SCHEMA.column_names)


def layer_summary(layer: int, method: str, labels: np.ndarray, dominant: np.ndarray, frequency: np.ndarray) -> dict:
    sizes = np.bincount(np.asarray(labels, dtype=np.int64))
    return {
        "layer": int(layer), "method": method, "n_experts": int(labels.size), "groups": int(sizes.size), "largest": int(sizes.max()),
        "singletons": int((sizes == 1).sum()), "dominant_frequency": float(np.asarray(frequency)[np.asarray(dominant, bool)].sum()),
    }


__all__ = ["CLUSTERS_SCHEMA", "CLUSTER_LAYERS_SCHEMA", "cluster_rows", "layer_summary"]
