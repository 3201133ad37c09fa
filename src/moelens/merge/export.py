"""Write a merged checkpoint that transformers loads (docs/methods.md §3, §7).

Two forms:

- ``compact``: the same family with G routed experts per layer. Expert c of layer ℓ is cluster c
  merged (:func:`moelens.merge.average.merge_layer`); router rows, and the score-correction bias
  where the family has one, are the clusters' usage-weighted means (an approximation of the
  original routing). Needs the same G in every MoE layer, G ≥ top-k, and the family's group
  constraints (n_group | G for DeepSeek-V3/GLM).
- ``shared``: E router rows kept, every member of a cluster given its cluster's merged weights:
  the form HC-SMoE and MC-SMoE evaluate. Any clustering of any subset of the MoE layers.

The model is loaded with transformers on the CPU in its stored dtype, its expert parameters are
edited in place (merges run in float64), and ``save_pretrained`` writes the published per-expert
layout, beside the source's tokenizer files and ``moelens_merge.json`` (what was merged, how).
Everything the clusters table and the options promise is checked from the checkpoint's headers
before the model is loaded or anything is written; the files appear under ``out_dir`` only once
complete.

>>> export_merged("zoo/base", clusters, "merged/base-g4")                     # compact
>>> export_merged("zoo/base", clusters, "merged/base-shared", export="shared")
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch

from moelens.choices import EXPORTS
from moelens.errors import ConfigError
from moelens.merge.average import merge_layer, merge_rows
from moelens.merge.families import (
    MergeLayout,
    check_family_config,
    compact_problems,
    get_path,
    merge_layout,
    moe_block,
    set_path,
)
from moelens.merge.table import LayerClusters, read_clusters
from moelens.safe_files import SCRATCH, check_empty_output, link_refused, remove_dead_scratch, remove_tree, scratch_dir

RECORD_NAME = "moelens_merge.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json", "vocab.txt",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


def plan_export(model_path: str | os.PathLike[str], clusters: pd.DataFrame, export: str = "compact", revision: Optional[str] = None
                ) -> tuple[Any, MergeLayout, dict[int, LayerClusters]]:
    """Check everything from headers only: (the opened checkpoint, its family layout, the
    clusters by layer). Raises :class:`~moelens.errors.ConfigError` (or an unsupported-family
    error) with one line that says what to change."""
    from moelens.checkpoint import open_model

    if export not in EXPORTS:
        raise ConfigError(f"unknown export {export!r}; expected one of {', '.join(EXPORTS)}")
    view = open_model(model_path, revision)
    layout = merge_layout(view.family)
    layers = read_clusters(clusters)
    moe = view.moe_layers
    for layer, lc in layers.items():
        if layer not in moe:
            raise ConfigError(f"layer {layer} of the clusters table is not an MoE layer of {view.name} (MoE layers: {_span(moe)})")
        n = view.layer(layer).n_experts
        if lc.n_experts != n:
            raise ConfigError(f"layer {layer} of the clusters table lists {lc.n_experts} experts where {view.name} has {n}")
    if export == "compact":
        missing = [i for i in moe if i not in layers]
        if missing:
            raise ConfigError(f"a compact export needs every MoE layer clustered; layers {_span(missing)} are not in the table. "
                              "Use --export shared to merge only some layers")
        sizes = sorted({lc.groups for lc in layers.values()})
        if len(sizes) > 1:
            raise ConfigError(f"a compact export needs the same number of groups in every layer, found {', '.join(map(str, sizes))} "
                              "(a global budget varies it); use --export shared, which keeps E experts per layer")
        problems = compact_problems(layout, view.config, sizes[0], view.top_k)
        if problems:
            raise ConfigError(f"a compact {layout.family} checkpoint with {sizes[0]} experts per layer would not route: "
                              f"{'; '.join(problems)}. Use --export shared, which keeps E experts per layer")
    return view, layout, layers


def _span(indices: list[int]) -> str:
    from moelens.ranges import compact_ranges

    return compact_ranges(list(indices))


def _merge_into(model: Any, layout: MergeLayout, lc: LayerClusters, export: str, permute: bool, device: str | torch.device) -> None:
    """Replace layer ``lc.layer``'s experts (and, compact, its router) by the merged ones."""
    block = moe_block(model, layout, lc.layer)
    experts, router = block.experts, getattr(block, layout.router)
    gate_up, down = experts.gate_up_proj.data, experts.down_proj.data   # [E, 2F, d], [E, d, F]
    f = down.shape[2]
    gate, up, dn = merge_layer(gate_up[:, :f], gate_up[:, f:], down, lc.labels, lc.frequency, lc.anchors, permute, device)
    merged_gate_up = torch.cat([gate, up], dim=1)                       # [G, 2F, d]
    if export == "shared":
        for e, c in enumerate(lc.labels.tolist()):  # every member takes its cluster's merged weights
            gate_up[e].copy_(merged_gate_up[c])
            down[e].copy_(dn[c])
        return
    g = lc.groups
    experts.gate_up_proj = torch.nn.Parameter(merged_gate_up, requires_grad=False)
    experts.down_proj = torch.nn.Parameter(dn, requires_grad=False)
    router.weight = torch.nn.Parameter(merge_rows(router.weight.data, lc.labels, lc.frequency), requires_grad=False)
    if layout.score_bias is not None:
        set_path(block, layout.score_bias, merge_rows(get_path(block, layout.score_bias).data, lc.labels, lc.frequency))
    for module in (block, experts, router):  # keep the modules' own counts in step with their tensors
        for name in ("num_experts", "n_routed_experts", "num_local_experts"):
            if isinstance(getattr(module, name, None), int):
                setattr(module, name, g)


