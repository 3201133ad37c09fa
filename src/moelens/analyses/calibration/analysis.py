"""Calibration pass (docs/methods.md §3, §7): per MoE layer, the router logits and top-k choices of every
calibration token, the usage frequency of every expert, and every expert's mean output over ALL
tokens (HC-SMoE's feature).

One unit per MoE layer, or per shard of a layer's tokens with ``shard_tokens`` (consecutive whole
sequences, :func:`~moelens.calibration.layer.token_shards`; keys ``L00005S00000``, …). A unit runs
its tokens through the model up to its layer's router (:mod:`moelens.calibration.capture`: the
pass stops there, so memory holds one batch of one layer's activations), then runs every expert
of the layer on every token from the checkpoint's expert weights
(:mod:`moelens.calibration.features`), and returns arrays only: its tokens' router logits [n, E]
and top-k [n, k], its usage counts [E] and its share Σ_{t ∈ shard} f_e(x_t) / N of the features
[E, d]. It writes nothing: the runner keeps each finished unit's arrays (a killed run resumes at
the next unfinished unit), then :meth:`Calibration.assemble` adds the shards of each layer up
(rows concatenated in token order, features summed) into the run's ``matrices/`` directory
(:mod:`moelens.calibration.store`), and :meth:`Calibration.finish` derives the tables from them.

Shards and tolerance: the tokens, their order and their top-k do not depend on the shards; a
token's router logits and block input change by the float32 rounding of another batch
composition, and the features are float64 sums of float32 per-chunk sums taken in another order.
So another split changes the features by at most :data:`SHARD_RTOL` of a feature's norm (measured
≤ 1e-7 on the tests' model with shards of 13 to 100 tokens; logits ≤ 2e-6) and nothing else;
the same shards give the same bits on either executor.

>>> run = calibrate("zoo/base", "zoo/calibration.txt", out="runs/calibration")
>>> run["calibration_usage"]                  # layer, expert, count, frequency, …
>>> run.features(0).shape, run.router_logits(0).shape
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import pandas as pd
import torch

from moelens.analyses.arrays import RunArrays
from moelens.analyses.base import FORWARD_DTYPES, Analysis, Plan, Unit, UnitContext, chosen_layers, layer_unit_key
from moelens.analyses.calibration.config import CalibrationConfig
from moelens.analyses.calibration.tables import (
    LAYERS_SCHEMA,
    TOKENS_SCHEMA,
    USAGE_SCHEMA,
    layer_row,
    token_rows,
    usage_rows,
)
from moelens.analyses.executors import Executor
from moelens.analyses.runner import run_analysis
from moelens.calibration.activation import expert_activation
from moelens.calibration.layer import CalibrationSetup, LayerCalibration, calibrate_layer, token_shards, usage_counts
from moelens.calibration.store import MATRICES, NAMES, MatrixStore, layer_key
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
#: What a calibration unit returns: its matrices' rows and shares, its counts and routing source.
UNIT_ARRAYS = ("features", "router_logits", "topk", "counts", "routing")
#: Features of two splits of the same tokens into shards agree within this, relative to the
#: feature's norm (float32 rounding of other batches and chunk sums; tested).
SHARD_RTOL = 1e-6


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
    shards: list[tuple[int, int]]


def plan_calibration(model: MoEModel, texts: Any, max_tokens: int, layers: Optional[tuple[int, ...]], batch_tokens: int,
                     device: str, dtype: str, stream: str = "auto", shard_tokens: Optional[int] = None) -> CalibrationPlan:
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
    # whole or layer by layer, decided now: a model that does not fit with streaming off is refused
    # before a run directory exists
    from moelens.runtime.forward import choose_stream, estimate
    from moelens.runtime.load import resolve_dtype

    streamed = choose_stream(stream, estimate(model.path, resolved, resolve_dtype(fdtype)), resolved)
    setup = CalibrationSetup(model, tokens, activation, resolved, fdtype, batch_tokens, pad_id_of(tokenizer, model.config),
                             stream="on" if streamed else "off")
    options = {
        "texts": lines.source, "texts_sha256": lines.digest(), "lines": len(lines.items), "heldout_lines": lines.n_heldout,
        "sequences": len(tokens.sequences), "tokens": tokens.n_tokens, "max_tokens": max_tokens, "layers": list(chosen),
        "batch_tokens": batch_tokens, "shard_tokens": shard_tokens, "device": str(resolved), "dtype": fdtype,
    }
    return CalibrationPlan(setup, lines, chosen, options, token_shards(tokens.sequences, shard_tokens))


def calibration_units(layers: Iterable[int], shards: list[tuple[int, int]]) -> list[Unit]:
    """Layer-major units: ``L00005`` for a layer in one piece, ``L00005S00000``, … for its shards
    ([start, end) sequences in ``data["sequences"]``). Seed 0: nothing random."""
    units = []
    for L in layers:
        for i, shard in enumerate(shards):
            key = layer_unit_key(L) if len(shards) == 1 else f"{layer_unit_key(L)}S{i:05d}"
            units.append(Unit(key=key, seed=0, layer=int(L), data={"sequences": tuple(shard)}))
    return units


def calibrate_unit(setup: CalibrationSetup, unit: Unit, context: UnitContext) -> dict[str, np.ndarray]:
    """One unit's calibration arrays (:data:`UNIT_ARRAYS`): pure, nothing written."""
    assert unit.layer is not None
    start, end = unit.data["sequences"]
    where = f"layer {unit.layer}" if unit.key == layer_unit_key(unit.layer) else unit.key
    cal: LayerCalibration = calibrate_layer(setup, unit.layer, lambda done, total: context.report("batches", done, total, where),
                                            shard=(int(start), int(end)))
    return {"features": cal.features, "router_logits": cal.router_logits, "topk": cal.topk, "counts": cal.counts,
            "routing": np.array(cal.routing)}


