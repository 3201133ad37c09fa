"""Figures of the interventions ("trace") analysis (docs/methods.md §4 and §7; the heat map of seed 003).

:func:`trace_heatmap` draws one run as sites × layers, the seed's layout: a row per intervention
site, a column per layer, colour = the mean over prompts of the JS divergence JSD(p_clean,
p_intervened) in bits, darker where larger. Seed 003 is attention knockout (``--mode block``,
docs/methods.md §4): rows Subj. = ``block_subj``, Attn. = ``block_nonsubj``, Last. = ``block_last``.
:func:`trace_knockout` draws a knockout run the same way (rows Subj., Attn., Last. and, for MoE
models, Router, MoE: the sites themselves replaced), :func:`trace_restore` the restored sites of a
restore run at one token group; the report files each under its own name (:data:`HEATMAP_FIGURES`).

:func:`trace_indirect_effect` draws a restore run as ROME does (Meng et al. 2022, Fig. 1): one
panel per restored site (the hidden state at one layer, the MLP/MoE output and the attention
output over a window of layers), rows = ROME's token groups, colour = the mean indirect effect
IE = p_restored(target) − p_corrupt(target).

Both read the run's derived ``interventions_summary`` table (mean, std with ddof 0, and n per
layer, site, mode, token kind and measure) and draw its means unchanged: the image's array is the
table's ``mean`` column laid out as a grid. A cell a layer lacks (a Mamba layer has no attention
module, so no ``attn`` cell) is grey.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Optional, Sequence

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.image import AxesImage
from matplotlib.patches import Patch

from moelens.choices import DEFAULT_WINDOW, MODES, SITES, TOKEN_KINDS
from moelens.errors import ConfigError
from moelens.figures.checks import checked_run, checked_table
from moelens.figures.modules import cell_format
from moelens.figures.style import cell_font_size, label_colour_bar_ends, new_figure, styled
from moelens.results import Run

ANALYSIS = "interventions"
TABLE = "interventions"
SUMMARY = "interventions_summary"
SUMMARY_COLUMNS = ("layer", "site", "mode", "token_kind", "measure", "mean", "std", "n")

#: Sites in the order they are drawn (seed 003: Subj., Attn., Last.), per mode.
SITE_LABELS = {
    "subj": "Subj.", "attn": "Attn.", "last": "Last.", "router": "Router", "moe": "MoE",
    # seed 003 is attention knockout (docs/methods.md §4): Subj. = block_subj, Attn. = block_nonsubj, Last. = block_last
    "block_subj": "Subj.", "block_nonsubj": "Attn.", "block_last": "Last.",
    "restore_hidden": "Hidden", "restore_mlp": "MLP", "restore_attn": "Attn.",
}
#: ROME's token groups in ROME's order, with the names its figures give them.
TOKEN_KIND_LABELS = dict(zip(TOKEN_KINDS, ("Before subject", "First subject token", "Middle subject tokens", "Last subject token",
                                             "First subsequent token", "Further tokens", "Last token")))
#: Where causal traces peak (ROME): the default token group of a restore run's heat map.
DEFAULT_TOKEN_KIND = "last_subject"
MEASURES = {
    "jsd": "Avg JS Divergence (bits)",
    "p_target": "Avg p(target)",
    "indirect_effect": "Avg indirect effect (Δ p(target))",
}
#: ROME's colours: the hidden state purple, the MLP green, attention red.
RESTORE_CMAPS = {"restore_hidden": "Purples", "restore_mlp": "Greens", "restore_attn": "Reds"}
HEATMAP_CMAP = "Blues"  # seed 003: darker = larger divergence
ABSENT_GREY = "#d9d9d9"

#: Inches per layer column (wide enough for a cell's number) and the plot's width limits.
COLUMN_INCHES = 0.34
MIN_COLUMN_INCHES = 0.1
PLOT_WIDTH = (3.2, 8.0)
#: Above this many layers every other layer is labelled at most (seed 003: 0, 2, …, 30).
EVERY_LAYER_UP_TO = 16
#: Cells carry their value up to this many layers, where it fits (:func:`moelens.figures.style.cell_font_size`).
ANNOTATE_MAX_LAYERS = 24


# ---------------------------------------------------------------------------------------------
# The numbers


@dataclass(frozen=True)
class TraceGrid:
    """One measure of one run as rows × layers: ``mean``, ``std`` and ``n`` from the summary table
    (NaN / 0 where a layer has no such cell), rows = sites (or token kinds) in drawing order,
    columns = the run's layers ascending. ``token_kind`` is the token group of a restore run's
    site grid ("" otherwise); ``site`` the restored site of a token-kind grid ("" otherwise)."""

    run: Run
    mode: str
    measure: str
    mean: pd.DataFrame
    std: pd.DataFrame
    n: pd.DataFrame
    token_kind: str = ""
    site: str = ""

    @property
    def layers(self) -> list[int]:
        return [int(layer) for layer in self.mean.columns]

    @property
    def rows(self) -> list[str]:
        return [str(row) for row in self.mean.index]


def _check_run(run: object, figure: str) -> Run:
    return checked_run(run, figure, ANALYSIS, "moelens trace")


def summary_table(run: Run) -> pd.DataFrame:
    """The run's ``interventions_summary``, checked to hold the columns the figures read."""
    return checked_table(run, SUMMARY, SUMMARY_COLUMNS, "run moelens trace again on its directory", "run moelens trace again",
                         "no cell was traced")