def merge_on_load(model: Any, model_path: str | os.PathLike[str], clusters: pd.DataFrame, export: str = "compact",
                  permute: bool = True, device: str | torch.device = "cpu", revision: Optional[str] = None) -> dict[int, Any]:
    """Per clustered layer, the edit that merges its experts into a layer-streamed ``model`` (a
    :class:`~moelens.runtime.stream.StreamedForward`'s weightless model) each time the layer's
    weights are loaded: the same :func:`_merge_into` that :func:`export_merged` applies to the whole
    model, so with the weights loaded in the checkpoint's own dtype (as the export loads them) and
    cast to the forward dtype after, the layer equals that of the exported checkpoint loaded again.
    Nothing is written. A compact merge changes module counts (and a score-correction buffer) that
    outlive the weights; each edit returns what puts them back, so the next load starts from the
    checkpoint's layer again."""
    _, layout, layers = plan_export(model_path, clusters, export, revision)
    check_family_config(layout, model.config)

    def edit(lc: LayerClusters) -> Any:
        def apply(layer_module: Any) -> Any:
            block = moe_block(model, layout, lc.layer)
            experts, router = block.experts, getattr(block, layout.router)
            counts = [(m, n, getattr(m, n)) for m in (block, experts, router)
                      for n in ("num_experts", "n_routed_experts", "num_local_experts") if isinstance(getattr(m, n, None), int)]
            bias = None
            if layout.score_bias is not None:
                value = get_path(block, layout.score_bias)
                bias = value if not isinstance(value, torch.nn.Parameter) else None  # a buffer stays after the weights go
            with torch.no_grad():
                _merge_into(model, layout, lc, export, permute, device)

            def undo() -> None:
                for m, n, v in counts:
                    setattr(m, n, v)
                if bias is not None:
                    set_path(block, layout.score_bias, bias)
            return undo
        return apply

    return {layer: edit(lc) for layer, lc in layers.items()}


