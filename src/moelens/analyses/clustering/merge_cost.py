"""What merging costs (docs/methods.md §3, §7): fact recall and perplexity before and after merging the
experts of each clustering, with and without permutation alignment.

One unit per variant: ``original`` (the model as it is), then for each clustering run its merge
without permutation and with it. In memory, a merged variant is written by
:func:`moelens.merge.export_merged` into a temporary directory, loaded, measured and deleted: one
model in memory at a time. Layer-streamed (``stream``: a model that does not fit, or ``on``), nothing
is written: each merged layer is merged as its weights are read (:func:`moelens.merge.merge_on_load`),
in the checkpoint's dtype as the export does, so the variant's layers equal the exported ones.

- fact recall: the share of facts (JSONL: ``prompt``, ``target``) whose target is the greedy next
  token after the prompt (:func:`moelens.runtime.fact_recall`);
- perplexity: exp of the mean next-token negative log-likelihood over the held-out last 10 % of
  the calibration text's non-empty lines (which calibration never uses), each line
  ``tokenizer(line)`` cut at the model's positions (:mod:`moelens.runtime.perplexity`).

Tables: ``merge_cost`` (one row per variant: ``variant``, ``method`` (``none`` for the original),
``clusters_run``, ``permute``, ``export``, ``groups_min``/``groups_max`` (G over the merged
layers; E for the original), ``recall``, ``perplexity``, ``n_facts``, ``n_tokens`` (predicted
tokens)) and ``merge_cost_summary`` (the same variants against the original: ``recall_delta`` =
recall − recall(original), ``perplexity_ratio`` = perplexity / perplexity(original)).

>>> run = merge_cost("zoo/base", ["runs/hc-smoe", "runs/m-smoe"], facts="zoo/facts.jsonl", texts="zoo/calibration.txt")
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import pandas as pd

from moelens.analyses.base import Analysis, Plan, Unit, UnitContext
from moelens.analyses.calibration.analysis import forward_dtype
from moelens.analyses.clustering.config import MergeCostConfig
from moelens.analyses.executors import Executor
from moelens.analyses.runner import run_analysis
from moelens.checkpoint.model import MoEModel
from moelens.errors import ConfigError, NotMoEError
from moelens.progress import ProgressCallback
from moelens.results.run import Run
from moelens.results.schema import TableSchema
from moelens.textfiles import read_jsonl

if TYPE_CHECKING:
    from moelens.analyses.executors import Executor

ANALYSIS = "merge_cost"
COST_SCHEMA = TableSchema(ANALYSIS, (
    ("variant", "str"), ("method", "str"), ("clusters_run", "str"), ("permute", "bool"), ("export", "str"),
    ("groups_min", "int"), ("groups_max", "int"), ("recall", "float"), ("perplexity", "float"), ("n_facts", "int"), ("n_tokens", "int"),
))
SUMMARY_SCHEMA = TableSchema("merge_cost_summary", (
    ("variant", "str"), ("method", "str"), ("permute", "bool"), ("recall", "float"), ("recall_delta", "float"),
    ("perplexity", "float"), ("perplexity_ratio", "float"),
))


def read_fact_lines(path: str) -> list[tuple[int, dict[str, str]]]:
    """(1-based line, record) with string ``prompt`` and ``target`` from a JSONL file (blank lines
    skipped)."""
    p = Path(path)
    out = []
    for line, obj in read_jsonl(p, "facts file"):
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) and obj[k].strip() for k in ("prompt", "target")):
            raise ConfigError(f"{p} line {line}: every fact needs a non-empty \"prompt\" and \"target\"")
        out.append((line, {"prompt": obj["prompt"], "target": obj["target"]}))
    if not out:
        raise ConfigError(f"facts file {p} holds no facts")
    return out


def read_facts(path: str) -> list[dict[str, str]]:
    """Records with string ``prompt`` and ``target`` from a JSONL file (blank lines skipped)."""
    return [fact for _, fact in read_fact_lines(path)]


def check_facts(path: str, facts: Sequence[tuple[int, dict[str, str]]], tokenizer: Any, limit: int) -> None:
    """Every fact's prompt fits the model's ``limit`` positions and every target is in the
    vocabulary (its tokens hold no unknown token), each refused with its line before any forward
    pass: a fact of a million characters would otherwise run for minutes as one batch."""
    from moelens.runtime.checks import check_length, quiet_transformers
    from moelens.runtime.recall import encode_prompts

    with quiet_transformers():
        prompts = encode_prompts(tokenizer, [f["prompt"] for _, f in facts])
        targets = tokenizer([" " + f["target"] for _, f in facts], add_special_tokens=False, verbose=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    for (line, fact), ids, target in zip(facts, prompts, targets):
        where = f"{path} line {line}"
        check_length(len(ids), limit, where)
        if not target:
            raise ConfigError(f"{where}: the target {fact['target']!r} encodes to no token")
        if unk is not None and unk in target:
            raise ConfigError(f"{where}: the target {fact['target']!r} is not in the tokenizer's vocabulary (it encodes to the "
                              f"unknown token {tokenizer.unk_token!r}); use a target the model can predict")


def facts_digest(facts: list[dict[str, str]]) -> str:
    """SHA-256 of the facts as read (prompt and target of every line, in order)."""
    return hashlib.sha256(json.dumps(facts, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def table_digest(table: pd.DataFrame) -> str:
    """SHA-256 of a clusters table's values (the same digest ``distance --clusters`` records)."""
    return hashlib.sha256(pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes()).hexdigest()


