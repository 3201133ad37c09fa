"""Figures of the module-metrics analysis (docs/methods.md §5 and §7; the heat map of seed 002).

:func:`module_heatmap` draws one metric of one run as a layers × modules grid, layer 0 on top and
the modules in the seed's order (attn.q, attn.k, attn.v, attn.o, mlp.up, mlp.down, mlp.gate, then
the others a run has). :func:`module_lines` draws the same numbers as one line per module against
the layer.

The colour range is the data's own (the seed's correlations span 0.11–0.13: a scale forced to
0..1 would paint them one colour). A similarity (↑: corr, cos, cka) is bright where the models
are alike, and so is a distance (↓: rel_l2, changed_frac), whose colours run the other way; a
correlation or cosine that takes both signs gets a diverging scale centred on 0. A module a layer
lacks (Mamba layers have no attention, DeepSeek's first layers no experts) is hatched; a value
left undefined (NaN: a zero matrix or delta) is plain grey.
"""

from __future__ import annotations

import math
import textwrap
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import ScalarFormatter

from moelens.errors import ConfigError
from moelens.figures.checks import checked_run, checked_table
from moelens.figures.style import (
    DIVERGING_CMAP,
    SEQUENTIAL_CMAP,
    cell_font_size,
    label_colour_bar_ends,
    layer_axis,
    new_figure,
    styled,
)
from moelens.results import Run

ANALYSIS = "module_metrics"
TABLE = "module_metrics"
EXPERT_TABLE = "module_metrics_experts"


@dataclass(frozen=True)
class MetricInfo:
    """How a metric is named: ``name`` in titles, ``axis`` on a colour bar or y axis (with ↑ where
    higher means more alike, ↓ where lower does); ``kind`` pair or single; ``signed``: it may be
    negative (a diverging scale when it takes both signs)."""

    name: str
    axis: str
    kind: str
    direction: int = 0  # +1 similarity, −1 distance, 0 neither (a single-model quantity)
    signed: bool = False


METRICS: dict[str, MetricInfo] = {
    "corr": MetricInfo("Pearson correlation", "Pearson correlation (corr) ↑", "pair", +1, signed=True),
    "cos": MetricInfo("Cosine similarity", "cosine similarity (cos) ↑", "pair", +1, signed=True),
    "rel_l2": MetricInfo("Relative L2 distance", "relative L2 ↓", "pair", -1),
    "cka": MetricInfo("Linear CKA", "linear CKA ↑", "pair", +1),
    "changed_frac": MetricInfo("Changed fraction", "changed fraction ↓", "pair", -1),
    "fro_norm": MetricInfo("Frobenius norm", "Frobenius norm", "single"),
    "spectral_norm": MetricInfo("Spectral norm", "spectral norm σ₁", "single"),
    "stable_rank": MetricInfo("Stable rank", "stable rank", "single"),
    "effective_rank": MetricInfo("Effective rank", "effective rank", "single"),
    "alpha": MetricInfo("Power-law exponent α", "α (power-law exponent)", "single"),
}
PAIR_MODELS = ("pair", "pair_delta")
SINGLE_MODELS = ("a", "b")
MODELS = PAIR_MODELS + SINGLE_MODELS

#: Grid sizes up to which each cell carries its value.
ANNOTATE_MAX_LAYERS = 24
ANNOTATE_MAX_MODULES = 10
#: Cells: an undefined value (NaN) is light grey; a module a layer lacks is hatched on grey.
UNDEFINED_GREY = "#d9d9d9"
ABSENT_FACE = "#ececec"
ABSENT_HATCH = "#9a9a9a"

#: Lines: a colour family per kind of module (attention blue, MLP orange to brown, the shared
#: expert green, the router reddish purple), a marker per role within the family so that lines
#: of one family stay apart in greyscale. MLA's factored projections are dashed.
MODULE_STYLES: dict[str, tuple[str, str, str]] = {
    "attn.q": ("#003f7f", "o", "-"),
    "attn.k": ("#0072B2", "s", "-"),
    "attn.v": ("#56B4E9", "^", "-"),
    "attn.o": ("#6a6fc4", "D", "-"),
    "attn.q_a": ("#003f7f", "o", "--"),
    "attn.q_b": ("#0072B2", "s", "--"),
    "attn.kv_a": ("#56B4E9", "^", "--"),
    "attn.kv_b": ("#2f4b9c", "v", "--"),
    "mlp.up": ("#E69F00", "o", "-"),
    "mlp.down": ("#D55E00", "s", "-"),
    "mlp.gate": ("#8c4a0c", "^", "-"),
    "shared.up": ("#009E73", "o", "-"),
    "shared.down": ("#005c43", "s", "-"),
    "shared.gate": ("#55c49a", "^", "-"),
    "router": ("#CC79A7", "*", "-"),
}
OTHER_COLOURS = ("#7f7f7f", "#882255", "#999933", "#332288", "#44AA99")


