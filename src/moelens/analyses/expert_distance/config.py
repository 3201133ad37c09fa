"""The options of expert distance (docs/methods.md §2): a frozen config, checked when made.

Torch-free (the standard library and moelens' leaf modules only), so that the command line shows
and checks these options without importing the analysis.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from moelens.analyses.fields import as_index_tuple, comma_names, option
from moelens.choices import DEFAULT_DEVICE, DEFAULT_GAMMA, DEVICE_HELP, POOLS, check_compute_dtype, check_options
from moelens.errors import ConfigError
from moelens.module_names import ROLES
from moelens.ranges import parse_ranges

PAIRINGS = ("base-tuned", "within")


@dataclass(frozen=True)
class ExpertDistanceConfig:
    """Options of :func:`expert_distance` (each field's help says what it does)."""

    layers: tuple[int, ...] | None = option(None, "MoE layers, e.g. 0,5,10-13 (default: every MoE layer).", parse=parse_ranges, metavar="LIST")
    pairing: str | None = option(None, "base-tuned (expert e of A with e of B; the default with two models) or within (every pair i < j of a layer; the default with one).", kind=str)
    matrices: tuple[str, ...] = option(("gate", "up", "down"), "Expert matrices to compare, e.g. gate,up,down; the 'expert' row pools them.", parse=comma_names, metavar="LIST")
    gamma: float = option(DEFAULT_GAMMA, "Keep singular values σ_i ≥ γ·σ_1 for sv_align, 0 < γ ≤ 1.")
    top_sv: int | None = option(None, "Keep a fixed number of singular values instead of cutting at gamma.", kind=int)
    pool: str = option("mean", "sv_align of the whole expert: mean of the matrices' R, or ito (Σ n_m R_m / Σ n_m).")
    device: str = option(DEFAULT_DEVICE, f"{DEVICE_HELP}.", changes_numbers=False)
    dtype: str = option("float32", "Decompositions in float32 (redone in float64 where a spectrum needs it) or float64.")
    clusters: str | None = option(None, "A clustering run (moelens cluster): pair the experts inside its clusters (pairing hc-smoe or m-smoe) instead.", kind=str, metavar="RUN", recorded=False)
    permute: bool = option(False, "With --clusters: align every member's neurons onto its cluster's dominant expert first (pairing …-permuted).", recorded=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", as_index_tuple(self.layers, "layer"))
        if self.pairing is not None and self.pairing not in PAIRINGS:
            raise ConfigError(f"unknown pairing {self.pairing!r}; expected one of {', '.join(PAIRINGS)}")
        if self.clusters is not None:
            object.__setattr__(self, "clusters", os.fspath(self.clusters))
            if self.pairing is not None:
                raise ConfigError("--clusters pairs the experts inside each cluster (pairing hc-smoe or m-smoe); leave out --pairing")
        elif self.permute:
            raise ConfigError("--permute aligns cluster members onto their dominant expert; it needs --clusters RUN")
        matrices = (self.matrices,) if isinstance(self.matrices, str) else tuple(self.matrices)
        if not matrices:
            raise ConfigError("the matrix list is empty; give at least one of gate, up, down")
        bad = [m for m in matrices if m not in ROLES]
        if bad:
            raise ConfigError(f"unknown matrix {bad[0]!r}; expected some of {', '.join(ROLES)}")
        if len(set(matrices)) != len(matrices):
            raise ConfigError(f"matrices {list(matrices)} name a matrix twice; list each once")
        object.__setattr__(self, "matrices", matrices)
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)):
            raise ConfigError(f"gamma {self.gamma!r} is not a number; give 0 < gamma ≤ 1")
        object.__setattr__(self, "gamma", float(self.gamma))
        check_options(self.gamma, self.top_sv)
        if self.top_sv is not None:
            object.__setattr__(self, "top_sv", int(self.top_sv))
        if self.pool not in POOLS:
            raise ConfigError(f"unknown pool {self.pool!r}; expected one of {', '.join(POOLS)}")
        check_compute_dtype(self.dtype)



__all__ = ["PAIRINGS", "ExpertDistanceConfig"]