def run_modes(run: Run) -> list[str]:
    """The modes a run holds rows of, in the order knockout, restore, block."""
    present = set(summary_table(run)["mode"].astype(str))
    return [m for m in MODES if m in present] + sorted(present - set(MODES))


def resolve_mode(run: Run, mode: Optional[str], figure: str) -> str:
    """``mode`` checked against the run, or the run's own mode when None."""
    present = run_modes(run)
    if mode is not None:
        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode not in present:
            raise ConfigError(f"run {run.label!r} is a {' and '.join(present)} run with no {mode} rows; draw {figure} "
                              f"without mode, or trace with --mode {mode}")
        return mode
    if len(present) == 1:
        return present[0]
    declared = (run.manifest.get("options") or {}).get("mode")
    if declared in present:
        return str(declared)
    raise ConfigError(f"run {run.label!r} holds rows of modes {', '.join(present)}; choose one with mode=")


def is_moe(run: Run) -> bool:
    """Whether the traced model routes to experts (its MLP block is an MoE block)."""
    return bool(run.model.get("n_experts")) or bool(set(summary_table(run)["site"]) & {"router", "moe"})


def site_label(run: Run, site: str) -> str:
    if site == "restore_mlp" and is_moe(run):
        return "MoE"
    return SITE_LABELS.get(site, site)


def window_of(run: Run, mode: str) -> Optional[int]:
    """The run's window (manifest options), or the mode's default (docs/methods.md §7: w layers
    centred on ℓ); None for knockout, which intervenes at one layer."""
    window = (run.manifest.get("options") or {}).get("window")
    if window is None:
        return None if mode == "knockout" else DEFAULT_WINDOW.get(mode)
    return int(window)