def _check_compact_structure(model: Any) -> None:
    """The edited model must have exactly the parameters and shapes that its new config gives a
    freshly built model (a meta-device build, no memory): otherwise the checkpoint would not load."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(model.config)
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if diff:
        k = diff[0]
        raise RuntimeError(f"merged model does not match its config at {k}: {have.get(k)} vs {want.get(k)} ({len(diff)} tensors differ)")


def _copy_tokenizer(source: Path, out: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and not (out / name).exists():
            shutil.copy2(source / name, out / name)
            copied.append(name)
    return copied


def export_merged(
    model_path: str | os.PathLike[str], clusters: pd.DataFrame, out_dir: str | os.PathLike[str], export: str = "compact",
    permute: bool = True, device: str | torch.device = "cpu", revision: Optional[str] = None,
) -> Path:
    """Merge the experts of ``model_path`` by the ``clusters`` table (columns ``layer, expert,
    cluster, dominant, frequency``) and write the checkpoint to ``out_dir`` (new or empty);
    returns ``out_dir``. ``permute`` aligns every member onto its cluster's anchor before
    averaging; ``device`` runs the permutation costs there (CPU otherwise)."""
    from moelens.locks import DirectoryLock

    out = Path(out_dir)
    _check_out(out)
    view, layout, layers = plan_export(model_path, clusters, export, revision)  # every check before the first write
    created = not out.exists()
    try:
        # one writer per --out: a second merge into the same directory is refused while this one runs
        with DirectoryLock(out):
            _check_out(out)  # another merge may have finished there while this one was checking
            remove_dead_scratch(out)
            try:
                _export(view, layout, layers, out, export, permute, device)
            finally:
                _remove_if_empty(out / SCRATCH)
    except BaseException:
        if created:
            _remove_if_empty(out)  # the folder the lock made, if nothing was written into it
        raise
    return out


def _check_out(out: Path) -> None:
    """``out`` must be missing or empty (a lock file and scratch aside): a checkpoint is never
    mixed with, nor written over, files that are already there."""
    check_empty_output(out, kept=(SCRATCH,))
    if (out / SCRATCH).is_symlink():
        raise link_refused(out / SCRATCH)


def _remove_if_empty(path: Path) -> None:
    """Remove the folder this export made, once nothing is left in it (rmdir refuses otherwise)."""
    try:
        path.rmdir()
    except OSError:
        pass


def _export(view: Any, layout: MergeLayout, layers: dict[int, LayerClusters], out: Path, export: str, permute: bool,
            device: str | torch.device) -> None:
    """Merge and write the checkpoint into ``out`` (locked, checked empty)."""
    from moelens.runtime import load_causal_lm

    model = load_causal_lm(view.path, device="cpu", dtype=None)
    check_family_config(layout, model.config)
    with torch.no_grad():
        for lc in layers.values():
            _merge_into(model, layout, lc, export, permute, device)
    if export == "compact":
        setattr(model.config, layout.experts_key, next(iter(layers.values())).groups)
        _check_compact_structure(model)

    # Written into a scratch folder under out_dir (out/.moelens-tmp/<pid>-*) and moved into place
    # once complete: an interrupted export leaves no half checkpoint, and a killed one leaves
    # only scratch that the next export into out_dir removes.
    staging = scratch_dir(out)
    try:
        model.save_pretrained(staging)
        tokenizer = _copy_tokenizer(view.path, staging)
        record = {
            "source": str(view.source), "family": layout.family, "export": export, "permute": bool(permute),
            "layers": {str(k): {"experts": v.n_experts, "groups": v.groups,
                                "anchors": sorted({int(a) for a in np.unique(v.anchors)})} for k, v in layers.items()},
            "tokenizer_files": tokenizer,
        }
        (staging / RECORD_NAME).write_text(json.dumps(record, indent=2))
        # out is checked empty and locked: the record is moved last, so a checkpoint whose
        # moelens_merge.json is in place is complete
        for entry in sorted(staging.iterdir(), key=lambda e: e.name == RECORD_NAME):
            entry.rename(out / entry.name)
    finally:
        remove_tree(staging)
