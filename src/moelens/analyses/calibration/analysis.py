"""Calibration pass (docs/methods.md §3, §7): per MoE layer, the router logits and top-k choices of every
calibration token, the usage frequency of every expert, and every expert's mean output over ALL
tokens (HC-SMoE's feature).

One unit per MoE layer. A unit runs the calibration tokens through the model up to its layer's
router (:mod:`moelens.calibration.capture`: the pass stops there, so memory holds one batch of one
layer's activations), then runs every expert of the layer on every token from the checkpoint's
expert weights (:mod:`moelens.calibration.features`). Its tables go through the runner as every
analysis's do; its matrices (features [E, d], router logits [N, E], top-k [N, k]) go to the run's
``matrices/`` directory (:mod:`moelens.calibration.store`) before the unit is recorded as done,
so a killed run resumes at the next unfinished layer with every finished layer complete.

>>> run = calibrate("zoo/base", "zoo/calibration.txt", out="runs/calibration")
>>> run["calibration_usage"]                  # layer, expert, count, frequency, …
>>> run.features(0).shape, run.router_logits(0).shape
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import pandas as pd
import torch

from moelens.analyses.base import (
    FORWARD_DTYPES,
    Analysis,
    Plan,
    Unit,
    UnitContext,
    chosen_layers,
    layer_unit_key,
    unit_seed,
)
from moelens.analyses.calibration.config import CalibrationConfig
from moelens.analyses.calibration.tables import (
    LAYERS_SCHEMA,
    TOKENS_SCHEMA,
    USAGE_SCHEMA,
    layer_row,
    token_rows,
    usage_rows,
)
from moelens.analyses.runner import run_analysis
from moelens.calibration.activation import expert_activation
from moelens.calibration.layer import CalibrationSetup, LayerCalibration, calibrate_layer
from moelens.calibration.store import MATRICES, NAMES, MatrixStore
from moelens.calibration.texts import CalibrationLines, read_lines, tokenise
from moelens.checkpoint.model import MoEModel
from moelens.errors import ConfigError, NotMoEError, RunDirectoryError
from moelens.progress import ProgressCallback
from moelens.ranges import compact_ranges
from moelens.results.run import Run, load_run

if TYPE_CHECKING:
    from moelens.analyses.executors import Executor

ANALYSIS = "calibration"
#: The analyses whose runs carry a calibration (tables and matrices).
CALIBRATED = ("calibration", "clustering")


# ----------------------------------------------------------------------------------------------
# Planning, shared with the clustering analysis (which may calibrate itself)
# ----------------------------------------------------------------------------------------------
def text_config_of(config: Mapping[str, Any]) -> Mapping[str, Any]:
    inner = config.get("text_config")
    return inner if isinstance(inner, Mapping) else config


def forward_dtype(choice: str, device: torch.device, config: Mapping[str, Any]) -> str:
    """The dtype the forward pass runs in: ``auto`` is float32 on the CPU (exact comparisons,
    no slow half-precision kernels) and the checkpoint's own dtype on CUDA."""
    if choice != "auto":
        return choice
    if device.type == "cpu":
        return "float32"
    stored = str(text_config_of(config).get("dtype") or config.get("dtype") or config.get("torch_dtype") or "float32")
    return stored if stored in FORWARD_DTYPES else "float32"


def pad_id_of(tokenizer: Any, config: Mapping[str, Any]) -> int:
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None),
                  text_config_of(config).get("pad_token_id"), config.get("pad_token_id")):
        if isinstance(value, int):
            return value
    return 0


@dataclass
class CalibrationPlan:
    """A calibration resolved against its model: the shared setup, the layers and the options."""

    setup: CalibrationSetup
    lines: CalibrationLines
    layers: list[int]
    options: dict[str, Any]


