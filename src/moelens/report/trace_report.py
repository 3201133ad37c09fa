"""The interventions ("trace") section of a report (docs/methods.md §4, seed 003): explanations, then per
run its setup, a one-line reading in numbers, the sites × layers heat map, for restore runs
ROME's indirect-effect figure, and the summary table behind each figure (mean ± std, n)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from markupsafe import Markup

from moelens.ranges import compact_ranges
from moelens.report.cells import Cell, Table, settings_table
from moelens.report.embed import EmbeddedFigure, embed
from moelens.report.section import Section, footer_items, run_warnings
from moelens.results import Run

MODE_NAMES = {
    "knockout": "knockout: a site replaced at one layer at a time",
    "restore": "restore (ROME causal tracing): subject embeddings corrupted, one clean state restored",
    "block": "attention knockout (Geva et al. 2023): the last position kept from attending to some positions",
}
ABLATION_NAMES = {"mean": "mean of the site over the prompt set", "zero": "zero"}
#: Decimals of a table cell: JSD in bits and probabilities alike.
DIGITS = 3


@dataclass
class TraceRun:
    number: int
    id: str
    label: str
    mode: str
    setup: Table
    headline: str
    heatmap: EmbeddedFigure
    indirect: Optional[EmbeddedFigure]
    table: Table
    more_tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def setup_table(run: Run) -> Table:
    """What was traced: model, mode, sites, ablation, layers, window, noise, prompts, seed."""
    from moelens.figures.trace import n_prompts, resolve_mode, window_of, window_span

    m, o = run.manifest, run.manifest.get("options") or {}
    model = m.get("model") or {}
    mode = resolve_mode(run, None, "the report")
    prompts = n_prompts(run)
    items = [
        ("model", model.get("name", "")), ("family", model.get("family", "")), ("source", model.get("source", "")),
        ("mode", MODE_NAMES.get(mode, mode)),
        ("sites", ", ".join(str(s) for s in o.get("sites") or [])),
    ]
    if mode == "knockout":
        items.append(("ablation", ABLATION_NAMES.get(str(o.get("ablation")), o.get("ablation", ""))))
    if mode in ("restore", "block"):
        window = window_of(run, mode)
        span = "the restored layer only for restore_hidden; " if mode == "restore" else ""
        items.append(("window", f"{span}{window} layers centred on ℓ: {window_span(window)}, clipped to the model"))
    if mode == "restore":
        samples = o.get("noise_samples", 10)
        items.append(("noise", f"Gaussian, std 3 × the embedding matrix's std, {samples} samples per prompt (seed + prompt_id)"))
    items += [
        ("layers", compact_ranges(o.get("layers") or sorted(set(run["interventions_summary"]["layer"])))),
        ("prompts", f"{prompts}" + (f" from {o['prompts']}" if o.get("prompts") else "")),
        ("seed", m.get("seed", o.get("seed", ""))), ("dtype", o.get("dtype", "")), ("device", o.get("device", "")),
        *footer_items(run),
    ]
    return settings_table(items, skip_empty=True)


def mean_std(mean: float, std: float) -> Cell:
    """``mean ± std`` with :data:`DIGITS` decimals; empty where the cell does not exist."""
    if not math.isfinite(mean):
        return Cell("", "num empty", "no such cell in this layer")
    spread = f" ± {std:.{DIGITS}f}" if math.isfinite(std) else ""
    return Cell(f"{mean:.{DIGITS}f}{spread}".replace("-", "−"))


def _counts(n: Sequence[int]) -> Cell:
    counts = sorted({int(c) for c in n if c > 0})
    if not counts:
        return Cell("", "num empty")
    return Cell(str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}")


def grid_table(grid, row_names: Sequence[str], caption: str, over: str = "prompts") -> Table:
    """A TraceGrid as a table: a row per layer, a column per grid row (site or token kind), each
    cell mean ± std, and n (the number of rows behind each mean: prompts, or prompt tokens)."""
    table = Table(headers=["layer", *row_names, "n"], caption=caption)
    for layer in grid.layers:
        cells = [Cell(str(layer))]
        cells += [mean_std(float(grid.mean.at[row, layer]), float(grid.std.at[row, layer])) for row in grid.rows]
        cells.append(_counts(grid.n[layer].tolist()))
        table.rows.append(cells)
    table.note = f"std over {over} with ddof 0, n = number of {over}; an empty cell is a site the layer lacks (not traced)."
    return table


def _peak(grid) -> tuple[str, int, float]:
    values = grid.mean.to_numpy(float)
    if not np.isfinite(values).any():
        return "", -1, math.nan
    i, j = np.unravel_index(np.nanargmax(values), values.shape)
    return grid.rows[i], grid.layers[j], float(values[i, j])


#: How a headline names each mode.
HEADLINE_MODES = {"knockout": "mean knockout", "block": "attention knockout", "restore": "causal tracing"}
#: What a headline says was done at each site ("… matters most at layer ℓ").
SITE_ACTIONS = {
    "subj": "knocking out the subject's hidden state", "attn": "knocking out the attention output at the last token",
    "last": "knocking out the last token's hidden state", "router": "knocking out the router logits at the last token",
    "moe": "knocking out the MoE output at the last token",
    "block_subj": "blocking subject → last attention", "block_nonsubj": "blocking non-subject → last attention",
    "block_last": "blocking the last token's attention to itself",
    "restore_hidden": "restoring the hidden state", "restore_mlp": "restoring the MLP output", "restore_attn": "restoring the attention output",
}
#: Rows left out of a headline's maximum: knocking out the last token's residual replaces the very
#: state the prediction is read from, so its JSD is near its maximum at every layer by construction.
TRIVIAL_ROWS = {"knockout": ("last",)}


def _mode_words(run: Run, mode: str) -> str:
    """The mode as a headline opens: ``attention knockout (window 3)``, ``mean knockout``."""
    from moelens.figures.trace import window_of

    words = HEADLINE_MODES.get(mode, mode)
    if mode == "knockout":
        ablation = (run.manifest.get("options") or {}).get("ablation")
        return "zero knockout" if ablation == "zero" else words
    window = window_of(run, mode)
    return f"{words} (window {window})" if window else words


def _action(run: Run, site: str) -> str:
    from moelens.figures.trace import is_moe

    action = SITE_ACTIONS.get(site, f"intervening on {site}")
    return action.replace("MLP output", "MoE output") if site == "restore_mlp" and is_moe(run) else action


def headline(run: Run) -> str:
    """One line in numbers naming the mode (and its window) and the site whose intervention matters
    most, e.g. "attention knockout (window 3): blocking subject → last attention matters most at
    layer 2 (0.41 bits)". Attention-knockout rows (block_*, the seed figure's reading,
    docs/methods.md §4) are preferred when the run has them; a row that is maximal by construction
    (last-token knockout) is not headlined."""
    from moelens.figures.trace import TOKEN_KIND_LABELS, resolve_mode, run_modes, token_kind_grids, trace_grid

    modes = run_modes(run)
    mode = "block" if "block" in modes else resolve_mode(run, None, "the report")
    opening = _mode_words(run, mode)
    if mode == "restore":
        best = ("", -1, -math.inf, "")
        for grid in token_kind_grids(run):
            kind, layer, value = _peak(grid)
            if math.isfinite(value) and value > best[2]:
                best = (grid.site, layer, value, kind)
        site, layer, value, kind = best
        if not site:
            return f"{opening}: no finite indirect effect"
        return (f"{opening}: {_action(run, site)} ({site}) at the {TOKEN_KIND_LABELS.get(kind, kind).lower()} recovers most "
                f"at layer {layer} (Δp(target) = {value:.2f})")
    grid = trace_grid(run, mode=mode)
    left_out = [r for r in grid.rows if r in TRIVIAL_ROWS.get(mode, ())]
    kept = [i for i, r in enumerate(grid.rows) if r not in left_out] or list(range(len(grid.rows)))
    values = grid.mean.to_numpy(float)[kept]
    if not np.isfinite(values).any():
        return f"{opening}: no finite JSD"
    i, j = np.unravel_index(np.nanargmax(values), values.shape)
    site = grid.rows[kept[i]]
    line = f"{opening}: {_action(run, site)} ({site}) matters most at layer {grid.layers[j]} ({float(values[i, j]):.2f} bits)"
    if left_out and len(kept) < len(grid.rows):
        line += "; last-token knockout left out (near its maximum at every layer by construction)"
    return line


def _run_part(run: Run, number: int, fmt: str) -> TraceRun:
    from moelens.figures import trace as figs

    grid = figs.trace_grid(run)
    anchor = f"trace-run-{number}"
    names = [f"{figs.site_label(run, s)} ({s})" for s in grid.rows]
    kind = figs.TOKEN_KIND_LABELS.get(grid.token_kind, "").lower()
    at = f" at the {kind}" if kind else ""
    # each mode's heat map under its own name: the seed's (trace_heatmap) is attention knockout
    name = figs.HEATMAP_FIGURES.get(grid.mode, "trace_heatmap")
    what = {"block": "Attention knockout (seed 003)", "knockout": "Knockout", "restore": "Restoration"}.get(grid.mode, "Interventions")
    heatmap = embed(figs.trace_heatmap(run), name, f"{anchor}-{name.replace('_', '-')}", f"{what}: mean JS divergence per site and layer{at}",
                    f"Sites × layers, colour = mean JSD (bits) over prompts, darker = larger, {run.label}", fmt, run=run)
    table = grid_table(grid, names, f"JS divergence (bits) per layer and site{at}: mean ± std over prompts")
    more = [grid_table(figs.trace_grid(run, measure="p_target", token_kind=grid.token_kind or None), names,
                       f"p(target) after the intervention{at}: mean ± std over prompts")]
    indirect = None
    if grid.mode == "restore":
        indirect = embed(figs.trace_indirect_effect(run), "trace_indirect_effect", f"{anchor}-indirect-effect",
                         "Indirect effect per token group and layer",
                         f"Restored hidden state, MLP and attention output: mean Δp(target) per token group and layer, {run.label}", fmt, run=run)
        for kinds in figs.token_kind_grids(run):
            more.append(grid_table(kinds, [figs.TOKEN_KIND_LABELS.get(k, k) for k in kinds.rows],
                                   f"Indirect effect Δp(target) of {kinds.site} per layer and token group: mean ± std",
                                   over="prompt tokens of the group"))
    return TraceRun(number=number, id=anchor, label=run.label, mode=grid.mode, setup=setup_table(run), headline=headline(run),
                    heatmap=heatmap, indirect=indirect, table=table, more_tables=more,
                    notes=[str(n) for n in run.manifest.get("notes") or []], warnings=run_warnings(run.manifest))


def trace_section(runs: Sequence[Run], fmt: str) -> Section:
    """The report section of interventions runs (one part per run, in the order given)."""
    from moelens.report.render import render

    parts = [_run_part(run, i, fmt) for i, run in enumerate(runs, start=1)]
    html = render("trace_section.html", runs=parts)
    toc = [("trace-explanations", "Plot explanations")] + [(p.id, f"Run {p.number}: {p.label}") for p in parts]
    summary = "; ".join(f"{p.label}: {p.headline}" for p in parts)
    return Section("interventions", "Layer-wise interventions", Markup(html), toc, summary)


__all__ = ["grid_table", "headline", "setup_table", "trace_section"]
