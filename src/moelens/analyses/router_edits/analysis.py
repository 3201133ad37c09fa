"""Router edits (docs/methods.md §8): does the router–expert alignment matter?

For MoE layer ℓ, expert e, matrix m (gate by default; rows in the input space R^d: gate/up as
stored [F, d], down transposed) and k, V_k are the top-k right singular vectors of m (one eigh of
its Gram, :mod:`moelens.spectral`) and P = V_k V_kᵀ. One row r_e of the router is edited:

    project_out   r_e ← r_e − P r_e                     removed_norm = ‖P r_e‖
    keep_aligned  r_e ← P r_e                           removed_norm = ‖(I − P) r_e‖
    random        r_e ← r_e − c U Uᵀ r_e,  c = ‖P r_e‖ / ‖U Uᵀ r_e‖   removed_norm = ‖P r_e‖
                  (U: QR of a Gaussian d × k matrix seeded by (seed, ℓ, e, k, sample))
    zero          r_e ← 0                               removed_norm = ‖r_e‖
    transplant    r_e ← r_e'                            removed_norm = ‖r_e − r_e'‖

and measured over the prompts (:mod:`moelens.runtime.router_edits`). Where m has rank below k
(F < d), P projects on all of its rank directions; random still removes a k-dimensional part.

Tables:
- ``router_edits``: one row per (layer, expert, edit, k, sample): partner (transplant: e'; −1
  otherwise), matrix, removed_norm, routed_before / routed_after (share of top-k slots at ℓ that
  go to e, every position of every prompt), topk_changed (share of positions whose top-k set at ℓ
  changed), jsd and kl (bits, next token at the last position, mean over prompts);
- ``router_edits_summary``: per (layer, edit, k, measure): mean, std (ddof 0), n over experts and
  samples; on project_out rows, random's mean at the same (layer, k), the difference and a paired
  sign-flip permutation p-value over experts (two-sided; exact up to 16 experts);
- ``router_edits_migration``: transplant: of the positions that routed to e before (n_tokens),
  the share whose edited top-k set holds each expert j.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from moelens.analyses.base import Analysis, Plan, Unit, UnitContext, chosen_layers, layer_units, stream_seed
from moelens.analyses.executors import Executor
from moelens.analyses.router_edits.config import DEFAULT_K, EDITS_WITH_K, RouterEditsConfig
from moelens.analyses.runner import run_analysis
from moelens.checkpoint.model import MoEModel
from moelens.errors import ConfigError, IndexOutOfRangeError, NotMoEError
from moelens.progress import ProgressCallback
from moelens.ranges import compact_ranges
from moelens.results.run import Run
from moelens.results.schema import TableSchema

if TYPE_CHECKING:
    from moelens.analyses.executors import Executor

ANALYSIS = "router_edits"
TABLE_SCHEMA = TableSchema(ANALYSIS, (
    ("layer", "int"), ("expert", "int"), ("partner", "int"), ("matrix", "str"), ("edit", "str"), ("k", "int"), ("sample", "int"),
    ("removed_norm", "float"), ("routed_before", "float"), ("routed_after", "float"), ("topk_changed", "float"),
    ("jsd", "float"), ("kl", "float"),
))
MIGRATION_SCHEMA = TableSchema("router_edits_migration", (
    ("layer", "int"), ("expert", "int"), ("partner", "int"), ("to_expert", "int"), ("share", "float"), ("n_tokens", "int"),
))
SUMMARY_SCHEMA = TableSchema("router_edits_summary", (
    ("layer", "int"), ("edit", "str"), ("k", "int"), ("measure", "str"), ("mean", "float"), ("std", "float"), ("n", "int"),
    ("random_mean", "float"), ("difference", "float"), ("p_value", "float"),
))
MEASURES = ("removed_norm", "routed_before", "routed_after", "routed_drop", "topk_changed", "jsd", "kl")
EXACT_FLIPS_UP_TO = 16
FLIP_DRAWS = 20_000


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------
def read_prompt_texts(prompts: Any) -> tuple[list[str], str]:
    """Prompt texts and a name for messages: a JSONL file (``prompt`` on every line), a text file
    (one text per non-blank line) or a list of strings / dicts with ``prompt``."""
    from moelens.textfiles import read_jsonl, read_text

    if isinstance(prompts, (str, os.PathLike)):
        path = Path(prompts)
        source = str(path)
        if path.suffix.lower() in (".jsonl", ".json"):
            texts = []
            for line, obj in read_jsonl(path, "prompts file"):
                if not isinstance(obj, Mapping) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
                    raise ConfigError(f"{source} line {line}: expected an object with a non-empty \"prompt\" string")
                texts.append(obj["prompt"])
        else:
            texts = [t for t in read_text(path, "prompts file").splitlines() if t.strip()]
    else:
        source = "prompts"
        texts = []
        for i, p in enumerate(prompts):
            text = p["prompt"] if isinstance(p, Mapping) else p
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"prompt {i}: expected a non-empty string")
            texts.append(text)
    if not texts:
        raise ConfigError(f"{source} holds no prompts")
    return texts, source


# ----------------------------------------------------------------------------------------------
# The edited rows
# ----------------------------------------------------------------------------------------------
def top_directions(weight: torch.Tensor, role: str, k: int) -> torch.Tensor:
    """V_k [d, min(k, rank)] float64: the top input-side singular vectors of one expert matrix
    (one eigh of its Gram, :func:`moelens.spectral.spectrum_of`)."""
    from moelens.spectral import INPUT_SIDE, input_side, spectrum_of

    x = input_side(weight.detach().to("cpu", torch.float64), role)
    spec = spectrum_of(x[None].contiguous(), "eigh")
    sigma, basis, rank = spec.item(0)
    kk = min(int(k), int(rank))
    if spec.side == INPUT_SIDE:
        return basis[:, :kk].contiguous()
    return (x.T @ basis[:, :kk]) / sigma[:kk]  # v_m = Xᵀ u_m / σ_m


def random_basis(d: int, k: int, seed: int, layer: int, expert: int, sample: int) -> torch.Tensor:
    """U [d, k] float64: an orthonormal basis of a random k-dimensional subspace (QR of a Gaussian
    d × k matrix), seeded by (seed, layer, expert, k, sample) alone."""
    g = torch.Generator().manual_seed(stream_seed(seed, f"L{layer}E{expert}k{k}s{sample}"))
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    return q


@dataclass(frozen=True)
class EditSpec:
    """One cell of the table: the edit, its parameters and the new router row [d] (float64)."""

    expert: int
    partner: int
    edit: str
    k: int
    sample: int
    removed_norm: float
    row: torch.Tensor


def edit_rows(router: torch.Tensor, directions: Mapping[int, torch.Tensor], experts: Sequence[int], edits: Sequence[str],
              ks: Sequence[int], samples: int, seed: int, layer: int, pairs: Sequence[tuple[int, int]]) -> list[EditSpec]:
    """Every cell of one layer. ``router`` [E, d]; ``directions[e]`` V of expert e with at least
    max(ks) columns (or its rank)."""
    r_all = router.detach().to("cpu", torch.float64)
    d = r_all.shape[1]
    out: list[EditSpec] = []
    with_k = any(x in edits for x in EDITS_WITH_K)  # zero and transplant alone need no directions
    for e in experts:
        r = r_all[e]
        for k in ks if with_k else ():
            v = directions[e][:, :k]
            pr = v @ (v.T @ r)
            if "project_out" in edits:
                out.append(EditSpec(e, -1, "project_out", k, 0, float(pr.norm()), r - pr))
            if "keep_aligned" in edits:
                out.append(EditSpec(e, -1, "keep_aligned", k, 0, float((r - pr).norm()), pr.clone()))
            if "random" in edits:
                target = float(pr.norm())
                for s in range(samples):
                    u = random_basis(d, k, seed, layer, e, s)
                    ur = u @ (u.T @ r)
                    c = target / float(ur.norm()) if float(ur.norm()) > 0 else 0.0
                    out.append(EditSpec(e, -1, "random", k, s, float((c * ur).norm()), r - c * ur))
        if "zero" in edits:
            out.append(EditSpec(e, -1, "zero", 0, 0, float(r.norm()), torch.zeros_like(r)))
    if "transplant" in edits:
        for e, partner in pairs:
            out.append(EditSpec(e, partner, "transplant", 0, 0, float((r_all[e] - r_all[partner]).norm()), r_all[partner].clone()))
    return out


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------
def sign_flip_p(differences: np.ndarray, seed: int = 0) -> float:
    """Two-sided paired permutation p-value of mean(differences) = 0: the share of sign flips
    whose |mean| is at least the observed one (every flip when n ≤ 16, else 20 000 draws, the
    observed one counted)."""
    x = np.asarray(differences, dtype=np.float64)
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        return float("nan")
    observed = abs(x.mean())
    tol = 1e-12 * max(1.0, observed)
    if n <= EXACT_FLIPS_UP_TO:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        return float(np.mean(np.abs(signs @ x / n) >= observed - tol))
    rng = np.random.default_rng(seed)
    signs = rng.choice((1.0, -1.0), size=(FLIP_DRAWS, n))
    hits = int(np.sum(np.abs(signs @ x / n) >= observed - tol))
    return (hits + 1) / (FLIP_DRAWS + 1)


def summarise(table: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per (layer, edit, k, measure): mean, std (ddof 0), n; project_out against random."""
    t = table.assign(routed_drop=table["routed_before"] - table["routed_after"])
    long = t.melt(id_vars=["layer", "expert", "edit", "k", "sample"], value_vars=list(MEASURES), var_name="measure", value_name="value")
    grouped = long.groupby(["layer", "edit", "k", "measure"], sort=True)["value"]
    out = grouped.agg(mean="mean", std=lambda v: float(np.std(v.to_numpy(), ddof=0)), n="count").reset_index()
    out["n"] = out["n"].astype("int64")
    out["random_mean"] = np.nan
    out["difference"] = np.nan
    out["p_value"] = np.nan
    per_expert = long.groupby(["layer", "edit", "k", "measure", "expert"], sort=True)["value"].mean()
    for i, row in out[out["edit"] == "project_out"].iterrows():
        key = (row["layer"], "random", row["k"], row["measure"])
        try:
            rand = per_expert.loc[key]
        except KeyError:
            continue
        po = per_expert.loc[(row["layer"], "project_out", row["k"], row["measure"])]
        both = po.index.intersection(rand.index)
        diff = po.loc[both].to_numpy() - rand.loc[both].to_numpy()
        out.loc[i, "random_mean"] = float(rand.mean())
        out.loc[i, "difference"] = float(row["mean"] - rand.mean())
        out.loc[i, "p_value"] = sign_flip_p(diff, seed)
    return out[SUMMARY_SCHEMA.column_names]