def window_span(window: int) -> str:
    """docs/methods.md §7: a window of w layers centred on ℓ is [ℓ − ⌊w/2⌋, ℓ − ⌊w/2⌋ + w − 1]."""
    low, high = -(window // 2), -(window // 2) + window - 1

    def at(offset: int) -> str:
        return "ℓ" if offset == 0 else f"ℓ{'+' if offset > 0 else '−'}{abs(offset)}"

    return at(low) if window == 1 else f"{at(low)} … {at(high)}"


def n_prompts(run: Run) -> int:
    """How many prompts the run traced (distinct prompt ids; the summary's largest n without the table)."""
    table = run.tables.get(TABLE)
    if table is not None and "prompt_id" in table.columns and not table.empty:
        return int(table["prompt_id"].nunique())
    summary = summary_table(run)
    # one row per prompt: a knockout or block cell, or a restore cell at the last token
    plain = summary[summary["token_kind"].astype(str).isin(("", "last"))]
    return int(plain["n"].max()) if len(plain) else 0


def _ordered(values: Sequence[str], order: Sequence[str]) -> list[str]:
    present = list(dict.fromkeys(str(v) for v in values))
    return [v for v in order if v in present] + sorted(set(present) - set(order))


def _measure_rows(run: Run, mode: str, measure: str) -> pd.DataFrame:
    summary = summary_table(run)
    rows = summary[summary["mode"].astype(str) == mode]
    measures = _ordered(rows["measure"], tuple(MEASURES))
    if measure not in measures:
        only = " (indirect_effect exists for restore runs only)" if measure == "indirect_effect" else ""
        raise ConfigError(f"run {run.label!r} has no {measure!r} rows for {mode}{only}; it has {', '.join(measures)}")
    return rows[rows["measure"] == measure]


def _grid(run: Run, rows: pd.DataFrame, index: str, order: Sequence[str], layers: list[int], what: str) -> tuple[pd.DataFrame, ...]:
    duplicated = rows.duplicated([index, "layer"])
    if duplicated.any():
        first = rows[duplicated].iloc[0]
        raise ConfigError(f"run {run.label!r} has several {SUMMARY} rows for layer {int(first['layer'])} {what} "
                          f"{first[index]!r}; the table holds one per layer, site, mode, token kind and measure")
    keys = _ordered(rows[index], order)
    frame = rows.assign(layer=rows["layer"].astype(int))
    out = []
    for column, fill in (("mean", np.nan), ("std", np.nan), ("n", 0)):
        wide = frame.pivot(index=index, columns="layer", values=column).reindex(index=keys, columns=layers)
        wide = wide.fillna(fill).astype(int) if column == "n" else wide.astype(float)
        wide.index.name, wide.columns.name = index, "layer"
        out.append(wide)
    return tuple(out)


def trace_grid(run: Run, mode: Optional[str] = None, measure: str = "jsd", token_kind: Optional[str] = None,
               figure: str = "trace_heatmap") -> TraceGrid:
    """Sites × layers of ``measure`` (default jsd) for the run's ``mode``. A restore run is read at
    one token group, ``token_kind`` (default: the last subject token, where ROME's traces peak)."""
    run = _check_run(run, figure)
    mode = resolve_mode(run, mode, figure)
    rows = _measure_rows(run, mode, measure)
    kinds = _ordered(rows["token_kind"], TOKEN_KINDS)
    if mode == "restore":
        kinds = [k for k in kinds if k]
        if token_kind is None:
            token_kind = DEFAULT_TOKEN_KIND if DEFAULT_TOKEN_KIND in kinds else kinds[0]
        elif token_kind not in kinds:
            raise ConfigError(f"run {run.label!r} has no {token_kind!r} tokens; its token kinds are {', '.join(kinds)}")
    elif token_kind:
        raise ConfigError(f"token_kind chooses a token group of a restore run; run {run.label!r} is a {mode} run")
    else:
        token_kind = ""
    layers = sorted({int(layer) for layer in summary_table(run).query("mode == @mode")["layer"]})
    rows = rows[rows["token_kind"].astype(str) == token_kind]
    mean, std, n = _grid(run, rows, "site", SITES.get(mode, ()), layers, "site")
    return TraceGrid(run, mode, measure, mean, std, n, token_kind=token_kind)


def token_kind_grids(run: Run, measure: str = "indirect_effect", figure: str = "trace_indirect_effect") -> list[TraceGrid]:
    """For a restore run, one token kinds × layers grid of ``measure`` per restored site (in the
    order hidden, MLP, attention); token kinds the run lacks altogether are left out."""
    run = _check_run(run, figure)
    present = run_modes(run)
    if "restore" not in present:
        raise ConfigError(f"run {run.label!r} is a {' and '.join(present)} run; {figure} draws restore runs "
                          "(moelens trace MODEL --mode restore); draw trace_heatmap for this one")
    rows = _measure_rows(run, "restore", measure)
    rows = rows[rows["token_kind"].astype(str) != ""]
    layers = sorted({int(layer) for layer in summary_table(run).query("mode == 'restore'")["layer"]})
    kinds = _ordered(rows["token_kind"], TOKEN_KINDS)
    grids = []
    for site in _ordered(rows["site"], SITES["restore"]):
        mean, std, n = _grid(run, rows[rows["site"] == site], "token_kind", kinds, layers, f"{site} token kind")
        # every panel shows the same token groups, also one a site lacks (grey)
        mean, std, n = mean.reindex(index=kinds), std.reindex(index=kinds), n.reindex(index=kinds).fillna(0).astype(int)
        grids.append(TraceGrid(run, "restore", measure, mean, std, n, site=site))
    return grids


# ---------------------------------------------------------------------------------------------
# Drawing


def _fontsize(key: str) -> float:
    return FontProperties(size=mpl.rcParams[key]).get_size_in_points()


def plot_width(n_layers: int) -> float:
    """Inches of the grid: a readable column per layer, up to 8 inches; 100 layers get 10."""
    low, high = PLOT_WIDTH
    return max(low, min(n_layers * COLUMN_INCHES, max(high, n_layers * MIN_COLUMN_INCHES)))


def layer_ticks(layers: Sequence[int], column_inches: float, fontsize: float) -> list[int]:
    """Columns to label: every n-th layer (n = 1, 2, 5, 10, 20, 50, …, at least 2 above
    :data:`EVERY_LAYER_UP_TO` layers, as in the seed), the smallest n whose labels keep apart.
    Consecutive layers are labelled at multiples of n (0, 2, 4, …); any other set every n-th column."""
    widest = max(0.64 * len(str(layer)) * fontsize / 72.0 for layer in layers)  # digits are 0.64 em
    need = widest + 0.08
    steps = [1, 2, 5] + [m * 10**e for e in range(1, 5) for m in (1, 2, 5)]
    step = next(s for s in steps if s * column_inches >= need and (s >= 2 or len(layers) <= EVERY_LAYER_UP_TO))
    consecutive = list(layers) == list(range(layers[0], layers[0] + len(layers)))
    if consecutive:
        picked = [i for i, layer in enumerate(layers) if layer % step == 0]
        if picked:
            return picked
    return list(range(0, len(layers), step))


def _wrap(text: str, inches: float, fontsize: float) -> str:
    characters = max(12, int(inches * 72 / (0.55 * fontsize)))  # a character is about 0.55 em wide
    return "\n".join(textwrap.fill(line, characters, break_long_words=False) for line in text.split("\n"))


def bar_label(text: str, inches: float, fontsize: float) -> str:
    """A colour-bar label on one line if it fits along the bar, else broken before its unit."""
    if 0.55 * len(text) * fontsize / 72.0 <= 0.95 * inches or " (" not in text:
        return text
    head, _, tail = text.partition(" (")
    return f"{head}\n({tail}"


def _norm(values: np.ndarray, from_zero: bool) -> Normalize:
    """The data's own range (seed 003's bar spans 0.1–0.6, not 0–1); an indirect effect's scale
    starts at 0 at most, so no effect is the lightest colour or above it."""
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if from_zero:
        low = min(low, 0.0)
    if high - low <= 1e-12 * max(abs(high), 1.0):
        pad = 0.05 * abs(high) if high else 0.05
        low, high = low - pad, high + pad
    return Normalize(low, high)


def _panel(ax: Axes, values: np.ndarray, cmap_name: str, norm: Normalize, row_labels: Sequence[str],
           layers: Sequence[int], column_inches: float, row_inches: float, tick_labels: bool = True) -> AxesImage:
    """One rows × layers grid: first row on top, a label per row, layers labelled along x."""
    cmap = mpl.colormaps[cmap_name].with_extremes(bad=ABSENT_GREY)
    image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest", origin="upper")
    image.set_gid("values")
    ax.grid(False)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_yticks(range(len(row_labels)), list(row_labels))
    ticks = layer_ticks(layers, column_inches, _fontsize("xtick.labelsize"))
    ax.set_xticks(ticks, [str(layers[i]) for i in ticks] if tick_labels else [""] * len(ticks))
    # a cell carries its value only where the number fits at a size the report keeps readable
    # (with as many decimals as tell the grid's values apart: 0.00 everywhere would say nothing)
    fig = ax.get_figure()
    fmt = cell_format(values)
    texts = [fmt(v) for v in values[np.isfinite(values)]]
    longest = max((len(t) for t in texts), default=4)
    size = cell_font_size(fig.get_figwidth(), column_inches, row_inches, longest) if len(layers) <= ANNOTATE_MAX_LAYERS else None
    if size is not None:
        for (i, j), value in np.ndenumerate(values):
            if np.isfinite(value):
                r, g, b, _ = cmap(norm(value))
                colour = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"
                ax.text(j, i, fmt(value), ha="center", va="center", fontsize=size, color=colour, gid="cell")
    return image


def _colour_bar(fig: Figure, image: AxesImage, ax: Axes, label: str, width: float, height: float) -> None:
    # fraction and pad are shares of the grid's width; the bar is 0.14 inch wide, full height.
    bar = fig.colorbar(image, ax=ax, fraction=0.14 / width, pad=0.12 / width, aspect=height / 0.14)
    bar.set_label(bar_label(label, height, _fontsize("axes.labelsize")))
    bar.outline.set_visible(False)
    label_colour_bar_ends(bar, height)


def _absent_note(fig: Figure, what: str) -> None:
    fig.legend(handles=[Patch(facecolor=ABSENT_GREY, edgecolor="none", label=what)], loc="outside lower center",
               handlelength=1.6, handleheight=1.1)


def describe(run: Run, grid: TraceGrid) -> str:
    """What the cells of ``grid`` are, in one sentence for the figure's subtitle."""
    options = run.manifest.get("options") or {}
    prompts = n_prompts(run)
    over = f"mean over {prompts} prompt{'s' if prompts != 1 else ''}" if prompts else "mean over prompts"
    if grid.mode == "knockout":
        ablation = options.get("ablation", "mean")
        how = "zeroed" if ablation == "zero" else "replaced by its mean over the prompts"
        return f"Knockout: each site {how}, one layer at a time; {over}"
    if grid.mode == "block":
        window = window_of(run, "block")
        depth = run.model.get("n_layers") or (max(grid.layers) + 1 if grid.layers else 0)
        scale = f" of {depth} layers; Geva et al.: 9 of 48" if depth else ""
        return (f"Attention knockout: the last position may not attend to the subject (Subj.), the other tokens (Attn.) "
                f"or itself (Last.) in layers {window_span(window)} (window {window}{scale}); {over}")
    if grid.mode == "restore":
        kind = TOKEN_KIND_LABELS.get(grid.token_kind, grid.token_kind).lower()
        return f"Restoring clean states at the {kind} after corrupting the subject; {over}"
    return over


@styled
def trace_heatmap(run: Run, mode: Optional[str] = None, measure: Optional[str] = None, token_kind: Optional[str] = None) -> Figure:
    """Sites × layers heat map of an interventions run (seed 003): colour = mean JSD over prompts."""
    grid = trace_grid(run, mode, measure or "jsd", token_kind, "trace_heatmap")
    values = grid.mean.to_numpy(float)
    n_rows, n_layers = values.shape
    width = plot_width(n_layers)
    height = max(0.42 * n_rows, 1.4)
    absent = bool(np.isnan(values).any())
    fig = new_figure(width + 2.5, height + 1.55 + (0.3 if absent else 0.0))
    ax = fig.subplots()
    image = _panel(ax, values, HEATMAP_CMAP, _norm(values, from_zero=grid.measure == "indirect_effect"),
                   [site_label(grid.run, s) for s in grid.rows], grid.layers, width / n_layers, height / n_rows)
    ax.set_xlabel("Layer")
    _colour_bar(fig, image, ax, MEASURES.get(grid.measure, grid.measure), width, height)
    ax.set_title(_wrap(describe(grid.run, grid), width + 1.0, _fontsize("axes.titlesize") * 0.85), loc="left",
                 fontsize="small", color="#444444")
    if absent:
        _absent_note(fig, "no such module in this layer (not traced)")
    fig.suptitle(_wrap(grid.run.label, width + 2.3, _fontsize("figure.titlesize")))
    return fig


@styled
def trace_knockout(run: Run, measure: Optional[str] = None) -> Figure:
    """Sites × layers heat map of the knockout rows of an interventions run (drawn beside the seed figure)."""
    return trace_heatmap(run, mode="knockout", measure=measure)


@styled
def trace_restore(run: Run, measure: Optional[str] = None, token_kind: Optional[str] = None) -> Figure:
    """Restored sites × layers heat map of a restore run at one token group (default: the last subject token)."""
    return trace_heatmap(run, mode="restore", measure=measure, token_kind=token_kind)


#: The figure name of each mode's heat map: the seed's name for attention knockout (seed 003).
HEATMAP_FIGURES = {"block": "trace_heatmap", "knockout": "trace_knockout", "restore": "trace_restore"}


def panel_title(run: Run, site: str) -> str:
    """What a restore panel restores, with its window (docs/methods.md §7) from the manifest's options."""
    if site == "restore_hidden":
        return "Hidden state restored at layer ℓ (one token)"
    window = window_of(run, "restore")
    module = {"restore_mlp": "MoE output" if is_moe(run) else "MLP output", "restore_attn": "Attention output"}.get(site, site)
    return f"{module} restored at layers {window_span(window)} (window {window})"


@styled
def trace_indirect_effect(run: Run) -> Figure:
    """ROME's causal traces of a restore run: mean indirect effect per token group and layer, one panel per restored site."""
    grids = token_kind_grids(run)
    if not grids:
        raise ConfigError(f"run {run.label!r} has no restore rows with a token kind; run moelens trace --mode restore again")
    layers = grids[0].layers
    n_layers = len(layers)
    width = plot_width(n_layers)
    heights = [max(0.3 * len(g.rows), 1.5) for g in grids]
    absent = any(bool(np.isnan(g.mean.to_numpy(float)).any()) for g in grids)
    fig = new_figure(width + 3.0, sum(h + 0.55 for h in heights) + 1.1 + (0.3 if absent else 0.0))
    axes = fig.subplots(len(grids), 1, squeeze=False, height_ratios=heights)[:, 0]
    title_size = _fontsize("axes.titlesize")
    for k, (ax, grid) in enumerate(zip(axes, grids)):
        values = grid.mean.to_numpy(float)
        last = k == len(grids) - 1
        image = _panel(ax, values, RESTORE_CMAPS.get(grid.site, "Greys"), _norm(values, from_zero=True),
                       [TOKEN_KIND_LABELS.get(kind, kind) for kind in grid.rows], layers, width / n_layers,
                       heights[k] / max(len(grid.rows), 1), tick_labels=last)
        _colour_bar(fig, image, ax, MEASURES["indirect_effect"], width, heights[k])
        ax.set_title(_wrap(panel_title(grid.run, grid.site), width + 1.2, title_size), loc="left")
        if last:
            ax.set_xlabel("Layer ℓ")
    if absent:
        _absent_note(fig, "no such module in this layer (not traced)")
    prompts = n_prompts(grids[0].run)
    fig.suptitle(_wrap(f"{grids[0].run.label}\nIndirect effect of restoring a clean state (subject corrupted), "
                       f"mean over {prompts} prompt{'s' if prompts != 1 else ''}", width + 2.8, _fontsize("figure.titlesize")))
    return fig


__all__ = ["HEATMAP_FIGURES", "MEASURES", "SITE_LABELS", "TOKEN_KIND_LABELS", "TraceGrid", "layer_ticks", "resolve_mode", "run_modes", "site_label",
           "token_kind_grids", "trace_grid", "trace_heatmap", "trace_indirect_effect", "trace_knockout", "trace_restore", "window_of", "window_span"]