def _calibration_text(run: Run) -> Optional[str]:
    """The calibration text file a clustering run was calibrated on, when it still exists."""
    from moelens.results import load_run

    options = run.manifest.get("options") or {}
    source = options.get("calibration_run")
    if source:
        try:
            options = load_run(source).manifest.get("options") or {}
        except Exception:  # a moved calibration run: no default text, the user names one
            return None
    text = options.get("texts") or options.get("calibration")
    return text if isinstance(text, str) and Path(text).is_file() else None


@dataclass
class Variant:
    key: str
    method: str
    permute: bool
    run_path: str
    clusters: Optional[pd.DataFrame]
    groups: tuple[int, int]


@dataclass
class MergeCostState:
    model: MoEModel
    config: MergeCostConfig
    tokenizer: Any
    facts: Optional[list[dict[str, str]]]
    heldout: Optional[list[tuple[int, ...]]]
    variants: dict[str, Variant]
    device: Any
    dtype: str
    pad_id: int
    streamed: bool = False


def _plan(model: MoEModel, config: MergeCostConfig) -> tuple[MergeCostState, dict[str, Any], list[Unit]]:
    from moelens.analyses.calibration.analysis import pad_id_of, text_config_of
    from moelens.analyses.clustering.merging import clusters_of
    from moelens.calibration.texts import read_lines, tokenise
    from moelens.merge import plan_export
    from moelens.runtime import load_tokenizer
    from moelens.runtime.checks import check_checkpoint_finite, check_vocabulary, embedding_rows, max_positions
    from moelens.spectral import resolve_device

    c = config
    if not model.is_moe:
        raise NotMoEError(f"{model.name} is a dense {model.family} model with no MoE layers; there is nothing to merge")
    runs = []
    for path in c.clusters:
        run, table = clusters_of(path, model)
        plan_export(model.path, table, c.export, model.revision)  # the family and the form's constraints, from headers
        runs.append((path, run, table))
    tokenizer = load_tokenizer(model.path, model.revision)
    check_vocabulary(tokenizer, embedding_rows(model.config), model.name)
    facts = None
    if c.facts is not None:
        fact_lines = read_fact_lines(c.facts)
        check_facts(c.facts, fact_lines, tokenizer, max_positions(model.config))
        facts = [fact for _, fact in fact_lines]
    texts = c.texts if c.texts is not None else next((t for t in (_calibration_text(r) for _, r, _ in runs) if t), None)
    heldout = None
    texts_digest = None
    if texts is not None:
        lines = read_lines(texts)
        texts_digest = lines.digest()
        if lines.n_heldout == 0:
            raise ConfigError(f"{texts} has {len(lines.items)} non-empty line(s), so its held-out last 10 % is empty; "
                              "perplexity needs a text of at least 10 lines")
        max_pos = text_config_of(model.config).get("max_position_embeddings")
        heldout = list(tokenise(lines, tokenizer, max_pos if isinstance(max_pos, int) and max_pos > 0 else None, None, part="heldout").sequences)
    if facts is None and heldout is None:
        raise ConfigError("nothing to measure: give --facts FACTS.jsonl and/or --texts TEXT_FILE (the clustering runs' "
                          "calibration text was not found)")
    e = model.n_experts
    variants = {"original": Variant("original", "none", False, "", None, (e, e))}
    permutes = {"both": (False, True), "on": (True,), "off": (False,)}[c.permute]
    for i, (path, run, table) in enumerate(runs):
        method = str(run.manifest["options"]["method"])
        sizes = table.groupby("layer")["cluster"].nunique()
        for p in permutes:
            key = f"{i:02d}-{method}{'-permuted' if p else ''}"
            variants[key] = Variant(key, method, p, str(Path(path).resolve()), table, (int(sizes.min()), int(sizes.max())))
    device = resolve_device(c.device)
    dtype = forward_dtype(c.dtype, device, model.config)
    # whole or layer by layer, decided now: a model that does not fit with streaming off is refused
    # before a run directory exists (the merged variants are no larger than the original)
    from moelens.runtime.forward import choose_stream, estimate
    from moelens.runtime.load import resolve_dtype

    streamed = choose_stream(c.stream, estimate(model.path, device, resolve_dtype(dtype)), device)
    check_checkpoint_finite(model)  # NaN weights named before a run directory exists (merged copies are checked when loaded)
    state = MergeCostState(model, c, tokenizer, facts, heldout, variants, device, dtype, pad_id_of(tokenizer, model.config),
                           streamed)
    options = {
        "clusters": [str(Path(p).resolve()) for p in c.clusters],
        "facts": str(Path(c.facts).resolve()) if c.facts else None, "n_facts": len(facts) if facts else 0,
        "texts": str(Path(texts).resolve()) if texts else None, "heldout_lines": len(heldout) if heldout else 0,
        # contents, not paths, decide whether a resumed run may keep its finished variants: an
        # edited facts file, text or clustering run behind the same path is refused
        "facts_sha256": facts_digest(facts) if facts else None, "texts_sha256": texts_digest,
        "clusters_sha256": [table_digest(table) for _, _, table in runs],
        "export": c.export, "permute": c.permute, "batch_tokens": c.batch_tokens, "device": str(device), "dtype": state.dtype,
        "stream": c.stream,
    }
    units = [Unit(key=k, seed=0, data={"variant": k}) for k in variants]  # seed 0: nothing random
    return state, options, units