# ----------------------------------------------------------------------------------------------
# The analysis
# ----------------------------------------------------------------------------------------------
@dataclass
class RouterEditsState:
    model: MoEModel
    prompts: list[tuple[int, ...]]
    runner: Any
    layers: list[int]
    experts: list[int]
    ks: list[int]
    edits: tuple[str, ...]
    pairs: list[tuple[int, int]]
    top_k: int


class RouterEdits(Analysis):
    """docs/methods.md §8: one unit per MoE layer, one row per (expert, edit, k, sample)."""

    name = ANALYSIS
    unit_tables = (TABLE_SCHEMA, MIGRATION_SCHEMA)
    derived_tables = (SUMMARY_SCHEMA,)

    def plan(self, models: Mapping[str, Any], config: RouterEditsConfig) -> Plan:
        from moelens.runtime import load_tokenizer
        from moelens.runtime.checks import (
            check_checkpoint_finite,
            check_vocabulary,
            embedding_rows,
            max_positions,
            quiet_transformers,
        )
        from moelens.runtime.load import auto_dtype
        from moelens.runtime.router_edits import RouterEditRunner
        from moelens.spectral import resolve_device

        model: MoEModel = models["a"]
        if not model.is_moe:
            raise NotMoEError(f"{model.name} is a dense {model.family} model with no router; router edits need an MoE checkpoint")
        texts, source = read_prompt_texts(config.prompts)
        if config.limit is not None:
            texts = texts[:config.limit]
        layers = chosen_layers(config.layers, model.moe_layers)
        for L in layers:
            if L not in model.moe_layers:
                if not 0 <= L < model.n_layers:
                    raise IndexOutOfRangeError(f"layer {L} is out of range: {model.name} has layers 0..{model.n_layers - 1}")
                raise NotMoEError(f"layer {L} of {model.name} is dense; its MoE layers are {compact_ranges(model.moe_layers)}")
        n_experts = model.n_experts
        experts = list(config.experts) if config.experts is not None else list(range(n_experts))
        if len(set(experts)) != len(experts):
            raise ConfigError(f"experts {experts} name an expert twice; list each expert once")
        bad = [e for e in experts if not 0 <= e < n_experts]
        if bad:
            raise IndexOutOfRangeError(f"expert {bad[0]} is out of range: {model.name} has experts 0..{n_experts - 1}")
        d = model.hidden_size
        if config.k is not None:
            ks = list(config.k)
            if ks[-1] > d:
                raise ConfigError(f"k={ks[-1]} is more than the hidden size d={d} of {model.name}; pick every k in 1..{d}")
        else:
            ks = [k for k in DEFAULT_K if k <= d] or [d]
        edits = config.chosen_edits
        pairs = list(config.pairs) if config.pairs is not None else [(e, (e + 1) % n_experts) for e in experts]
        bad_pair = [p for p in pairs if not (0 <= p[0] < n_experts and 0 <= p[1] < n_experts)]
        if "transplant" in edits and bad_pair:
            raise IndexOutOfRangeError(f"pair {bad_pair[0][0]}:{bad_pair[0][1]} is out of range: {model.name} has experts 0..{n_experts - 1}")
        if "transplant" not in edits:
            pairs = []
        if any(e in edits for e in EDITS_WITH_K) and not model.layer(layers[0]).has_role(config.matrix):
            raise ConfigError(f"{model.name} ({model.family}) experts have no {config.matrix} matrix; use --matrix up or down")
        for L in layers:
            model.layer(L).check()
        device = resolve_device(config.device)
        tokenizer = load_tokenizer(model.path)
        check_vocabulary(tokenizer, embedding_rows(model.config), model.name)
        limit = max_positions(model.config)
        prompts = []
        with quiet_transformers():
            for i, text in enumerate(texts):
                ids = tuple(int(t) for t in tokenizer(text)["input_ids"])
                if not ids:
                    raise ConfigError(f"{source} prompt {i + 1}: the prompt encodes to no token")
                if limit is not None and len(ids) > limit:
                    raise ConfigError(f"{source} prompt {i + 1}: the prompt has {len(ids)} tokens, more than the model's {limit} positions")
                prompts.append(ids)
        check_checkpoint_finite(model)
        from moelens.runtime.forward import open_forward

        # whole or layer by layer (a model that does not fit with streaming off is refused here,
        # before anything is written); a streamed unit runs its batches in one pass from its layer
        forward = open_forward(model.path, device, auto_dtype(config.dtype, device), stream=config.stream, revision=model.revision)
        arch = forward.arch
        missing = [L for L in layers if arch.layers[L].router is None]
        if missing:
            raise ConfigError(f"layer {missing[0]}: moelens finds no router module in the loaded {arch.model_type} model")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        runner = RouterEditRunner(forward.model, arch, layers, model.top_k, pad_id=int(pad_id), rows_per_batch=config.batch_size,
                                  forward=forward)
        with runner.installed(prompts[0]):  # a router whose logits cannot be replaced: an error now
            pass
        units = layer_units(layers, config.seed)
        options = {
            "prompts": source if isinstance(config.prompts, (str, os.PathLike)) else f"<{len(texts)} prompts given in Python>",
            "n_prompts": len(texts), "limit": config.limit, "edits": list(edits), "k": ks, "matrix": config.matrix,
            "layers": layers, "experts": experts, "pairs": [list(p) for p in pairs], "samples": config.samples, "seed": config.seed,
            "device": str(device), "dtype": str(forward.dtype).replace("torch.", ""), "stream": config.stream,
        }
        state = RouterEditsState(model, prompts, runner, layers, experts, ks, edits, pairs, model.top_k)
        label = f"{model.name} · router edits · L{compact_ranges(layers)}"
        return Plan(options=options, units=units, label=label, state=state)

    def compute(self, plan: Plan, unit: Unit, context: UnitContext) -> dict[str, pd.DataFrame]:
        from moelens.runtime.architecture import router_weight
        from moelens.runtime.router_edits import Cell

        s: RouterEditsState = plan.state
        opts = plan.options
        L = int(unit.layer)
        runner = s.runner
        with runner.installed(s.prompts[0]):
            # the clean pass keeps this layer's inputs only ([P, T, d]); it costs P rows against
            # the unit's P × cells
            clean = runner.clean(s.prompts, keep=[L])
            with runner.forward.materialised(runner.arch.layers[L].router) as module:  # streamed: read for the rows
                router = router_weight(module).detach().clone()
            directions: dict[int, torch.Tensor] = {}
            if any(e in s.edits for e in EDITS_WITH_K):
                wanted = set(s.experts)
                for e, weight in s.model.layer(L).iter_experts(opts["matrix"]):
                    if e in wanted:
                        directions[e] = top_directions(weight, opts["matrix"], max(s.ks))
            specs = edit_rows(router, directions, s.experts, s.edits, s.ks, opts["samples"], unit.seed, L, s.pairs)
            cells = [Cell(L, spec.expert, spec.row, spec.partner if spec.edit == "transplant" else -1) for spec in specs]
            totals = runner.run(s.prompts, cells, clean, context.progress, noun=f"router edits of layer {L}")
        n_experts = int(router.shape[0])
        n = clean.n_positions
        routed = clean.routed(L, n_experts)  # positions per expert, clean
        P = len(s.prompts)
        rows = {c: [] for c in TABLE_SCHEMA.column_names}
        for i, spec in enumerate(specs):
            for name, value in (("layer", L), ("expert", spec.expert), ("partner", spec.partner), ("matrix", opts["matrix"]),
                                ("edit", spec.edit), ("k", spec.k), ("sample", spec.sample), ("removed_norm", spec.removed_norm),
                                ("routed_before", routed[spec.expert] / (n * s.top_k)),
                                ("routed_after", totals.routed_after[i] / (n * s.top_k)),
                                ("topk_changed", totals.changed[i] / n), ("jsd", totals.jsd[i] / P), ("kl", totals.kl[i] / P)):
                rows[name].append(value)
        migration = {c: [] for c in MIGRATION_SCHEMA.column_names}
        for i, spec in enumerate(specs):
            if spec.edit != "transplant":
                continue
            before = int(routed[spec.expert])
            for j in range(n_experts):
                for name, value in (("layer", L), ("expert", spec.expert), ("partner", spec.partner), ("to_expert", j),
                                    ("share", totals.migration[i, j] / before if before else float("nan")), ("n_tokens", before)):
                    migration[name].append(value)
        return {ANALYSIS: pd.DataFrame(rows), MIGRATION_SCHEMA.name: pd.DataFrame(migration, columns=MIGRATION_SCHEMA.column_names)}

    def finish(self, plan: Plan, tables: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        return {SUMMARY_SCHEMA.name: summarise(tables[ANALYSIS], int(plan.options["seed"]))}

    def manifest_extra(self, plan: Plan) -> dict[str, Any]:
        s: RouterEditsState = plan.state
        return {"architecture": s.runner.arch.model_type, "top_k": s.top_k, "hidden_size": s.model.hidden_size}


def run(models: Mapping[str, Any], config: RouterEditsConfig, *, out: str | os.PathLike[str] | None = None,
        progress: ProgressCallback | None = None, executor: str | Executor | None = None) -> Run:
    """Edit router rows (project out the aligned part, matched random controls, zero, transplant)
    and measure routing and next-token predictions (docs/methods.md §8). ``stream``: ``auto`` runs
    the model layer by layer when it does not fit the device's memory, ``on`` always, ``off`` never
    (a model that does not fit is refused).

    >>> run = router_edits("zoo/base", "zoo/facts.jsonl", k=[1, 8, 64])
    >>> run["router_edits_summary"].query("measure == 'routed_drop' and edit == 'project_out'")
    """
    return run_analysis(RouterEdits(), {"a": models["a"]}, config, out=out, progress=progress, executor=executor)


__all__ = ["run", "ANALYSIS", "MIGRATION_SCHEMA", "RouterEdits", "RouterEditsConfig", "SUMMARY_SCHEMA", "TABLE_SCHEMA", "edit_rows",
           "random_basis", "read_prompt_texts", "sign_flip_p", "summarise", "top_directions"]