def metric_info(metric: str) -> MetricInfo:
    """The names of ``metric``; one the analysis may add later is shown under its own name."""
    return METRICS.get(metric, MetricInfo(metric, metric, "unknown"))


def module_order() -> Callable[[str], tuple[int, str]]:
    """The sort key of module names (the seed's order, then the rest alphabetically)."""
    from moelens.module_names import module_rank

    return module_rank


def module_style(module: str) -> tuple[str, str, str]:
    """(colour, marker, line style) of a module's line: fixed per name, so that a reader who
    learnt that orange is mlp.up reads it so in every figure. A second shared expert
    (``shared1.up``) takes the first one's colour, dotted; any other name a stable grey-ish
    colour picked by a hash of the name."""
    if module in MODULE_STYLES:
        return MODULE_STYLES[module]
    head, _, role = module.partition(".")
    if head.startswith("shared") and f"shared.{role}" in MODULE_STYLES:
        colour, marker, _style = MODULE_STYLES[f"shared.{role}"]
        return colour, marker, ":"
    return OTHER_COLOURS[zlib.crc32(module.encode("utf-8")) % len(OTHER_COLOURS)], "x", "-."


def _family(module: str) -> str:
    head = module.split(".")[0]
    return "shared" if head.startswith("shared") else head


# ---------------------------------------------------------------------------------------------
# The numbers of one (metric, model)


@dataclass(frozen=True)
class ModuleGrid:
    """One metric of one run as layers × modules: ``values`` (NaN where undefined or absent) and
    ``present`` (False where the layer has no such module), rows = layers ascending, columns =
    modules in the analysis's order."""

    run: Run
    metric: str
    model: str
    values: pd.DataFrame
    present: pd.DataFrame

    @property
    def info(self) -> MetricInfo:
        return metric_info(self.metric)

    @property
    def layers(self) -> list[int]:
        return [int(layer) for layer in self.values.index]

    @property
    def modules(self) -> list[str]:
        return [str(module) for module in self.values.columns]

    @property
    def moe(self) -> bool:
        """Whether some layer is an MoE layer (then mlp.* is the mean over its routed experts)."""
        experts = self.run.tables.get(EXPERT_TABLE)
        return "router" in self.modules or (experts is not None and not experts.empty)


def _check_run(run: object, figure: str) -> Run:
    return checked_run(run, figure, ANALYSIS, "moelens modules")


def _table(run: Run) -> pd.DataFrame:
    return checked_table(run, TABLE, ("layer", "module", "metric", "model", "value"), "run the module_metrics analysis again",
                         "run the analysis again", "no layer was measured")


def _ordered(values, key=None) -> list[str]:
    seen = list(dict.fromkeys(str(v) for v in values))
    return sorted(seen, key=key) if key else seen


def _choose(run: Run, table: pd.DataFrame, metric: Optional[str], model: Optional[str]) -> tuple[str, str]:
    """The metric and model to draw: the defaults, or the ones asked after checking that the run
    has them (the error lists what it has)."""
    metrics = _ordered(table["metric"], key=lambda m: (list(METRICS).index(m) if m in METRICS else len(METRICS), m))
    if metric is None:
        pair_rows = table["model"].isin(PAIR_MODELS).any()
        metric = "corr" if pair_rows and "corr" in metrics else "stable_rank" if "stable_rank" in metrics else metrics[0]
    elif metric not in metrics:
        what = "has no metric" if metric in METRICS else "has no metric (nor does moelens know)"
        raise ConfigError(f"run {run.label!r} {what} {metric!r}; it has {', '.join(metrics)}: choose one of those")
    models = _ordered(table.loc[table["metric"] == metric, "model"], key=lambda m: (MODELS.index(m) if m in MODELS else 9, m))
    kind = metric_info(metric).kind
    if model is None:
        preferred = PAIR_MODELS if kind == "pair" else SINGLE_MODELS if kind == "single" else ()
        model = next((m for m in preferred if m in models), models[0])
    else:
        if model not in MODELS:
            raise ConfigError(f"unknown model {model!r}; choose one of {', '.join(MODELS)} (run {run.label!r} has "
                              f"{', '.join(models)} for {metric})")
        if model not in models:
            expected = {"pair": "pair metrics compare models A and B (or A and a base)",
                        "single": "a single-model metric is given per model"}.get(kind, "")
            hint = {"pair_delta": "; pair_delta needs both model B and a base (moelens modules A B --base BASE)",
                    "b": "; model b needs a second model (moelens modules A B)",
                    "a": "", "pair": "; pair metrics need a second model or a base"}[model]
            wrong_kind = (kind == "pair" and model in SINGLE_MODELS) or (kind == "single" and model in PAIR_MODELS)
            because = f" ({metric} is a {kind} metric: {expected})" if wrong_kind else hint
            raise ConfigError(f"run {run.label!r} has no {metric} rows for model {model!r}{because}; it has "
                              f"{', '.join(models)} for {metric}")
    return metric, model


