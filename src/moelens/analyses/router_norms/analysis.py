"""Router norms (docs/methods.md §9): the work, its report section, its figure and its summary.

Per MoE layer ℓ with router G ∈ R^{E×d} (row r_e per expert):

    router_norm(ℓ, e)   = ‖r_e‖₂                       (in float64)
    relative_norm(ℓ, e) = ‖r_e‖₂ / mean_e' ‖r_e'‖₂

and per layer the mean, standard deviation (over experts, ddof 0), coefficient of variation,
minimum and maximum of the norms. A router's logit for expert e is r_e · x, so a row twice as long
scores every input twice as strongly: the spread says how much the router favours some experts
whatever the token. One unit per layer; nothing random.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from moelens.analyses.base import Analysis, Plan, Unit, UnitContext, chosen_layers, layer_units
from moelens.analyses.router_norms import RouterNormsConfig
from moelens.analyses.runner import run_analysis
from moelens.errors import NotMoEError
from moelens.progress import ProgressCallback
from moelens.ranges import compact_ranges
from moelens.results.run import Run
from moelens.results.schema import TableSchema

if TYPE_CHECKING:

    from moelens.analyses.executors import Executor

ANALYSIS = "router_norms"
NORMS_SCHEMA = TableSchema("router_norms", (("layer", "int"), ("expert", "int"), ("router_norm", "float"), ("relative_norm", "float")))
LAYERS_SCHEMA = TableSchema("router_norms_layers", (
    ("layer", "int"), ("n_experts", "int"), ("mean_norm", "float"), ("std_norm", "float"), ("norm_cv", "float"),
    ("min_norm", "float"), ("max_norm", "float"),
))


def row_norms(router: np.ndarray) -> np.ndarray:
    """‖r_e‖₂ of every row of a router [E, d], in float64."""
    return np.linalg.norm(np.asarray(router, dtype=np.float64), axis=1)  # [E]


class RouterNorms(Analysis):
    """docs/methods.md §9: one unit per MoE layer."""

    name = ANALYSIS
    unit_tables = (NORMS_SCHEMA, LAYERS_SCHEMA)

    def plan(self, models: Mapping[str, Any], config: RouterNormsConfig) -> Plan:
        model = models["a"]
        if not model.is_moe:
            raise NotMoEError(f"{model.name} is a dense {model.family} model with no MoE layers; router norms need an MoE checkpoint")
        layers = chosen_layers(config.layers, model.moe_layers)
        for L in layers:
            model.layer(L).check()  # out of range, dense or partial: one line now, before anything is written
        units = layer_units(layers)  # nothing random: every unit's seed is 0
        return Plan(options={"layers": layers}, units=units, label=f"{model.name} L{compact_ranges(layers)}", state=model)

    def compute(self, plan: Plan, unit: Unit, context: UnitContext) -> dict[str, pd.DataFrame]:
        L = unit.layer
        assert L is not None
        norms = row_norms(plan.state.layer(L).router().weight.double().numpy())  # [E]
        mean = float(norms.mean())
        if mean == 0.0:
            context.warn(f"layer {L}: every router row is zero; relative norms are undefined (NaN)")
        relative = norms / mean if mean > 0 else np.full_like(norms, np.nan)
        E = len(norms)
        table = pd.DataFrame({"layer": np.full(E, L, dtype=np.int64), "expert": np.arange(E, dtype=np.int64),
                              "router_norm": norms, "relative_norm": relative})
        std = float(norms.std())
        layer = pd.DataFrame([{"layer": L, "n_experts": E, "mean_norm": mean, "std_norm": std, "norm_cv": std / mean if mean > 0 else np.nan,
                               "min_norm": float(norms.min()), "max_norm": float(norms.max())}]).astype({"layer": np.int64, "n_experts": np.int64})
        return {NORMS_SCHEMA.name: table, LAYERS_SCHEMA.name: layer}


def run(models: Mapping[str, Any], config: RouterNormsConfig, *, out: str | os.PathLike[str] | None = None,
        progress: ProgressCallback | None = None, executor: str | Executor | None = None) -> Run:
    """The L2 norm of every router row of ``model`` (an opened model or a checkpoint path), per MoE
    layer and expert (docs/methods.md §9).

    Returns a :class:`~moelens.results.Run` with tables ``router_norms`` (layer, expert,
    router_norm, relative_norm) and ``router_norms_layers`` (their spread per layer). With ``out``
    each layer is written when done and an interrupted run resumes at the next one; ``executor``:
    ``"local"`` (default), ``"ray"`` or a :class:`~moelens.analyses.executors.RayExecutor`.

    >>> run = router_norms("zoo/base")
    >>> run["router_norms_layers"][["layer", "mean_norm", "norm_cv"]]
    """
    return run_analysis(RouterNorms(), {"a": models["a"]}, config, out=out, progress=progress, executor=executor)


__all__ = ["ANALYSIS", "LAYERS_SCHEMA", "NORMS_SCHEMA", "RouterNorms", "row_norms", "run"]