def plan_calibration(model: MoEModel, texts: Any, max_tokens: int, layers: Optional[tuple[int, ...]], batch_tokens: int,
                     device: str, dtype: str) -> CalibrationPlan:
    """Check everything a calibration needs (headers, the tokenizer and the text; no weights)."""
    from moelens.runtime.checks import check_checkpoint_finite, check_vocabulary, embedding_rows
    from moelens.spectral import resolve_device

    if not model.is_moe:
        raise NotMoEError(f"{model.name} is a dense {model.family} model with no MoE layers; calibration needs an MoE checkpoint")
    chosen = chosen_layers(layers, model.moe_layers)
    for L in chosen:
        model.layer(L).check()  # out of range -> IndexOutOfRangeError, dense -> NotMoEError, incomplete -> format error
    activation = expert_activation(model.family, model.config)
    resolved = resolve_device(device)
    lines = read_lines(texts)
    tokenizer = None
    if not lines.pretokenised:
        from moelens.runtime import load_tokenizer

        tokenizer = load_tokenizer(model.path, model.revision)  # no tokenizer: one clear error before any weight is read
    text_config = text_config_of(model.config)
    max_pos = text_config.get("max_position_embeddings")
    vocab = text_config.get("vocab_size")
    if tokenizer is not None:
        check_vocabulary(tokenizer, embedding_rows(model.config), model.name)
    tokens = tokenise(lines, tokenizer, int(max_pos) if isinstance(max_pos, int) and max_pos > 0 else None,
                      int(vocab) if isinstance(vocab, int) else None, max_tokens)
    check_checkpoint_finite(model)  # NaN weights named before a run directory exists
    fdtype = forward_dtype(dtype, resolved, model.config)
    setup = CalibrationSetup(model, tokens, activation, resolved, fdtype, batch_tokens, pad_id_of(tokenizer, model.config))
    options = {
        "texts": lines.source, "texts_sha256": lines.digest(), "lines": len(lines.items), "heldout_lines": lines.n_heldout,
        "sequences": len(tokens.sequences), "tokens": tokens.n_tokens, "max_tokens": max_tokens, "layers": list(chosen),
        "batch_tokens": batch_tokens, "device": str(resolved), "dtype": fdtype,
    }
    return CalibrationPlan(setup, lines, chosen, options)


def layer_units(layers: Iterable[int]) -> list[Unit]:
    return [Unit(key=layer_unit_key(L), seed=unit_seed(0, layer_unit_key(L)), layer=L) for L in layers]  # nothing random


def calibrate_unit(setup: CalibrationSetup, store: MatrixStore, unit: Unit, context: UnitContext) -> dict[str, pd.DataFrame]:
    """One layer's calibration: its matrices into ``store``, its tables returned."""
    assert unit.layer is not None
    cal: LayerCalibration = calibrate_layer(setup, unit.layer, lambda done, total: context.report("batches", done, total, f"layer {unit.layer}"))
    store.write(unit.layer, "features", cal.features)
    store.write(unit.layer, "router_logits", cal.router_logits)
    store.write(unit.layer, "topk", cal.topk)
    unused = int((cal.counts == 0).sum())
    if unused:
        context.warn(f"layer {unit.layer}: {unused} of {cal.counts.size} experts were never chosen by the {setup.tokens.n_tokens} calibration tokens")
    return {USAGE_SCHEMA.name: usage_rows(cal), LAYERS_SCHEMA.name: layer_row(cal)}


def calibration_extra(setup: CalibrationSetup) -> dict[str, Any]:
    return {
        "activation": setup.activation.name,
        "matrices": {"dir": MATRICES, "features": "[E, d] float64", "router_logits": "[N, E] float32", "topk": "[N, k] int32"},
    }