def module_grid(run: Run, metric: Optional[str] = None, model: Optional[str] = None, figure: str = "module_heatmap") -> ModuleGrid:
    """The layers × modules grid of ``metric`` for ``model`` (defaults: corr of the pair when the
    run has pair metrics, else stable_rank of model a), checked as the figures need it."""
    run = _check_run(run, figure)
    table = _table(run)
    metric, model = _choose(run, table, metric, model)
    rows = table[(table["metric"] == metric) & (table["model"] == model)]
    duplicated = rows.duplicated(["layer", "module"])
    if duplicated.any():
        first = rows[duplicated].iloc[0]
        raise ConfigError(f"run {run.label!r} has several {metric} rows for layer {int(first['layer'])} {first['module']} "
                          f"({model}); a {TABLE} table holds one per layer, module, metric and model")
    # Every layer of the run is a row, also one that has no module with this metric.
    layers = sorted({int(layer) for layer in table["layer"]})
    modules = _ordered(rows["module"], key=module_order())
    wide = rows.assign(layer=rows["layer"].astype(int), value=rows["value"].astype(float))
    values = wide.pivot(index="layer", columns="module", values="value").reindex(index=layers, columns=modules)
    present = (wide.assign(here=True).pivot(index="layer", columns="module", values="here")
               .reindex(index=layers, columns=modules).fillna(False).astype(bool))
    values.index.name = present.index.name = "layer"
    values.columns.name = present.columns.name = "module"
    return ModuleGrid(run, metric, model, values, present)


def comparison(run: Run, model: str) -> str:
    """What ``model`` compares: "A vs B", "(A − base) vs (B − base)", "model A"."""
    inputs = run.manifest.get("inputs") or {}
    other = "base" if ("b" not in inputs and "base" in inputs) else "B"
    return {"pair": f"A vs {other}", "pair_delta": "(A − base) vs (B − base)", "a": "model A", "b": "model B"}.get(model, model)


def _title(fig: Figure, grid: ModuleGrid) -> None:
    size = FontProperties(size=mpl.rcParams["figure.titlesize"]).get_size_in_points()
    characters = int(fig.get_figwidth() * 72 / (0.6 * size))  # a character is about 0.6 em wide
    lines = [f"{grid.info.name} per layer and module: {comparison(grid.run, grid.model)}", grid.run.label]
    fig.suptitle("\n".join(textwrap.fill(line, characters, break_long_words=False) for line in lines))


# ---------------------------------------------------------------------------------------------
# Layers × modules heat map


def heatmap_scale(values: np.ndarray, info: MetricInfo) -> tuple[Colormap, Normalize]:
    """Colours over the data's own range: a similarity bright where high, a distance bright where
    low, a signed metric that takes both signs diverging around 0; NaN light grey."""
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if info.signed and low < 0 < high:
        bound = max(-low, high)
        return mpl.colormaps[DIVERGING_CMAP].with_extremes(bad=UNDEFINED_GREY), Normalize(-bound, bound)
    if high - low <= 1e-12 * max(abs(high), 1.0):
        pad = 0.05 * abs(high) if high else 0.05  # one value everywhere: the middle of the scale
        low, high = low - pad, high + pad
    name = SEQUENTIAL_CMAP + ("_r" if info.direction < 0 else "")
    return mpl.colormaps[name].with_extremes(bad=UNDEFINED_GREY), Normalize(low, high)


