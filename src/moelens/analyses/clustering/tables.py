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

from typing import Any, Mapping

import numpy as np
import pandas as pd

from moelens.results.schema import Bounds, TableSchema, within_model


def cluster_relations(table: pd.DataFrame, manifest: Mapping[str, Any]) -> list[str]:
    """What is wrong across the rows of a ``clusters`` table: each layer lists its experts
    0..E−1 once each, its cluster ids run 0..G−1 without gaps, and each cluster marks exactly one
    dominant expert (the anchor a merge keeps)."""
    for layer, rows in table.groupby("layer", sort=True):
        experts = np.sort(rows["expert"].to_numpy(dtype=np.int64))
        if not np.array_equal(experts, np.arange(experts.size)):
            return [f"layer {layer} must list its experts 0..E−1 once each, got {experts.tolist()}"]
        labels = rows["cluster"].to_numpy(dtype=np.int64)
        ids = np.unique(labels)
        if not np.array_equal(ids, np.arange(ids.size)):
            return [f"layer {layer}: cluster ids must run 0..G−1 without gaps, got {ids.tolist()}"]
        marks = np.bincount(labels, weights=rows["dominant"].to_numpy(dtype=bool).astype(float), minlength=ids.size)
        wrong = np.flatnonzero(marks != 1)
        if wrong.size:
            c = int(wrong[0])
            return [f"layer {layer}: cluster {c} marks {int(marks[c])} dominant experts; each cluster has exactly one"]
    return []


CLUSTERS_SCHEMA = TableSchema("clusters", (
    ("layer", "int"), ("expert", "int"), ("cluster", "int"), ("dominant", "bool"), ("frequency", "float"),
), bounds={"layer": Bounds(minimum=0), "expert": Bounds(minimum=0), "cluster": Bounds(minimum=0), "dominant": Bounds(),
           "frequency": Bounds(minimum=0.0, maximum=1.0)},
   relations=(within_model(), cluster_relations))
CLUSTER_LAYERS_SCHEMA = TableSchema("cluster_layers", (
    ("layer", "int"), ("method", "str"), ("n_experts", "int"), ("groups", "int"), ("largest", "int"), ("singletons", "int"),
    ("dominant_frequency", "float"),
), bounds={"layer": Bounds(minimum=0), "n_experts": Bounds(minimum=1), "groups": Bounds(minimum=1), "largest": Bounds(minimum=1),
           "singletons": Bounds(minimum=0), "dominant_frequency": Bounds(minimum=0.0, maximum=1.0)},
   relations=(within_model(experts=()),))


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