def units_by_layer(units: Iterable[Unit]) -> dict[int, list[str]]:
    """Unit keys of each layer, in plan (token) order."""
    out: dict[int, list[str]] = {}
    for u in units:
        if u.layer is not None:
            out.setdefault(int(u.layer), []).append(u.key)
    return out


def assemble_matrices(plan: Plan, arrays: RunArrays) -> Iterator[tuple[str, np.ndarray]]:
    """Each layer's matrices from its shards, one matrix at a time: router logits and top-k rows
    concatenated in token order, the features' shares summed (in shard order)."""
    for L, keys in units_by_layer(plan.units).items():
        features = np.array(arrays.unit(keys[0], "features"), dtype=np.float64)  # a copy: the sum is made in it
        for key in keys[1:]:
            features += arrays.unit(key, "features")
        yield f"{MATRICES}/{layer_key(L)}/features", features
        for name in ("router_logits", "topk"):
            yield f"{MATRICES}/{layer_key(L)}/{name}", np.concatenate([np.asarray(arrays.unit(k, name)) for k in keys])


def calibration_tables(plan: Plan, arrays: RunArrays, n_tokens: int) -> dict[str, pd.DataFrame]:
    """``calibration_usage`` and ``calibration_layers`` from the assembled matrices (and the
    units' routing sources); a layer with an expert never chosen goes to ``plan.warnings``."""
    usage, layers = [], []
    for L, keys in units_by_layer(plan.units).items():
        topk = arrays.read(f"{MATRICES}/{layer_key(L)}/topk")
        logits = arrays.read(f"{MATRICES}/{layer_key(L)}/router_logits")
        features = arrays.read(f"{MATRICES}/{layer_key(L)}/features")
        routing = "+".join(sorted({part for k in keys for part in str(np.asarray(arrays.unit(k, "routing")).reshape(-1)[0]).split("+")}))
        counts = sum((np.asarray(arrays.unit(k, "counts"), dtype=np.int64) for k in keys[1:]),
                     np.asarray(arrays.unit(keys[0], "counts"), dtype=np.int64))
        if not np.array_equal(counts, usage_counts(topk, features.shape[0])):
            raise RunDirectoryError(f"layer {L}: the usage counts of its units do not add up to its top-k rows; run again into a new --out directory")
        cal = LayerCalibration(L, np.asarray(features), np.asarray(logits), np.asarray(topk), counts, routing)
        usage.append(usage_rows(cal))
        layers.append(layer_row(cal))
        unused = int((counts == 0).sum())
        if unused:
            plan.warnings.setdefault(layer_unit_key(L), []).append(
                f"layer {L}: {unused} of {counts.size} experts were never chosen by the {n_tokens} calibration tokens")
    return {USAGE_SCHEMA.name: pd.concat(usage, ignore_index=True), LAYERS_SCHEMA.name: pd.concat(layers, ignore_index=True)}