def cell_format(values: np.ndarray) -> Callable[[float], str]:
    """How a cell's number is written: enough decimals to tell the grid's values apart (three
    for 0.11–0.13), at most four; thousands without decimals."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        return lambda v: ""
    biggest = float(np.abs(finite).max())
    span = float(finite.max() - finite.min())
    if biggest >= 1000:
        return lambda v: f"{v:,.0f}".replace("-", "−")
    decimals = 2 if span <= 0 else min(4, max(1 if biggest >= 10 else 2, math.ceil(-math.log10(span)) + 1))
    zero = f"{0:.{decimals}f}"
    return lambda v: f"{v:.{decimals}f}".replace(f"-{zero}", zero).replace("-", "−")


def layer_tick_rows(n_rows: int, inches_per_row: float, fontsize: float) -> list[int]:
    """Rows to label: every n-th (n from 1, 2, 3, 4, 5, 10, 20, 50, …, the smallest whose labels
    keep a line's height apart), and the last row (the seed: 0, 3, …, 33, 35), which replaces the
    label before it where the two would touch."""
    need = 1.6 * fontsize / 72.0
    steps = [1, 2, 3, 4, 5] + [m * 10**e for e in range(1, 6) for m in (1, 2, 5)]
    step = next(s for s in steps if s * inches_per_row >= need)
    rows = list(range(0, n_rows, step))
    last = n_rows - 1
    if rows[-1] != last:
        # The last layer tells the reader where the model ends: it takes the place of the
        # label before it where the two would touch.
        if (last - rows[-1]) * inches_per_row < need and len(rows) > 1:
            rows.pop()
        rows.append(last)
    return rows


def _annotate(ax: Axes, values: np.ndarray, cmap: Colormap, norm: Normalize, fontsize: float) -> None:
    fmt = cell_format(values)
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            r, g, b, _ = cmap(norm(value))
            colour = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"
            ax.text(j, i, fmt(value), ha="center", va="center", fontsize=fontsize, color=colour, gid="cell")


def _hatch_absent(ax: Axes, present: np.ndarray) -> int:
    """A hatched block over each run of rows where a module is absent; returns the cells."""
    count = 0
    for j in range(present.shape[1]):
        i = 0
        while i < present.shape[0]:
            if present[i, j]:
                i += 1
                continue
            start = i
            while i < present.shape[0] and not present[i, j]:
                i += 1
            ax.add_patch(Rectangle((j - 0.5, start - 0.5), 1, i - start, facecolor=ABSENT_FACE, edgecolor=ABSENT_HATCH,
                                   hatch="////", linewidth=0, gid="absent"))
            count += i - start
    return count


def label_rotation(modules: list[str], column_inches: float, fontsize: float) -> int:
    """The smallest angle (0, 30, 45, 60 or 90°) at which the module names, each ending under its
    column, keep their boxes apart: a name w wide and h high tilted by θ spans w·cos θ + h·sin θ."""
    widest = max(0.62 * len(m) * fontsize / 72.0 for m in modules)  # letters are about 0.6 em wide
    height = 1.2 * fontsize / 72.0
    if widest <= 0.92 * column_inches:
        return 0
    return next(angle for angle in (30, 45, 60, 90)
                if widest * math.cos(math.radians(angle)) + height * math.sin(math.radians(angle)) <= 0.92 * column_inches
                or angle == 90)


def _module_labels(ax: Axes, modules: list[str], column_inches: float) -> None:
    fontsize = FontProperties(size=mpl.rcParams["xtick.labelsize"]).get_size_in_points()
    ax.set_xticks(range(len(modules)), modules)
    angle = label_rotation(modules, column_inches, fontsize)
    if angle:
        ax.tick_params(axis="x", labelrotation=angle)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right" if angle < 90 else "center")
            label.set_rotation_mode("anchor" if angle < 90 else "default")


@styled
def module_heatmap(run: Run, metric: Optional[str] = None, model: Optional[str] = None) -> Figure:
    """Layers × modules heat map of one module metric (seed 002): layer 0 on top, colour = value."""
    grid = module_grid(run, metric, model, "module_heatmap")
    values = grid.values.to_numpy(float)
    present = grid.present.to_numpy(bool)
    n_layers, n_modules = values.shape
    annotate = n_layers <= ANNOTATE_MAX_LAYERS and n_modules <= ANNOTATE_MAX_MODULES

    column = 0.7 if n_modules <= ANNOTATE_MAX_MODULES else 0.55  # inches per module
    row = 0.3 if annotate else min(0.3, max(0.075, 6.0 / n_layers))  # inches per layer
    plot_height = max(n_layers * row, 1.8)
    absent = not present.all()
    undefined = bool((present & ~np.isfinite(values)).any())
    width = max(n_modules * column + 2.4, 5.2)
    height = plot_height + 1.6 + (0.35 if (absent or undefined) else 0.0)
    fig = new_figure(width, height)
    ax = fig.subplots()

    cmap, norm = heatmap_scale(values, grid.info)
    image = ax.imshow(values, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest", origin="upper")
    image.set_gid("values")
    ax.grid(False)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    # A white gap between attention, MLP, shared experts and the router.
    families = [_family(m) for m in grid.modules]
    for j in range(1, n_modules):
        if families[j] != families[j - 1]:
            ax.axvline(j - 0.5, color="white", linewidth=2.0, gid="group")
    absent_cells = _hatch_absent(ax, present)
    if annotate:
        # the number only where it fits at a size the report keeps readable; else the colour bar tells it
        texts = [cell_format(values)(v) for v in values[np.isfinite(values)]]
        size = cell_font_size(width, column, row, max((len(t) for t in texts), default=1), largest=7.0 if n_modules <= 8 else 6.5)
        if size is not None:
            _annotate(ax, values, cmap, norm, fontsize=size)

    _module_labels(ax, grid.modules, column)
    fontsize = FontProperties(size=mpl.rcParams["ytick.labelsize"]).get_size_in_points()
    rows = layer_tick_rows(n_layers, plot_height / n_layers * 0.95, fontsize)
    ax.set_yticks(rows, [str(grid.layers[i]) for i in rows])
    ax.set_ylabel("Layer")
    ax.set_xlabel("Module" + (" (MoE layers: mlp.* is the mean over the routed experts)" if grid.moe else ""))

    # fraction and pad are shares of the heat map's width; the bar is 0.14 inch wide, full height.
    bar = fig.colorbar(image, ax=ax, label=grid.info.axis, fraction=0.14 / (n_modules * column),
                       pad=0.1 / (n_modules * column), aspect=plot_height / 0.14)
    formatter = ScalarFormatter(useOffset=False)
    bar.ax.yaxis.set_major_formatter(formatter)
    bar.outline.set_visible(False)
    label_colour_bar_ends(bar, plot_height)

    notes = []
    if absent_cells:
        notes.append(Patch(facecolor=ABSENT_FACE, edgecolor=ABSENT_HATCH, hatch="////", linewidth=0,
                           label="module absent in this layer"))
    if undefined:
        notes.append(Patch(facecolor=UNDEFINED_GREY, edgecolor="none", label="undefined (a zero matrix or delta)"))
    if notes:
        fig.legend(handles=notes, loc="outside lower center", ncols=len(notes), handlelength=1.6, handleheight=1.1)
    _title(fig, grid)
    return fig


# ---------------------------------------------------------------------------------------------
# One line per module against the layer


@styled
def module_lines(run: Run, metric: Optional[str] = None, model: Optional[str] = None) -> Figure:
    """One module metric against the layer: a line per module, colours fixed per module."""
    grid = module_grid(run, metric, model, "module_lines")
    layers = np.asarray(grid.layers, float)
    fig = new_figure(7.6, 4.2)
    ax = fig.subplots()
    for module in grid.modules:
        y = grid.values[module].to_numpy(float)
        colour, marker, linestyle = module_style(module)
        here = np.isfinite(y)
        # A module with gaps (absent layers break its line) shows a marker at every value, so that
        # a value between two gaps is seen; a whole line, every n-th.
        gaps = here.any() and not here[here.argmax(): len(here) - here[::-1].argmax()].all()
        markevery = 1 if gaps else max(1, len(layers) // 12)
        (line,) = ax.plot(layers, y, color=colour, marker=marker, linestyle=linestyle, markevery=markevery,
                          markersize=6 if marker == "*" else 4, label=module, zorder=3)
        line.set_gid(module)
    layer_axis(ax, grid.layers, nbins=10, steps=(1, 2, 4, 5, 10))
    ax.yaxis.set_major_formatter(ScalarFormatter(useOffset=False))
    ax.set_ylabel(grid.info.axis)
    handles = [Line2D([], [], color=c, marker=m, linestyle=s, label=module)
               for module in grid.modules for c, m, s in [module_style(module)]]
    fig.legend(handles=handles, loc="outside right upper", title="Module", alignment="left")
    notes = []
    if not grid.present.to_numpy().all():
        notes.append("a gap: the module is absent in that layer")
    if grid.moe:
        notes.append("MoE layers: mlp.* is the mean over the routed experts")
    if notes:
        ax.set_title("; ".join(notes), fontsize="small", loc="left", color="#444444")
    _title(fig, grid)
    return fig


__all__ = ["METRICS", "MODULE_STYLES", "ModuleGrid", "comparison", "metric_info", "module_grid", "module_heatmap",
           "module_lines", "module_order", "module_style"]