class Calibration(Analysis):
    """docs/methods.md §3's calibration pass: one unit per MoE layer.

    ``matrices`` is where the units put their arrays; :func:`calibrate` gives it the run
    directory's ``matrices/`` (in memory without one)."""
    reads_whole_model = True

    name = ANALYSIS
    title = "Calibration"
    config_type = CalibrationConfig
    inputs = ("a",)
    unit_tables = (USAGE_SCHEMA, LAYERS_SCHEMA)
    derived_tables = (TOKENS_SCHEMA,)

    def __init__(self, matrices: MatrixStore | None = None):
        self.matrices = matrices if matrices is not None else MatrixStore(None)

    def plan(self, models: Mapping[str, Any], config: CalibrationConfig) -> Plan:
        model: MoEModel = models["a"]
        c = config
        planned = plan_calibration(model, c.texts, c.max_tokens, c.layers, c.batch_tokens, c.device, c.dtype)
        label = f"{model.name} · calibration ({planned.setup.tokens.n_tokens} tokens) · L{compact_ranges(planned.layers)}"
        return Plan(options=planned.options, units=layer_units(planned.layers), label=label, state=planned.setup)

    def compute(self, plan: Plan, unit: Unit, context: UnitContext) -> dict[str, pd.DataFrame]:
        return calibrate_unit(plan.state, self.matrices, unit, context)

    def finish(self, plan: Plan, tables: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        return {TOKENS_SCHEMA.name: token_rows(plan.state.tokens)}

    def manifest_extra(self, plan: Plan) -> dict[str, Any]:
        return calibration_extra(plan.state)


# ----------------------------------------------------------------------------------------------
# A calibration as the clustering reads it
# ----------------------------------------------------------------------------------------------
class CalibrationRun(Run):
    """A :class:`~moelens.results.Run` with its matrices: ``run.features(L)`` [E, d],
    ``run.router_logits(L)`` [N, E], ``run.topk(L)`` [N, k] and ``run.frequency(L)`` [E]."""

    matrices: MatrixStore

    @classmethod
    def of(cls, run: Run, matrices: MatrixStore) -> "CalibrationRun":
        out = cls(manifest=run.manifest, tables=run.tables, path=run.path)
        out.matrices = matrices
        return out

    @property
    def layers(self) -> list[int]:
        return [int(L) for L in self["calibration_layers"]["layer"]]

    def features(self, layer: int) -> np.ndarray:
        return self.matrices.read(layer, "features")

    def router_logits(self, layer: int) -> np.ndarray:
        return self.matrices.read(layer, "router_logits")

    def topk(self, layer: int) -> np.ndarray:
        return self.matrices.read(layer, "topk")

    def frequency(self, layer: int) -> np.ndarray:
        """[E] float64 usage frequency, by expert index."""
        usage = self["calibration_usage"]
        rows = usage[usage["layer"] == layer].sort_values("expert")
        if rows.empty:
            raise ConfigError(f"layer {layer} is not in this calibration (it has layers {compact_ranges(self.layers)})")
        return rows["frequency"].to_numpy(np.float64)

    def check_matrices(self) -> None:
        missing = self.matrices.missing(self.layers, NAMES)
        if missing:
            where = f" {self.path}" if self.path else ""
            raise RunDirectoryError(f"calibration run{where} lacks the matrices of layer(s) {compact_ranges(missing)}; "
                                    "calibrate again into a new directory")


def load_calibration(path: str | os.PathLike[str]) -> CalibrationRun:
    """A calibration run (or a clustering run that calibrated itself, or the calibration a
    clustering run reused) with its matrices."""
    run = load_run(path)
    analysis = run.manifest.get("analysis")
    if analysis not in CALIBRATED:
        raise ConfigError(f"{path} is a {analysis} run, not a calibration; give a calibration text file or a run of moelens calibrate or moelens cluster")
    source = (run.manifest.get("options") or {}).get("calibration_run")
    if analysis == "clustering" and source:
        return load_calibration(source)
    out = CalibrationRun.of(run, MatrixStore(run.path / MATRICES))  # type: ignore[operator]
    out.check_matrices()
    return out


def run(models: Mapping[str, Any], config: CalibrationConfig, *, out: str | os.PathLike[str] | None = None,
        progress: ProgressCallback | None = None, executor: str | Executor | None = None) -> CalibrationRun:
    """Run the calibration text through ``model`` and record, per MoE layer, every token's router
    logits and top-k experts, every expert's usage frequency and mean output (docs/methods.md §3).

    ``texts``: a text file (one sequence per non-empty line; the last 10 % of the lines held out),
    or a list of strings or of token-id lists. Returns a :class:`CalibrationRun` (tables
    ``calibration_usage``, ``calibration_layers``, ``calibration_tokens`` and the matrices). With
    ``out`` each layer is written when done and an interrupted run resumes at the next layer."""
    store = MatrixStore(None if out is None else os.path.join(os.fspath(out), MATRICES))
    run = run_analysis(Calibration(store), {"a": models["a"]}, config, out=out, progress=progress, executor=executor)
    result = CalibrationRun.of(run, store)
    if out is not None:
        store.remove_other_layers(result.layers)
    result.check_matrices()
    return result


__all__ = ["run", "ANALYSIS", "CALIBRATED", "Calibration", "CalibrationConfig", "CalibrationPlan", "CalibrationRun",
           "calibrate_unit", "calibration_extra", "forward_dtype", "layer_units", "load_calibration", "plan_calibration"]
