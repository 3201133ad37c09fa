"""The options of expert clustering and of its merge costs (docs/methods.md §3): frozen configs,
checked when made.

Torch-free (the standard library and moelens' leaf modules only), so that the command line shows
and checks these options without importing the analyses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from moelens.analyses import fields
from moelens.analyses.calibration.config import check_texts
from moelens.choices import DEFAULT_DEVICE, DEFAULT_MAX_TOKENS, DEVICE_HELP, DISTANCES, EXPORTS, LINKAGES
from moelens.errors import ConfigError
from moelens.ranges import parse_ranges

METHODS = ("hc-smoe", "m-smoe")
BUDGETS = ("layer", "global")
#: merge-cost's --permute: each clustering with and without permutation alignment, or one of them.
PERMUTE = ("both", "on", "off")


@dataclass(frozen=True)
class ClusteringConfig:
    """Options of :func:`cluster` (each field's help says what it does)."""

    calibration: Any = fields.option(None, "A calibration text file (calibrated here, kept in the run; the last 10 % of its lines are held out) or a calibration run directory (reused).", kind=str, metavar="TEXT_FILE|RUN", required=True)
    method: str = fields.option("hc-smoe", "hc-smoe (agglomerative clustering of the experts' mean outputs) or m-smoe (the G most used experts dominant, the others join the one with the most similar router logits).")
    groups: int | None = fields.option(None, "Clusters per layer G, 1 ≤ G < E.", kind=int, metavar="G")
    ratio: float | None = fields.option(None, "Instead of --groups: the fraction of experts removed, G = E − round(R·E).", kind=float, metavar="R")
    linkage: str = fields.option("average", "hc-smoe linkage: average, single, complete or ward.")
    distance: str = fields.option("euclidean", "hc-smoe distance between features: euclidean (as HC-SMoE's hierarchical clustering computes it) or cosine (as REAP's paper states); see docs/peers.md.")
    budget: str = fields.option("layer", "m-smoe: layer (G in every layer) or global (MC-SMoE: one usage threshold across layers, G·L dominant experts in all).")
    layers: tuple[int, ...] | None = fields.option(None, "MoE layers, e.g. 0,5,10-13 (default: every MoE layer, or every layer of the calibration run).", parse=parse_ranges, metavar="LIST")
    max_tokens: int = fields.option(DEFAULT_MAX_TOKENS, "Calibration tokens at most, when calibrating here.", recorded=False)
    batch_tokens: int = fields.option(4096, "Padded tokens per forward pass, when calibrating here.", changes_numbers=False, recorded=False)
    shard_tokens: int | None = fields.option(None, "When calibrating here, calibration tokens per unit: each layer's tokens are split into shards of whole sequences with at most this many tokens, computed apart (e.g. on several Ray workers, --executor ray) and added up; the statistics equal one shard's within float32 summation order (default: one unit per layer).", kind=int, metavar="N", recorded=False)
    device: str = fields.option(DEFAULT_DEVICE, f"{DEVICE_HELP} (calibration).", changes_numbers=False, recorded=False)
    dtype: str = fields.option("auto", "Forward pass in auto (float32 on CPU, the checkpoint's dtype on CUDA), float32, bfloat16 or float16.", recorded=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "calibration", check_texts(self.calibration))
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose hc-smoe or m-smoe")
        if (self.groups is None) == (self.ratio is None):
            raise ConfigError("give exactly one of --groups G and --ratio R (the fraction of experts removed)")
        if self.groups is not None and not fields.is_integer(self.groups):
            raise ConfigError(f"--groups must be a whole number, got {self.groups!r}")
        if self.linkage not in LINKAGES:
            raise ConfigError(f"unknown linkage {self.linkage!r}; choose one of {', '.join(LINKAGES)}")
        if self.distance not in DISTANCES:
            raise ConfigError(f"unknown distance {self.distance!r}; choose one of {', '.join(DISTANCES)}")
        if self.linkage == "ward" and self.distance != "euclidean":
            raise ConfigError("--linkage ward needs --distance euclidean (Ward's update is defined for Euclidean distances)")
        if self.budget not in BUDGETS:
            raise ConfigError(f"unknown budget {self.budget!r}; choose layer or global")
        if self.budget == "global" and self.method != "m-smoe":
            raise ConfigError("--budget global is MC-SMoE's way of choosing M-SMoE's dominant experts; use it with --method m-smoe")
        object.__setattr__(self, "layers", fields.as_index_tuple(self.layers, "layer"))
        object.__setattr__(self, "max_tokens", fields.positive_int(self.max_tokens, "max_tokens"))
        object.__setattr__(self, "batch_tokens", fields.positive_int(self.batch_tokens, "batch_tokens"))
        if self.shard_tokens is not None:
            object.__setattr__(self, "shard_tokens", fields.positive_int(self.shard_tokens, "shard_tokens"))


@dataclass(frozen=True)
class MergeCostConfig:
    """Options of :func:`merge_cost` (each field's help says what it does)."""

    clusters: tuple[str, ...] = fields.option((), "Clustering runs of this model (moelens cluster --out), comma-separated.", parse=fields.comma_names, metavar="RUN,RUN", required=True)
    facts: Optional[str] = fields.option(None, "Facts JSONL (prompt, target on every line): fact recall before and after merging.", kind=str, metavar="FACTS.jsonl")
    texts: Optional[str] = fields.option(None, "Calibration text file: perplexity on its held-out last 10 % of lines (default: the clustering runs' own calibration text).", kind=str, metavar="TEXT_FILE")
    export: str = fields.option("shared", "Form measured: shared (E experts, members given their cluster's merged weights, as HC-SMoE and MC-SMoE evaluate) or compact (G experts, router rows averaged).")
    permute: str = fields.option("both", "Permutation alignment before averaging: both (each clustering with and without), on or off.")
    batch_tokens: int = fields.option(4096, "Padded tokens per forward pass.", changes_numbers=False)
    device: str = fields.option(DEFAULT_DEVICE, f"{DEVICE_HELP}.", changes_numbers=False)
    dtype: str = fields.option("auto", "Forward passes in auto (float32 on CPU, the checkpoint's dtype on CUDA), float32, bfloat16 or float16.")
    stream: str = fields.stream_option()

    def __post_init__(self) -> None:
        clusters = fields.comma_names(self.clusters) if isinstance(self.clusters, str) else tuple(os.fspath(c) for c in self.clusters)
        if not clusters:
            raise ConfigError("no clustering run given: --clusters RUN[,RUN…] (the --out directories of moelens cluster)")
        if len(set(clusters)) != len(clusters):
            raise ConfigError(f"clustering runs {list(clusters)} name a run twice; list each once")
        object.__setattr__(self, "clusters", clusters)
        for name in ("facts", "texts"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, os.fspath(value))
        if self.export not in EXPORTS:
            raise ConfigError(f"unknown export {self.export!r}; choose shared or compact")
        if self.permute not in PERMUTE:
            raise ConfigError(f"permute {self.permute!r}: choose both, on or off")
        object.__setattr__(self, "batch_tokens", fields.positive_int(self.batch_tokens, "batch_tokens"))
        object.__setattr__(self, "stream", fields.check_stream(self.stream))
        fields.check_forward_dtype(self.dtype)



__all__ = ["BUDGETS", "METHODS", "PERMUTE", "ClusteringConfig", "MergeCostConfig"]
