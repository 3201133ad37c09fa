"""Per-module metrics of every layer (docs/methods.md §5 and §7; the heat map of seed 002).

Single-model metrics of each matrix of model A (and B): Frobenius norm, spectral norm σ₁, stable
rank ‖W‖_F²/‖W‖₂², effective rank exp(H(σ/Σσ)) and the power-law exponent α of the eigenvalues
of WᵀW (as WeightWatcher fits it). Pair metrics between A and B (same architecture): Pearson
correlation and cosine of the flattened weights, rel_l2 = ‖A/‖A‖ − B/‖B‖‖_F, linear CKA with
the inputs as samples, and changed_frac = share of entries with |A − B| > tol·std(A); with a base
model, the same between the deltas A − base and B − base (``model = "pair_delta"``).

Modules and their names per family: :mod:`moelens.module_names`. In an MoE
layer ``mlp.*`` is the mean over the routed experts; each expert's own value is in the table
``module_metrics_experts``. One unit per layer; a layer's experts are read a few at a time, each
matrix once. An ``mlp.*`` row is the mean over the experts whose value is defined (a zero expert's
NaN is left out; the run's warnings name it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from moelens.analyses.base import Analysis, Plan, Unit, UnitContext, chosen_layers, layer_units
from moelens.analyses.executors import Executor
from moelens.analyses.module_metrics.config import ModuleMetricsConfig
from moelens.analyses.runner import run_analysis
from moelens.checkpoint.model import MoEModel
from moelens.errors import CheckpointFormatError, ConfigError, IndexOutOfRangeError
from moelens.metrics.module import (
    PAIR_METRICS,
    SINGLE_METRICS,
    pair_and_single_metrics,
    pair_metrics,
    single_metrics,
)
from moelens.module_names import ATTENTION, ROLES, mlp_module, module_rank, shared_module
from moelens.progress import ProgressCallback
from moelens.ranges import compact_ranges
from moelens.results.run import Run
from moelens.results.schema import TableSchema
from moelens.spectral import resolve_device

ANALYSIS = "module_metrics"
MODULE_SCHEMA = TableSchema("module_metrics", (
    ("layer", "int"), ("module", "str"), ("metric", "str"), ("model", "str"), ("value", "float"),
))
EXPERT_SCHEMA = TableSchema("module_metrics_experts", (
    ("layer", "int"), ("module", "str"), ("expert", "int"), ("metric", "str"), ("model", "str"), ("value", "float"),
))
#: Experts are read and measured this many bytes (float32) at a time.
CHUNK_BYTES = 512 * 2**20


@dataclass(frozen=True)
class ModuleState:
    models: dict[str, MoEModel]  # "a", and "b" / "base" when given
    layers: list[int]
    pair: tuple[str, ...]
    single: tuple[str, ...]
    config: ModuleMetricsConfig
    device: torch.device


#: Config keys that set a matrix's shape (each family uses some of them).
SHAPE_KEYS = ("hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
              "num_attention_heads", "num_key_value_heads", "head_dim", "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim",
              "qk_nope_head_dim", "v_head_dim", "n_shared_experts", "ffn_hidden_size", "d_model", "n_heads")


def _text_config(model: MoEModel) -> dict[str, Any]:
    config = dict(model.config)
    for nested in ("text_config", "ffn_config", "attn_config"):
        if isinstance(config.get(nested), dict):
            config.update(config[nested])
    return config


def _same_shapes(a: MoEModel, b: MoEModel, what: str) -> None:
    """Every size that sets a matrix's shape agrees (config), and so does every tensor both
    checkpoints name (headers): found before anything is written."""
    ca, cb = _text_config(a), _text_config(b)
    for key in SHAPE_KEYS:
        if ca.get(key) != cb.get(key):
            raise ConfigError(f"{a.name} and {what} {b.name} differ in {key} ({ca.get(key)} vs {cb.get(key)}); pair metrics need two models of one architecture")
    names_b = set(b.store.names())
    for name in a.store.names():
        if name in names_b and a.store.shape(name) != b.store.shape(name):
            raise ConfigError(f"{a.name} and {what} {b.name} store {name} as {list(a.store.shape(name))} and {list(b.store.shape(name))}; pair metrics need two models of one architecture")


def _same_architecture(a: MoEModel, b: MoEModel, what: str) -> None:
    """Pair metrics need matrices of equal shapes: the same family, layers, experts and sizes."""
    checks = [("family", a.family, b.family), ("number of layers", a.n_layers, b.n_layers),
              ("MoE layers", compact_ranges(a.moe_layers), compact_ranges(b.moe_layers)),
              ("hidden size", a.hidden_size, b.hidden_size), ("experts", a.n_experts, b.n_experts),
              ("expert FFN", a.expert_ffn, b.expert_ffn)]
    for name, va, vb in checks:
        if va != vb:
            raise ConfigError(f"{a.name} and {what} {b.name} differ in {name} ({va} vs {vb}); pair metrics need two models of one architecture")
    _same_shapes(a, b, what)


def _head_sizes(config: Mapping[str, Any], d: int) -> tuple[int, int, int] | None:
    """(heads H, key/value heads KV, head width hd) of plain multi-head attention; None where the
    config does not state them or the attention is latent (DeepSeek's kv_lora_rank)."""
    heads = config.get("num_attention_heads") or config.get("n_heads")
    if not isinstance(heads, int) or heads <= 0 or config.get("kv_lora_rank"):
        return None
    kv = config.get("num_key_value_heads") or config.get("kv_n_heads") or heads
    hd = config.get("head_dim") or d // heads
    return (heads, int(kv), int(hd)) if isinstance(kv, int) and isinstance(hd, int) else None


def attention_shape_problem(model: MoEModel, L: int) -> str:
    """"" when layer ``L``'s attention projections have the shapes the config implies, else one
    line naming the tensor. Headers only. Every projection reads the hidden state (q, k, v, a fused
    qkv: [·, d]) or writes it (o: [d, ·]); k and v have KV·hd rows, o has H·hd columns, and q's
    rows are a multiple of H·hd (gated attention doubles them)."""
    from moelens.checkpoint.families.base import format_shape

    family = model.family_adapter
    names, full = getattr(family, "attention_names", None), getattr(family, "_full", None)
    if not names or full is None:
        return ""
    d = model.hidden_size
    shapes = {key: (full(t, L), tuple(model.store.shape(full(t, L)))) for key, t in names.items() if full(t, L) in model.store}
    heads = _head_sizes(_text_config(model), d)

    def wrong(key: str, axes: str, expected: list[Any]) -> str:
        name, shape = shapes[key]
        return f"tensor {name!r} has shape {format_shape(shape)} where {axes} = [{', '.join(map(str, expected))}] is expected"

    for key, (name, shape) in shapes.items():
        if key not in ("q", "k", "v", "o", "qkv"):
            continue
        if len(shape) != 2:
            return f"tensor {name!r} has shape {format_shape(shape)} where a matrix is expected"
        if key == "o" and shape[0] != d:
            return wrong("o", "[d, H·hd]", [d, heads[0] * heads[2] if heads else "·"])
        if key != "o" and shape[1] != d:
            return wrong(key, "[rows, d]", [shape[0], d])
    if heads is not None:
        h, kv, hd = heads
        for key in ("k", "v"):
            if key in shapes and shapes[key][1][0] != kv * hd:
                return wrong(key, "[KV·hd, d]", [kv * hd, d])
        if "o" in shapes and shapes["o"][1][1] != h * hd:
            return wrong("o", "[d, H·hd]", [d, h * hd])
        if "q" in shapes and shapes["q"][1][0] % (h * hd):
            return wrong("q", "[H·hd, d]", [h * hd, d])
    return ""


def resolve(models: Mapping[str, MoEModel | None], config: ModuleMetricsConfig) -> ModuleState:
    a, b, base = models["a"], models.get("b"), models.get("base")
    given = {"a": a, **({"b": b} if b is not None else {}), **({"base": base} if base is not None else {})}
    for name, other in given.items():
        if name != "a":
            _same_architecture(a, other, "the base" if name == "base" else "model B")
    if config.metrics and b is None and base is None:
        raise ConfigError("pair metrics compare two models: give model B (moelens modules A B) or --base BASE")
    pair = tuple(config.metrics) if config.metrics is not None else (PAIR_METRICS if (b is not None or base is not None) else ())
    single = tuple(config.single) if config.single is not None else SINGLE_METRICS
    if not pair and not single:
        raise ConfigError("nothing to compute: give at least one pair metric (with two models) or one single-model metric")
    layers = chosen_layers(config.layers, range(a.n_layers), "layer")
    bad = [L for L in layers if not 0 <= L < a.n_layers]
    if bad:
        raise IndexOutOfRangeError(f"layer {bad[0]} is out of range: {a.name} has layers 0..{a.n_layers - 1}")
    for model in given.values():  # "a" included
        model.check()
        for L in layers:  # attention shapes from headers, before anything is written
            problem = attention_shape_problem(model, L)
            if problem:
                raise CheckpointFormatError(f"layer {L} of {model.name}: {problem}")
    return ModuleState(given, layers, pair, single, config, resolve_device(config.device))


# ----------------------------------------------------------------------------------------------
# The matrices of one layer, as groups of equal-shaped stacks
# ----------------------------------------------------------------------------------------------
@dataclass
class Group:
    """One module of one layer: stacks [B, out, in] of each model (B = 1, or a chunk of experts)."""

    module: str
    stacks: dict[str, torch.Tensor]
    experts: list[int] | None = None  # routed experts in this chunk, None for a plain module


def _attention_groups(models: Mapping[str, MoEModel], L: int) -> Iterator[Group]:
    parts = {name: m.attention(L) for name, m in models.items()}
    for key, matrix in parts["a"].items():
        if matrix.ndim != 2 or key not in ATTENTION:
            continue  # attention sinks and other vectors are not matrices
        yield Group(ATTENTION[key], {name: _matrix(p, key, name, L)[None] for name, p in parts.items()})


def _matrix(parts: Mapping[str, torch.Tensor], key: str, model: str, L: int) -> torch.Tensor:
    if key not in parts:
        raise CheckpointFormatError(f"layer {L}: model {model} has no attention matrix {key!r} where model a has one")
    if parts[key].is_floating_point() and not bool(torch.isfinite(parts[key]).all()):
        # families that split fused tensors read them themselves; NaN would reach eigh as a traceback
        raise CheckpointFormatError(f"layer {L}: the attention matrix {key!r} of model {model} holds NaN/inf values; the checkpoint is corrupt")
    return parts[key]


def _mlp_groups(models: Mapping[str, MoEModel], L: int) -> Iterator[Group]:
    a = models["a"]
    if L not in set(a.moe_layers):
        parts = {name: m.dense_mlp(L) for name, m in models.items()}
        for role in ROLES:
            if role in parts["a"]:
                yield Group(mlp_module(role), {name: p[role][None] for name, p in parts.items()})
        return
    layers = {name: m.layer(L) for name, m in models.items()}
    first = layers["a"]
    for role in ROLES:
        if not first.has_role(role):
            continue  # a family whose experts have no such matrix
        shape = tuple(first.expert_matrix(0, role).shape)
        chunk = max(1, CHUNK_BYTES // (4 * shape[0] * shape[1]))
        for start in range(0, first.n_experts, chunk):
            experts = list(range(start, min(start + chunk, first.n_experts)))
            stacks = {name: torch.stack([layer.expert_matrix(e, role) for e in experts]) for name, layer in layers.items()}
            yield Group(mlp_module(role), stacks, experts)
    shared = {name: layer.shared_experts() for name, layer in layers.items()}
    for i, expert in enumerate(shared["a"]):
        for role in ROLES:
            if getattr(expert, role, None) is not None:
                yield Group(shared_module(i, role), {name: getattr(s[i], role)[None] for name, s in shared.items()})
    yield Group("router", {name: layer.router().weight[None] for name, layer in layers.items()})


# ----------------------------------------------------------------------------------------------
# The analysis
# ----------------------------------------------------------------------------------------------
def _rows(layer: int, module: str, values: Mapping[str, np.ndarray], model: str, experts: list[int] | None) -> list[tuple]:
    out = []
    for metric, v in values.items():
        for i, value in enumerate(np.asarray(v, dtype=np.float64)):
            out.append((layer, module, -1 if experts is None else experts[i], metric, model, float(value)))
    return out


class ModuleMetrics(Analysis):
    """docs/methods.md §5: one unit per layer, one row per (module, metric, model)."""

    name = ANALYSIS
    unit_tables = (MODULE_SCHEMA, EXPERT_SCHEMA)

    def plan(self, models: Mapping[str, Any], config: ModuleMetricsConfig) -> Plan:
        s = resolve(models, config)
        for model in s.models.values():  # before anything is written: a forward-only family has no weights to read
            model.family_adapter.check_weights_readable()
        options = {"layers": list(s.layers), "metrics": list(s.pair), "single": list(s.single), "tol": config.tol,
                   "device": str(s.device), "models": sorted(s.models)}
        m = s.models
        if "b" in m:
            names = f"{m['a'].name} vs {m['b'].name}" + (f" (deltas from {m['base'].name})" if "base" in m else "")
        elif "base" in m:
            names = f"{m['a'].name} vs its base {m['base'].name}"
        else:
            names = m["a"].name
        units = layer_units(s.layers)  # seed 0: nothing random
        return Plan(options=options, units=units, label=f"{names} · L{compact_ranges(s.layers)}", state=s)

    def compute(self, plan: Plan, unit: Unit, context: UnitContext) -> dict[str, pd.DataFrame]:
        s: ModuleState = plan.state
        L = unit.layer
        assert L is not None
        rows: list[tuple] = []
        has_b, has_base = "b" in s.models, "base" in s.models
        groups = [*_attention_groups(s.models, L), *_mlp_groups(s.models, L)]
        for group in groups:
            st = group.stacks
            shapes = {name: tuple(t.shape) for name, t in st.items()}
            if len(set(shapes.values())) != 1:
                raise CheckpointFormatError(f"layer {L} {group.module}: shapes differ between models ({shapes}); pair metrics need equal shapes")
            if s.pair:
                # one Gram per matrix serves both its spectrum and CKA
                other = st["b"] if has_b else st["base"]
                both = pair_and_single_metrics(st["a"], other, s.pair, s.single, s.config.tol, s.device)
                rows += _rows(L, group.module, both.pair, "pair", group.experts)
                if s.single:
                    rows += _rows(L, group.module, both.a, "a", group.experts)
                    if has_b:
                        rows += _rows(L, group.module, both.b, "b", group.experts)
                if has_b and has_base:
                    for i in range(st["a"].shape[0]):  # one matrix's deltas at a time, not whole stacks
                        base = st["base"][i].double()  # float64: a small delta of bf16 weights loses nothing
                        deltas = pair_metrics(st["a"][i].double() - base, st["b"][i].double() - base, s.pair, s.config.tol, s.device)
                        experts = None if group.experts is None else [group.experts[i]]
                        rows += _rows(L, group.module, deltas, "pair_delta", experts)
            elif s.single:
                rows += _rows(L, group.module, single_metrics(st["a"], s.single, s.device), "a", group.experts)
                if has_b:
                    rows += _rows(L, group.module, single_metrics(st["b"], s.single, s.device), "b", group.experts)
        table = pd.DataFrame(rows, columns=["layer", "module", "expert", "metric", "model", "value"])
        for module, nan in table[table["value"].isna()].groupby("module", sort=False):
            names = sorted(set(nan["metric"]))
            why = "a zero matrix or delta" + (", or too few eigenvalues to fit α" if "alpha" in names else "")
            context.warn(f"layer {L} {module}: {', '.join(names)} undefined (NaN): {why}")
        experts = table[table["expert"] >= 0]
        plain = table[table["expert"] < 0].drop(columns="expert")
        means = (experts.groupby(["layer", "module", "metric", "model"], sort=False)["value"].mean().reset_index())
        modules = pd.concat([plain, means], ignore_index=True)
        order = modules["module"].map(module_rank)
        modules = modules.assign(_o=order).sort_values("_o", kind="stable").drop(columns="_o")
        return {
            "module_metrics": modules.astype({"layer": np.int64}).reset_index(drop=True),
            "module_metrics_experts": experts[EXPERT_SCHEMA.column_names].astype({"layer": np.int64, "expert": np.int64}).reset_index(drop=True),
        }


def run(models: Mapping[str, Any], config: ModuleMetricsConfig, *, out: str | os.PathLike[str] | None = None,
        progress: ProgressCallback | None = None, executor: str | Executor | None = None) -> Run:
    """Metrics of every attention and MLP matrix of every layer: single-model metrics of A (and
    B), pair metrics A vs B (or A vs ``base``), and with both B and ``base`` the pair metrics of
    the deltas A − base vs B − base. Dense and MoE models alike.

    Returns a :class:`~moelens.results.Run` with tables ``module_metrics`` (layer, module, metric,
    model, value) and ``module_metrics_experts`` (the same per routed expert). ``executor``:
    ``"local"`` (default), ``"ray"`` or a :class:`~moelens.analyses.executors.RayExecutor`.

    >>> run = module_metrics("zoo/base", "zoo/tuned")
    >>> run["module_metrics"].query("model == 'pair' and metric == 'corr'")
    """
    return run_analysis(ModuleMetrics(), {"a": models["a"], "b": models.get("b"), "base": models.get("base")}, config, out=out,
                        progress=progress, executor=executor)


__all__ = ["run", "ANALYSIS", "ModuleMetrics", "ModuleMetricsConfig"]
