"""Fake interventions ("trace") runs with the shape of real ones (plain numpy, seeded).

Figures and the report section are built and tested against these, beside runs of real (tiny)
checkpoints. The tables and the manifest are those ``moelens.trace`` writes (docs/methods.md §4 and §7
"Interventions"):

``interventions`` (one row per prompt × cell; restore: also per token position)
    prompt_id, layer, site, mode, position, token_kind, jsd, target_id, p_target_clean,
    p_target, p_target_corrupt, indirect_effect
``interventions_summary`` (derived: one row per layer, site, mode, token_kind and measure)
    mean, std (ddof 0) and n over the rows of that cell, for ``jsd``, ``p_target`` and, for
    restore, ``indirect_effect``

The values follow the published pictures: knockout like seed 003 (the subject's hidden state
matters most early, attention in the middle layers, the last token late), restore like ROME's
causal traces (the last subject token early to middle, the MLP there in the middle layers,
attention at the last token late), block like Geva et al. (blocking the subject hurts in the
middle layers). Each prompt adds its own noise, so means, stds and counts are all non-trivial.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd

from moelens.analyses.interventions.analysis import SUMMARY_SCHEMA, TABLE_SCHEMA
from moelens.choices import DEFAULT_WINDOW, DENSE_KNOCKOUT_SITES, MODES, NOISE_SAMPLES, SITES, TOKEN_KINDS
from moelens.ranges import compact_ranges
from moelens.results import Run
from moelens.results.manifest import SCHEMA_VERSION
from moelens.results.schema import schemas_to_json

ANALYSIS = "interventions"
#: The analysis's own tables: the synthetic run is written as the analysis writes one.
INTERVENTIONS_SCHEMA = TABLE_SCHEMA


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _bump(x: float, centre: float, width: float) -> float:
    return math.exp(-(((x - centre) / width) ** 2))


def knockout_curve(site: str, x: float) -> float:
    """Mean JSD (bits) of a knockout at relative depth ``x`` ∈ [0, 1], after seed 003."""
    return {
        "subj": 0.58 - 0.36 * x,
        "attn": 0.16 + 0.24 * _sigmoid((x - 0.2) * 12) - 0.12 * max(0.0, x - 0.65),
        "last": 0.10 + 0.18 * _sigmoid((x - 0.3) * 9),
        "router": 0.04 + 0.10 * x,
        "moe": 0.18 + 0.12 * math.sin(math.pi * x),
    }[site]


def block_curve(site: str, x: float) -> float:
    """Mean JSD (bits) of an attention knockout centred at relative depth ``x``, after Geva et al."""
    return {
        "block_subj": 0.05 + 0.40 * _bump(x, 0.45, 0.2),
        "block_nonsubj": 0.05 + 0.25 * _bump(x, 0.2, 0.2),
        "block_last": 0.03 + 0.05 * x,
    }[site]


def restore_share(site: str, kind: str, x: float) -> float:
    """The share of the clean-minus-corrupt target probability a restore brings back, after ROME."""
    if site == "restore_hidden":
        if kind == "last_subject":
            return 0.85 * (1.0 - _sigmoid((x - 0.55) * 10))
        if kind == "last":
            return 0.9 * _sigmoid((x - 0.5) * 10)
        return (0.15 if kind.endswith("_subject") else 0.03) * (1.0 - x)
    if site == "restore_mlp":
        return 0.6 * _bump(x, 0.3, 0.15) if kind == "last_subject" else 0.04 * _bump(x, 0.3, 0.3)
    if site == "restore_attn":
        return 0.5 * _sigmoid((x - 0.6) * 10) if kind == "last" else 0.03
    raise ValueError(f"no restore site {site!r}")


def token_kinds(n_before: int, n_subject: int, n_after: int) -> list[str]:
    """ROME's token group of every position of a prompt: the last token is ``last`` even when it is
    also the first after the subject; a one-token subject is ``last_subject``."""
    if n_subject < 1 or n_after < 1:
        raise ValueError("a prompt has at least one subject token and one token after it")
    subject = ["last_subject"] if n_subject == 1 else ["first_subject"] + ["middle_subject"] * (n_subject - 2) + ["last_subject"]
    after = ["last"] if n_after == 1 else ["first_after"] + ["further"] * (n_after - 2) + ["last"]
    return ["before_subject"] * n_before + subject + after


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """The derived summary: per (layer, site, mode, token_kind) and measure, the mean, the std
    (ddof 0) and the number of rows with a value (NaN rows do not count)."""
    keys = ["layer", "site", "mode", "token_kind"]
    measures = ["jsd", "p_target"] + (["indirect_effect"] if (table["mode"] == "restore").any() else [])
    parts = []
    for measure in measures:
        grouped = table.groupby(keys, sort=True)[measure]
        part = pd.DataFrame({"mean": grouped.mean(), "std": grouped.std(ddof=0), "n": grouped.count()}).reset_index()
        part = part[part["n"] > 0]
        parts.append(part.assign(measure=measure))
    out = pd.concat(parts, ignore_index=True)
    out["n"] = out["n"].astype(np.int64)
    return SUMMARY_SCHEMA.check(out.sort_values(keys + ["measure"], kind="stable").reset_index(drop=True), "synthetic summary")


def _rows(mode: str, layers: Sequence[int], sites: Sequence[str], n_prompts: int, missing: set[tuple[int, str]],
          rng: np.random.Generator) -> pd.DataFrame:
    span = max(max(layers), 1)
    columns: dict[str, list] = {name: [] for name in INTERVENTIONS_SCHEMA.column_names}

    def add(prompt: int, layer: int, site: str, position: int, kind: str, jsd: float, target: int, clean: float,
            after: float, corrupt: float = math.nan) -> None:
        values = (prompt, layer, site, mode, position, kind, jsd, target, clean, after, corrupt,
                  after - corrupt if mode == "restore" else math.nan)
        for name, value in zip(INTERVENTIONS_SCHEMA.column_names, values):
            columns[name].append(value)

    for prompt in range(n_prompts):
        target = int(rng.integers(0, 50_000))
        clean = float(rng.uniform(0.2, 0.9))
        scale = float(rng.lognormal(0.0, 0.25))  # some prompts are more fragile than others
        if mode == "restore":
            kinds = token_kinds(int(rng.integers(0, 3)), int(rng.integers(1, 5)), int(rng.integers(1, 5)))
            corrupt = clean * float(rng.uniform(0.02, 0.2))
        for layer in layers:
            x = layer / span
            for site in sites:
                if (layer, site) in missing:
                    continue  # a layer without that module (a Mamba layer has no attention)
                if mode == "restore":
                    for position, kind in enumerate(kinds):
                        share = float(np.clip(restore_share(site, kind, x) * scale + rng.normal(0.0, 0.03), 0.0, 1.0))
                        after = float(np.clip(corrupt + share * (clean - corrupt) + rng.normal(0.0, 0.01), 0.0, 1.0))
                        jsd = float(np.clip(0.55 * (1.0 - share) + rng.normal(0.0, 0.03), 0.0, 1.0))
                        add(prompt, layer, site, position, kind, jsd, target, clean, after, corrupt)
                else:
                    curve = knockout_curve(site, x) if mode == "knockout" else block_curve(site, x)
                    jsd = float(np.clip(curve * scale + rng.normal(0.0, 0.05), 0.0, 1.0))
                    add(prompt, layer, site, -1, "", jsd, target, clean, clean * (1.0 - jsd) ** 2)
    table = pd.DataFrame(columns)
    for name, kind in INTERVENTIONS_SCHEMA.columns:
        if kind == "int":
            table[name] = table[name].astype(np.int64)
    return table


def synthetic_trace_run(
    mode: str = "knockout",
    layers: Iterable[int] = range(8),
    sites: Optional[Sequence[str]] = None,
    n_prompts: int = 12,
    moe: bool = True,
    ablation: str = "mean",
    window: Optional[int] = None,
    missing: Iterable[tuple[int, str]] = (),
    model_name: str = "synthetic-olmoe",
    label: Optional[str] = None,
    seed: int = 0,
    created: Optional[str] = None,
) -> Run:
    """One fake interventions run (not saved; call ``.save(dir)`` or use :func:`write_synthetic_trace_run`).

    ``sites`` default to the mode's (knockout: subj, attn, last, and router, moe when ``moe``);
    ``missing`` lists (layer, site) cells the model lacks, which get no rows and are named in the
    manifest's notes; ``window`` defaults to the mode's (restore 10, block 9; none for knockout).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    layer_list = sorted({int(layer) for layer in layers})
    if not layer_list or n_prompts < 1:
        raise ValueError("a run needs at least one layer and one prompt")
    if sites is None:
        sites = SITES[mode] if (mode != "knockout" or moe) else DENSE_KNOCKOUT_SITES
    unknown = [s for s in sites if s not in SITES[mode]]
    if unknown:
        raise ValueError(f"sites {unknown} are not {mode} sites; {mode} has {SITES[mode]}")
    window = (None if mode == "knockout" else DEFAULT_WINDOW[mode]) if window is None else int(window)
    missing_cells = {(int(layer), str(site)) for layer, site in missing}
    rng = np.random.default_rng(seed)
    table = _rows(mode, layer_list, list(sites), n_prompts, missing_cells, rng)
    summary = summarise(table)
    options = {
        "mode": mode, "sites": list(sites), "ablation": ablation, "layers": layer_list, "window": window,
        "noise_samples": NOISE_SAMPLES, "seed": seed, "dtype": "float32", "device": "cpu",
        "prompts": f"synthetic/{model_name}-facts.jsonl", "batch_size": 16,
    }
    model = {
        "source": f"synthetic/{model_name}", "name": model_name, "path": f"synthetic/{model_name}",
        "family": "olmoe" if moe else "llama", "n_layers": layer_list[-1] + 1, "n_experts": 8 if moe else 0,
        "top_k": 2 if moe else 0, "hidden_size": 64, "expert_ffn": 128 if moe else 0, "files": {},
    }
    units = [f"P{start:05d}" for start in range(0, n_prompts, 16)]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "analysis": ANALYSIS,
        "label": label or f"{model_name} {mode} L{compact_ranges(layer_list)}",
        "status": "complete",
        "completed_units": units,
        "units": units,
        "created": created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": {"a": model},
        "options": options,
        "seed": seed,
        "versions": {"moelens": "synthetic"},
        "timings": {"total_s": 0.0, "per_unit_s": {u: 0.0 for u in units}},
        "tables": schemas_to_json({s.name: s for s in (INTERVENTIONS_SCHEMA, SUMMARY_SCHEMA)}),
        "warnings": {},
    }
    if missing_cells:
        manifest["notes"] = [f"layer {layer} has no {site} module: its {site} cells were skipped" for layer, site in sorted(missing_cells)]
    return Run(manifest=manifest, tables={"interventions": table, "interventions_summary": summary})


def write_synthetic_trace_run(path: str | Path, **options: object) -> Path:
    """Write :func:`synthetic_trace_run` (``options`` are its keywords) as a run directory that
    ``moelens.load_run`` reads; returns the directory."""
    return synthetic_trace_run(**options).save(path)  # type: ignore[arg-type]


__all__ = ["DEFAULT_WINDOW", "INTERVENTIONS_SCHEMA", "MODES", "SITES", "SUMMARY_SCHEMA", "TOKEN_KINDS", "summarise",
           "synthetic_trace_run", "token_kinds", "write_synthetic_trace_run"]
