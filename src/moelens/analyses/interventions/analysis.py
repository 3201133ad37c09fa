"""Layer-wise interventions with JS divergence (docs/methods.md §4, seed 003): which layers and token
sites carry a prediction.

For every prompt (JSONL: ``prompt``, ``subject``, optional ``target``), every chosen layer and every
site, one cell: the site is knocked out (zero or the prompt set's mean), restored into a corrupted
run (ROME's causal tracing), or the last position's attention to it is blocked (Geva et al.), and
the cell's value is JSD(p_clean, p_intervened) at the last position, in bits. A unit is a group of
prompts; within it, many cells share each forward pass (:mod:`moelens.runtime.trace`).

Tables:
- ``interventions``: one row per prompt × cell: ``prompt_id`` (0-based line of the prompts file),
  ``layer``, ``site``, ``mode``, ``position`` (restore: the restored token; −1 otherwise),
  ``token_kind`` (restore: ROME's token group; "" otherwise), ``jsd`` (bits), ``target_id`` (the
  target's first token, or the clean top-1 without a target), ``p_target_clean``, ``p_target``
  (after the intervention), ``p_target_corrupt`` and ``indirect_effect`` = p_target −
  p_target_corrupt (restore; NaN otherwise);
- ``interventions_summary``: per (layer, site, mode, token_kind, measure ∈ jsd | p_target |
  indirect_effect): mean, std (ddof 0) and n over prompts (and positions of one token group).

Units and seeds: a unit is a group of prompts; everything it needs from the whole prompt set (the
means of ``ablation="mean"``, the prompts kept by ``correct_only``, restore's noise std) is fixed in
the plan, so a unit's computation reads the plan and changes nothing, and the groups run on any
executor. Every unit carries the config's seed; prompt p draws its noise from unit seed +
prompt_id, so a prompt's noise does not depend on its group.

Against ROME's causal tracing (details in :mod:`moelens.runtime.trace`): by default restore's noise
std is 3 × the std of all embedding entries and each prompt draws its own noise (seed + prompt_id),
and every prompt is traced; ``noise_scale="subject"`` (3 × the std of the subject tokens'
embeddings over the prompt set), ``noise_draw="shared"`` (one fixed-seed draw for every prompt)
and ``correct_only=True`` (skip prompts whose clean top-1 is not the target's first token; the
count goes to the manifest's ``prompts_skipped_incorrect`` and the report's notes) are ROME's rules.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from moelens.analyses.base import Analysis, Plan, Unit, UnitContext, chosen_layers
from moelens.analyses.executors import Executor
from moelens.analyses.interventions.config import InterventionsConfig
from moelens.analyses.runner import run_analysis
from moelens.checkpoint.model import MoEModel
from moelens.errors import ConfigError, IndexOutOfRangeError
from moelens.progress import ProgressCallback
from moelens.ranges import compact_ranges
from moelens.results.run import Run
from moelens.results.schema import TableSchema
from moelens.runtime.checks import (
    check_checkpoint_finite,
    check_vocabulary,
    embedding_rows,
    max_positions,
    quiet_transformers,
)
from moelens.runtime.prompts import PromptRecord, TokenisedPrompt, as_records, tokenise_all
from moelens.runtime.trace import (
    SITE_MODULE,
    Tracer,
    TraceSettings,
    noise_std,
    site_available,
)

if TYPE_CHECKING:
    from moelens.analyses.executors import Executor

ANALYSIS = "interventions"
TABLE_SCHEMA = TableSchema(ANALYSIS, (
    ("prompt_id", "int"), ("layer", "int"), ("site", "str"), ("mode", "str"), ("position", "int"), ("token_kind", "str"),
    ("jsd", "float"), ("target_id", "int"), ("p_target_clean", "float"), ("p_target", "float"),
    ("p_target_corrupt", "float"), ("indirect_effect", "float"),
))
SUMMARY_SCHEMA = TableSchema("interventions_summary", (
    ("layer", "int"), ("site", "str"), ("mode", "str"), ("token_kind", "str"), ("measure", "str"),
    ("mean", "float"), ("std", "float"), ("n", "int"),
))
#: Prompts per unit: a unit's clean states (restore) are held for all its prompts at once.
PROMPTS_PER_UNIT = {"knockout": 32, "restore": 8, "block": 32}


@dataclass
class InterventionsState:
    model_path: str
    records: list[PromptRecord]
    prompts: list[TokenisedPrompt]
    tracer: Tracer
    settings: TraceSettings
    means: dict | None = None  # knockout with ablation mean: (layer, site) -> the prompt set's mean, fixed in the plan
    skipped_wrong: list[int] | None = None  # prompt ids dropped by correct_only


def correct_prompts(tracer: Tracer, prompts: Sequence[TokenisedPrompt], chunk: int = 256) -> tuple[list[TokenisedPrompt], list[int]]:
    """``prompts`` whose clean top-1 token is the target's first token (a prompt without a target
    is its own top-1, so it stays), and the ids of the others: ROME's ``calculate_hidden_flow``
    returns early on those."""
    kept, wrong = [], []
    parts = [prompts[start:start + chunk] for start in range(0, len(prompts), chunk)]
    # streamed: every chunk in one pass over the layers
    cleaned = tracer.clean_groups(parts) if tracer.forward.streamed else (tracer.clean(part) for part in parts)
    for part, (probs, _) in zip(parts, cleaned):
        top1 = probs.argmax(-1).tolist()
        for p, t in zip(part, top1):
            if p.target_id is None or p.target_id == t:
                kept.append(p)
            else:
                wrong.append(p.prompt_id)
    return kept, wrong


def _prompts_digest(records: Sequence[PromptRecord]) -> str:
    text = json.dumps([[r.prompt_id, r.prompt, r.subject, r.target] for r in records], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _max_positions(model: Any) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


class Interventions(Analysis):
    """docs/methods.md §4: one unit per group of prompts, one row per prompt × (layer, site[, position])."""

    name = ANALYSIS
    unit_tables = (TABLE_SCHEMA,)
    derived_tables = (SUMMARY_SCHEMA,)

    def plan(self, models: Mapping[str, Any], config: InterventionsConfig) -> Plan:
        from moelens.runtime import load_tokenizer
        from moelens.runtime.forward import open_forward
        from moelens.runtime.load import auto_dtype
        from moelens.spectral import resolve_device

        model: MoEModel = models["a"]
        records, path = as_records(config.prompts)
        if config.limit is not None:
            records = records[:config.limit]
        source = path or "prompts"
        device = resolve_device(config.device)
        tokenizer = load_tokenizer(model.path)  # no tokenizer: one clear error, before the weights load
        n_layers = model.n_layers
        layers = chosen_layers(config.layers, range(n_layers), "layer")
        bad = [L for L in layers if not 0 <= L < n_layers]
        if bad:
            raise IndexOutOfRangeError(f"layer {bad[0]} is out of range: {model.name} has layers 0..{n_layers - 1}")
        sites = config.chosen_sites
        if not model.moe_layers:
            moe_only = [s for s in sites if s in ("router", "moe")]
            if "router" in moe_only:
                raise ConfigError(f"site router: {model.name} is a dense model and has no router; choose from subj, attn, last")
        # the tokenizer fits the embedding, every prompt fits the positions and every target the
        # vocabulary: refused before the weights load and before a run directory is made
        check_vocabulary(tokenizer, embedding_rows(model.config), model.name)
        with quiet_transformers():
            prompts = tokenise_all(tokenizer, records, source, max_positions(model.config))
        check_checkpoint_finite(model)  # NaN/inf weights named as the checkpoint stores them, before any write
        # the whole model when it fits, else one decoder layer at a time; a model that does not fit
        # with streaming off is refused here, before anything is written
        forward = open_forward(model.path, device, auto_dtype(config.dtype, device), stream=config.stream, revision=model.revision)
        lm, arch = forward.model, forward.arch
        max_pos = _max_positions(lm)
        if max_pos is not None:
            long = [p for p in prompts if p.length > max_pos]
            if long:
                raise ConfigError(f"{source} line {long[0].prompt_id + 1}: the prompt has {long[0].length} tokens, more than the model's {max_pos} positions")
        missing = [s for s in sites if not any(site_available(arch, L, s) for L in layers)]
        if missing:
            what = {"router": "a router", "mlp": "an MLP or MoE block", "attention": "self-attention", "layer": "decoder layers"}[SITE_MODULE[missing[0]]]
            raise ConfigError(f"site {missing[0]}: no chosen layer of {model.name} has {what}; choose other sites or layers")
        skipped = sorted({f"{s}@{L}" for L in layers for s in sites if not site_available(arch, L, s)})
        # "subject": over the whole prompt set given, before --correct-only (ROME: every subject)
        sigma = None
        if config.mode == "restore":
            with forward.materialised(arch.embedding) as embedding:
                sigma = noise_std(embedding, config.noise_scale, prompts)
        settings = TraceSettings(mode=config.mode, sites=sites, ablation=config.ablation, layers=tuple(layers),
                                 window=config.chosen_window, noise_samples=config.noise_samples, seed=config.seed,
                                 rows_per_batch=config.batch_size, noise_std=sigma, noise_draw=config.noise_draw)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        tracer = Tracer(lm, arch, settings, pad_id=int(pad_id), forward=forward)
        skipped_wrong: list[int] = []
        if config.correct_only:
            prompts, skipped_wrong = correct_prompts(tracer, prompts)
            if not prompts:
                raise ConfigError(f"--correct-only: the model's top-1 token is the target's first token in none of the "
                                  f"{len(skipped_wrong)} prompts of {source}; nothing is left to trace (drop --correct-only)")
        if "router" in sites:
            tracer.check_routers(prompts[0])  # a router whose logits cannot be replaced: an error now
        if config.mode == "block":
            tracer.check_block(prompts[0])  # attention that cannot be blocked: an error now
        # the prompt set's means, once per plan (one clean pass), before any unit needs them
        means = tracer.means(prompts) if config.mode == "knockout" and config.ablation == "mean" else None
        size = PROMPTS_PER_UNIT[config.mode]
        units = [Unit(key=f"P{start:06d}", seed=config.seed, data={"prompts": list(range(start, min(start + size, len(prompts))))})
                 for start in range(0, len(prompts), size)]
        options = {
            "prompts": path if path is not None else f"<{len(records)} prompts given in Python>",
            "prompts_sha256": _prompts_digest(records), "n_prompts": len(records), "limit": config.limit, "mode": config.mode, "sites": list(sites),
            "ablation": config.ablation if config.mode == "knockout" else None, "layers": list(layers),
            "window": config.chosen_window if config.mode != "knockout" else None,
            "noise_samples": config.noise_samples if config.mode == "restore" else None, "seed": config.seed,
            "noise_scale": config.noise_scale if config.mode == "restore" else None,
            "noise_draw": config.noise_draw if config.mode == "restore" else None, "correct_only": config.correct_only,
            "device": str(device), "dtype": str(next(lm.parameters()).dtype).replace("torch.", ""), "stream": config.stream,
        }
        notes = [f"{len(skipped)} (site, layer) cells skipped: the layer lacks the module ({', '.join(skipped[:12])}{' …' if len(skipped) > 12 else ''})"] if skipped else []
        if config.correct_only:
            ids = ", ".join(str(i) for i in skipped_wrong[:12]) + (" …" if len(skipped_wrong) > 12 else "")
            notes.append(f"{len(skipped_wrong)} of {len(skipped_wrong) + len(prompts)} prompts skipped (correct only): the clean "
                         f"top-1 token is not the target's first token" + (f" (prompt ids {ids})" if skipped_wrong else ""))
        state = InterventionsState(str(model.path), records, prompts, tracer, settings, means=means,
                                   skipped_wrong=skipped_wrong if config.correct_only else None)
        label = f"{model.name} · {config.mode} · L{compact_ranges(layers)}"
        return Plan(options=options, units=units, label=label, state=state, notes=notes)

    def compute(self, plan: Plan, unit: Unit, context: UnitContext) -> dict[str, pd.DataFrame]:
        s: InterventionsState = plan.state
        prompts = [s.prompts[i] for i in unit.data["prompts"]]
        results = s.tracer.run(prompts, s.means, context.progress, noun=f"cells of prompts {prompts[0].prompt_id}…{prompts[-1].prompt_id}",
                               seed=unit.seed)
        table = pd.DataFrame(results.columns())
        table.insert(3, "mode", s.settings.mode)
        return {ANALYSIS: table[TABLE_SCHEMA.column_names]}

    def finish(self, plan: Plan, tables: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        return {SUMMARY_SCHEMA.name: summarise(tables[ANALYSIS])}

    def manifest_extra(self, plan: Plan) -> dict[str, Any]:
        s: InterventionsState = plan.state
        extra: dict[str, Any] = {"architecture": s.tracer.arch.model_type, "n_layers": s.tracer.arch.n_layers}
        if s.settings.mode == "restore":
            extra["noise_std"] = s.settings.noise_std
        if s.skipped_wrong is not None:
            extra["prompts_skipped_incorrect"] = len(s.skipped_wrong)
            extra["prompts_skipped_incorrect_ids"] = list(s.skipped_wrong)
        return extra


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Mean, std (ddof 0) and n of each measure per (layer, site, mode, token_kind)."""
    measures = ["jsd", "p_target"] + (["indirect_effect"] if (table["mode"] == "restore").any() else [])
    long = table.melt(id_vars=["layer", "site", "mode", "token_kind"], value_vars=measures, var_name="measure", value_name="value")
    grouped = long.groupby(["layer", "site", "mode", "token_kind", "measure"], sort=True)["value"]
    out = grouped.agg(mean="mean", std=lambda v: float(np.std(v.to_numpy(), ddof=0)), n="count").reset_index()
    out["n"] = out["n"].astype("int64")
    return out[SUMMARY_SCHEMA.column_names]


def run(models: Mapping[str, Any], config: InterventionsConfig, *, out: str | os.PathLike[str] | None = None,
        progress: ProgressCallback | None = None, executor: str | Executor | None = None) -> Run:
    """Which layers and sites carry a prediction: knock out, restore or block one site at one
    layer and measure how the next-token distribution changes (JSD in bits).

    Returns a :class:`~moelens.results.Run` with tables ``interventions`` (one row per prompt and
    cell) and ``interventions_summary`` (mean, std, n per layer and site). ``stream``: ``auto``
    runs the model layer by layer when it does not fit in memory, ``on`` always, ``off`` never.
    ``executor``: ``"local"`` (default), ``"ray"`` or a :class:`~moelens.analyses.executors.RayExecutor`
    (groups of prompts as tasks).

    >>> run = trace("zoo/base", "zoo/facts.jsonl")                     # seed 003: subj/attn/last
    >>> run["interventions_summary"].query("measure == 'jsd'")
    """
    return run_analysis(Interventions(), {"a": models["a"]}, config, out=out, progress=progress, executor=executor)


__all__ = ["run", "ANALYSIS", "Interventions", "InterventionsConfig", "SUMMARY_SCHEMA", "TABLE_SCHEMA", "summarise"]