def calibration_extra(setup: CalibrationSetup) -> dict[str, Any]:
    return {
        "activation": setup.activation.name,
        "matrices": {"dir": MATRICES, "features": "[E, d] float64", "router_logits": "[N, E] float32", "topk": "[N, k] int32"},
    }


class Calibration(Analysis):
    """docs/methods.md §3's calibration pass: one unit per MoE layer (or per shard of its tokens);
    every table is derived from the assembled matrices."""

    name = ANALYSIS
    unit_tables = ()
    derived_tables = (USAGE_SCHEMA, LAYERS_SCHEMA, TOKENS_SCHEMA)

    def plan(self, models: Mapping[str, Any], config: CalibrationConfig) -> Plan:
        model: MoEModel = models["a"]
        c = config
        planned = plan_calibration(model, c.texts, c.max_tokens, c.layers, c.batch_tokens, c.device, c.dtype, c.stream,
                                   c.shard_tokens)
        label = f"{model.name} · calibration ({planned.setup.tokens.n_tokens} tokens) · L{compact_ranges(planned.layers)}"
        return Plan(options=planned.options, units=calibration_units(planned.layers, planned.shards), label=label,
                    state=planned.setup, unit_arrays=UNIT_ARRAYS)

    def compute(self, plan: Plan, unit: Unit, context: UnitContext) -> dict[str, np.ndarray]:
        return calibrate_unit(plan.state, unit, context)

    def assemble(self, plan: Plan, arrays: RunArrays) -> Iterator[tuple[str, np.ndarray]]:
        return assemble_matrices(plan, arrays)

    def finish(self, plan: Plan, tables: Mapping[str, pd.DataFrame], arrays: RunArrays | None = None) -> dict[str, pd.DataFrame]:
        assert arrays is not None
        setup: CalibrationSetup = plan.state
        return {**calibration_tables(plan, arrays, setup.tokens.n_tokens), TOKENS_SCHEMA.name: token_rows(setup.tokens)}

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
        out = cls(manifest=run.manifest, tables=run.tables, path=run.path, arrays=run.arrays)
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
    or a list of strings or of token-id lists. ``stream``: ``auto`` runs the model layer by layer
    when it does not fit in memory, ``on`` always, ``off`` never (refusing a model too large). Returns a :class:`CalibrationRun` (tables
    ``calibration_usage``, ``calibration_layers``, ``calibration_tokens`` and the matrices). With
    ``out`` each unit is kept when done and an interrupted run resumes at the next unit.
    ``shard_tokens`` splits each layer's tokens into units of at most that many tokens;
    ``executor``: ``"local"`` (default), ``"ray"`` or a
    :class:`~moelens.analyses.executors.RayExecutor`."""
    run = run_analysis(Calibration(), {"a": models["a"]}, config, out=out, progress=progress, executor=executor)
    return calibration_result(run, out)


def calibration_result(run: Run, out: str | os.PathLike[str] | None) -> CalibrationRun:
    """A finished calibration (or self-calibrating clustering) run with its matrices: from the
    run directory's ``matrices/`` (other layers' left by an abandoned run removed), or from the
    arrays the runner kept in memory."""
    if out is not None:
        store = MatrixStore(os.path.join(os.fspath(out), MATRICES))
    else:
        store = MatrixStore(None)
        for path, array in run.arrays.items():
            _, key, name = path.split("/")
            store.write(int(key[1:]), name, array)
    result = CalibrationRun.of(run, store)
    if out is not None:
        store.remove_other_layers(result.layers)
    result.check_matrices()
    return result


__all__ = ["run", "ANALYSIS", "CALIBRATED", "SHARD_RTOL", "UNIT_ARRAYS", "Calibration", "CalibrationConfig", "CalibrationPlan",
           "CalibrationRun", "assemble_matrices", "calibrate_unit", "calibration_extra", "calibration_result", "calibration_tables",
           "calibration_units", "forward_dtype", "load_calibration", "plan_calibration"]
