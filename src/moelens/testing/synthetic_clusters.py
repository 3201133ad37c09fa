"""Synthetic calibration, clustering and merge-cost runs for figure and report tests: every table
the analyses declare, with numbers whose meaning is known (no model needed).

The clustering is M-SMoE-like: the G most used experts of a layer are dominant (ties → lower
index), every other expert joins a dominant expert drawn at random; cluster ids are ordered by
each cluster's lowest expert, as the analysis orders them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from moelens.analyses.calibration.tables import LAYERS_SCHEMA, TOKENS_SCHEMA, USAGE_SCHEMA, usage_entropy
from moelens.analyses.clustering.merge_cost import COST_SCHEMA, summarise
from moelens.analyses.clustering.tables import CLUSTER_LAYERS_SCHEMA, CLUSTERS_SCHEMA, layer_summary
from moelens.results import Run
from moelens.results.manifest import SCHEMA_VERSION
from moelens.results.schema import schemas_to_json


def _calibration_tables(n_layers: int, n_experts: int, top_k: int, n_tokens: int, rng: np.random.Generator) -> dict[str, pd.DataFrame]:
    usage, layers = [], []
    for layer in range(n_layers):
        counts = rng.multinomial(n_tokens * top_k, rng.dirichlet(np.full(n_experts, 0.7)))
        freq = counts / counts.sum()
        usage.append(pd.DataFrame({"layer": layer, "expert": np.arange(n_experts), "count": counts.astype(np.int64), "frequency": freq,
                                   "feature_norm": rng.uniform(1, 3, n_experts), "logit_mean": rng.normal(0, 0.3, n_experts),
                                   "logit_std": rng.uniform(0.8, 1.4, n_experts)}, columns=USAGE_SCHEMA.column_names))
        layers.append({"layer": layer, "n_tokens": n_tokens, "top_k": top_k, "n_experts": n_experts, "used_experts": int((counts > 0).sum()),
                       "max_frequency": float(freq.max()), "min_frequency": float(freq.min()), "usage_entropy": usage_entropy(freq),
                       "routing": "experts"})
    tokens = pd.DataFrame({"token": np.arange(n_tokens), "sequence": np.arange(n_tokens) // 8, "line": np.arange(n_tokens) // 8 + 1,
                           "position": np.arange(n_tokens) % 8, "token_id": rng.integers(0, 100, n_tokens)}, columns=TOKENS_SCHEMA.column_names)
    return {USAGE_SCHEMA.name: pd.concat(usage, ignore_index=True),
            LAYERS_SCHEMA.name: pd.DataFrame(layers, columns=LAYERS_SCHEMA.column_names), TOKENS_SCHEMA.name: tokens}


def _manifest(analysis: str, label: str, options: dict, n_experts: int, top_k: int) -> dict:
    """The manifest the runner writes (its tables declared as the analysis declares them)."""
    from moelens.analyses.calibration.analysis import Calibration
    from moelens.analyses.clustering.analysis import Clustering
    from moelens.analyses.clustering.merge_cost import MergeCost

    schemas = {cls.name: cls.schemas() for cls in (Calibration, Clustering, MergeCost)}[analysis]
    model = {"name": "synthetic", "family": "mixtral", "n_experts": n_experts, "top_k": top_k, "path": "/synthetic", "files": {}}
    return {"schema_version": SCHEMA_VERSION, "analysis": analysis, "label": label, "status": "complete", "options": options,
            "inputs": {"a": model}, "activation": "silu glu", "created": "2026-01-01T00:00:00+00:00",
            "versions": {"moelens": "0.1.0"}, "warnings": {}, "tables": schemas_to_json(schemas)}


def synthetic_calibration_run(n_layers: int = 4, n_experts: int = 8, top_k: int = 2, n_tokens: int = 256, seed: int = 0) -> Run:
    rng = np.random.default_rng(seed)
    options = {"texts": "/synthetic/calibration.txt", "lines": 40, "heldout_lines": 4, "sequences": n_tokens // 8, "tokens": n_tokens,
               "max_tokens": 65536, "layers": list(range(n_layers)), "batch_tokens": 4096, "device": "cpu", "dtype": "float32"}
    label = f"synthetic · calibration ({n_tokens} tokens) · L0-{n_layers - 1}"
    return Run(_manifest("calibration", label, options, n_experts, top_k), _calibration_tables(n_layers, n_experts, top_k, n_tokens, rng))


def synthetic_clustering_run(n_layers: int = 4, n_experts: int = 8, groups: int = 4, top_k: int = 2, n_tokens: int = 256,
                             method: str = "m-smoe", seed: int = 0) -> Run:
    rng = np.random.default_rng(seed)
    tables = _calibration_tables(n_layers, n_experts, top_k, n_tokens, rng)
    usage = tables[USAGE_SCHEMA.name]
    clusters, summary = [], []
    for layer in range(n_layers):
        freq = usage[usage["layer"] == layer].sort_values("expert")["frequency"].to_numpy()
        dominant = np.sort(np.lexsort((np.arange(n_experts), -freq))[:groups])
        anchor = np.array([e if e in dominant else dominant[rng.integers(groups)] for e in range(n_experts)])
        first = {a: int(np.flatnonzero(anchor == a).min()) for a in set(anchor.tolist())}
        ids = {a: i for i, a in enumerate(sorted(first, key=first.get))}
        labels = np.array([ids[a] for a in anchor])
        is_dominant = np.isin(np.arange(n_experts), dominant)
        clusters.append(pd.DataFrame({"layer": layer, "expert": np.arange(n_experts), "cluster": labels, "dominant": is_dominant,
                                      "frequency": freq}, columns=CLUSTERS_SCHEMA.column_names))
        summary.append(layer_summary(layer, method, labels, is_dominant, freq))
    tables[CLUSTERS_SCHEMA.name] = pd.concat(clusters, ignore_index=True)
    tables[CLUSTER_LAYERS_SCHEMA.name] = pd.DataFrame(summary, columns=CLUSTER_LAYERS_SCHEMA.column_names)
    options = {"method": method, "groups": groups, "ratio": None, "budget": "layer" if method == "m-smoe" else None,
               "linkage": "average" if method == "hc-smoe" else None, "distance": "euclidean" if method == "hc-smoe" else None,
               "calibration": "/synthetic/calibration.txt", "calibration_run": None, "texts_sha256": "0", "lines": 40, "heldout_lines": 4,
               "sequences": n_tokens // 8, "tokens": n_tokens, "max_tokens": 65536, "layers": list(range(n_layers)),
               "batch_tokens": 4096, "device": "cpu", "dtype": "float32"}
    label = f"synthetic · {method} G = {groups} · L0-{n_layers - 1}"
    return Run(_manifest("clustering", label, options, n_experts, top_k), tables)


def synthetic_merge_cost_run(recall: float = 0.8, perplexity: float = 3.0, seed: int = 0) -> Run:
    """The original and four merged variants, each worse than the original, permutation helping."""
    rng = np.random.default_rng(seed)
    rows = [("original", "none", "", False, "none", 8, 8, recall, perplexity)]
    for i, method in enumerate(("hc-smoe", "m-smoe")):
        for permute in (False, True):
            loss = rng.uniform(0.2, 0.4) * (0.5 if permute else 1.0)
            rows.append((f"{i:02d}-{method}{'-permuted' if permute else ''}", method, f"/synthetic/{method}", permute, "shared", 4, 4,
                         recall - loss, perplexity * (1 + 4 * loss)))
    cost = pd.DataFrame([(*r, 100, 500) for r in rows], columns=COST_SCHEMA.column_names)
    options = {"clusters": ["/synthetic/hc-smoe", "/synthetic/m-smoe"], "facts": "/synthetic/facts.jsonl", "n_facts": 100,
               "texts": "/synthetic/calibration.txt", "heldout_lines": 4, "export": "shared", "permute": "both",
               "batch_tokens": 4096, "device": "cpu", "dtype": "float32"}
    return Run(_manifest("merge_cost", "synthetic · merge cost (hc-smoe, m-smoe; shared)", options, 8, 2),
               {COST_SCHEMA.name: cost, "merge_cost_summary": summarise(cost)})


__all__ = ["synthetic_calibration_run", "synthetic_clustering_run", "synthetic_merge_cost_run"]