def _measure(state: MergeCostState, lm: Any, context: UnitContext) -> tuple[float, float, int]:
    from moelens.runtime import fact_recall
    from moelens.runtime.forward import is_forward
    from moelens.runtime.perplexity import perplexity

    if is_forward(lm) and lm.streamed:
        return _measure_in_one_pass(state, lm, context)
    recall = float("nan")
    if state.facts is not None:
        recall = fact_recall(lm, state.tokenizer, state.facts, progress=context.progress).recall
    ppl, n = float("nan"), 0
    if state.heldout is not None:
        result = perplexity(lm, state.heldout, state.pad_id, state.config.batch_tokens, context.progress)
        ppl, n = result.value, result.n_predicted
    return recall, ppl, n


def _measure_in_one_pass(state: MergeCostState, forward: Any, context: UnitContext) -> tuple[float, float, int]:
    """Recall and perplexity from one streamed pass: every batch of both goes through each layer
    (read, and merged, once) before the next."""
    from moelens.runtime.forward import run_calls
    from moelens.runtime.perplexity import perplexity_calls
    from moelens.runtime.recall import fact_recall_calls

    calls: list[Any] = []
    recall_of = ppl_of = None
    if state.facts is not None:
        part, recall_of = fact_recall_calls(forward, state.tokenizer, state.facts)
        calls += part
    if state.heldout is not None:
        part, ppl_of = perplexity_calls(forward, state.heldout, state.pad_id, state.config.batch_tokens)
        calls += part
    run_calls(forward, calls, context.progress)
    recall = recall_of().recall if recall_of is not None else float("nan")
    ppl, n = float("nan"), 0
    if ppl_of is not None:
        result = ppl_of()
        ppl, n = result.value, result.n_predicted
    return recall, ppl, n


class MergeCost(Analysis):
    """One unit per variant (the original, each clustering with and without permutation)."""

    name = ANALYSIS
    unit_tables = (COST_SCHEMA,)
    derived_tables = (SUMMARY_SCHEMA,)

    def __init__(self, scratch_root: str | os.PathLike[str] | None = None):
        # merged checkpoints are written under the run directory (its .moelens-tmp), where a killed
        # run's leftovers are removed by the next run; without one, in the system's temporary folder
        self.scratch_root = None if scratch_root is None else Path(scratch_root)

    def for_workers(self) -> "MergeCost":
        """A remote worker writes its merged checkpoints into its own temporary folder: the run
        directory is the driver's alone (and may not exist on the worker's host)."""
        return MergeCost(scratch_root=None)

    def plan(self, models: Mapping[str, Any], config: MergeCostConfig) -> Plan:
        model: MoEModel = models["a"]
        state, options, units = _plan(model, config)
        methods = ", ".join(dict.fromkeys(v.method for v in state.variants.values() if v.clusters is not None))
        label = f"{model.name} · merge cost ({methods}; {config.export})"
        return Plan(options=options, units=units, label=label, state=state)

    def compute(self, plan: Plan, unit: Unit, context: UnitContext) -> dict[str, pd.DataFrame]:
        from transformers.utils import logging as hf_logging

        from moelens.merge import export_merged
        from moelens.runtime import load_causal_lm
        from moelens.safe_files import remove_tree, scratch_dir

        s: MergeCostState = plan.state
        v = s.variants[unit.data["variant"]]
        if s.streamed:
            recall, ppl, n = _measure_streamed(s, v, context)
            return {ANALYSIS: _row(s, v, recall, ppl, n)}
        scratch = None
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # an analysis prints nothing: no "Writing model shards" bar
        try:
            path: Any = s.model.path
            if v.clusters is not None:
                scratch = scratch_dir(self.scratch_root) if self.scratch_root is not None else Path(tempfile.mkdtemp(prefix="moelens-merge-"))
                path = export_merged(s.model.path, v.clusters, scratch / "merged", export=s.config.export, permute=v.permute,
                                     device=s.device, revision=s.model.revision)
            lm = load_causal_lm(path, device=s.device, dtype=s.dtype, revision=s.model.revision if v.clusters is None else None)
            recall, ppl, n = _measure(s, lm, context)
            del lm
        finally:
            if scratch is not None:
                remove_tree(scratch)
            if bars:
                hf_logging.enable_progress_bar()
        return {ANALYSIS: _row(s, v, recall, ppl, n)}

    def finish(self, plan: Plan, tables: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        return {SUMMARY_SCHEMA.name: summarise(tables[ANALYSIS])}


def _measure_streamed(s: MergeCostState, v: Variant, context: UnitContext) -> tuple[float, float, int]:
    """A variant measured layer by layer: the original's layers as read, a merged variant's merged
    on read (in the checkpoint's dtype, then cast to the forward dtype, as its exported checkpoint
    would be loaded)."""
    from moelens.merge import merge_on_load
    from moelens.runtime.forward import open_forward
    from moelens.runtime.weights import config_dtype

    forward = open_forward(s.model.path, s.device, s.dtype, stream="on", revision=s.model.revision)
    try:
        if v.clusters is not None:
            edits = merge_on_load(forward.model, s.model.path, v.clusters, export=s.config.export, permute=v.permute,
                                  device=s.device, revision=s.model.revision)
            from transformers import AutoConfig

            stored = config_dtype(AutoConfig.from_pretrained(str(s.model.path), local_files_only=True))
            forward.edit_layers(edits, dtype=stored)
        return _measure(s, forward, context)
    finally:
        forward.close()


def _row(s: MergeCostState, v: Variant, recall: float, ppl: float, n: int) -> pd.DataFrame:
    """The variant's row of ``merge_cost``."""
    row = {
        "variant": v.key, "method": v.method, "clusters_run": v.run_path, "permute": v.permute,
        "export": "none" if v.clusters is None else s.config.export, "groups_min": v.groups[0], "groups_max": v.groups[1],
        "recall": recall, "perplexity": ppl, "n_facts": len(s.facts) if s.facts else 0, "n_tokens": n,
    }
    return pd.DataFrame([row], columns=COST_SCHEMA.column_names)


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Every variant against the original: recall − recall₀ and perplexity / perplexity₀."""
    base = table[table["variant"] == "original"].iloc[0]
    out = pd.DataFrame({
        "variant": table["variant"], "method": table["method"], "permute": table["permute"].astype(bool),
        "recall": table["recall"].astype(np.float64), "recall_delta": table["recall"].astype(np.float64) - float(base["recall"]),
        "perplexity": table["perplexity"].astype(np.float64), "perplexity_ratio": table["perplexity"].astype(np.float64) / float(base["perplexity"]),
    }, columns=SUMMARY_SCHEMA.column_names)
    return out.reset_index(drop=True)


def run(models: Mapping[str, Any], config: MergeCostConfig, *, out: str | os.PathLike[str] | None = None,
        progress: ProgressCallback | None = None, executor: str | Executor | None = None) -> Run:
    """Fact recall and perplexity of ``model`` before and after merging its experts by each
    clustering run, with and without permutation alignment (``permute="both"``). ``executor``:
    ``"local"`` (default), ``"ray"`` or a :class:`~moelens.analyses.executors.RayExecutor`
    (one variant per task). ``stream``: ``auto`` runs the model layer by layer when it does not fit
    the device's memory, ``on`` always, ``off`` never (a model that does not fit is refused)."""
    return run_analysis(MergeCost(scratch_root=out), {"a": models["a"]}, config, out=out, progress=progress, executor=executor)


__all__ = ["run", "ANALYSIS", "COST_SCHEMA", "MergeCost", "MergeCostConfig", "SUMMARY_SCHEMA", "read_facts", "summarise"]
