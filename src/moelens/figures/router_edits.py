"""Figures of router edits (docs/methods.md §8).

- :func:`route_routed_share`: the share of top-k slots that still go to the edited expert after
  project_out (solid) and after random of equal norm (dashed, with a band from the least to the
  most of the random samples' per-layer means), against k, one colour per layer; the clean share
  is the dotted line of each layer.
- :func:`route_jsd_heatmap`: mean JSD (bits) of project_out, layers × k, each cell annotated with
  random's mean at the same (layer, k) as the reference.
- :func:`route_migration`: transplant's expert-migration matrix of one layer: row e, column j =
  the share of the positions that routed to e before whose edited top-k set holds j.

Every value is read from the run's ``router_edits`` and ``router_edits_migration`` tables and drawn
unchanged (means over experts, and over samples for random).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from moelens.errors import ConfigError
from moelens.figures.style import new_figure, run_style, styled
from moelens.results import Run

if TYPE_CHECKING:
    import pandas as pd

ANALYSIS = "router_edits"


def _check(run: object, figure: str) -> Run:
    if not isinstance(run, Run) or run.manifest.get("analysis") != ANALYSIS:
        raise ConfigError(f"{figure} draws one router_edits run")
    return run


def _k_axis(ax, ks) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("k (top singular directions removed)")


@styled
def route_routed_share(run: Run) -> Figure:
    """Share of top-k slots routed to the edited expert after project_out and after random parts of equal norm, per k."""
    run = _check(run, "route_routed_share")
    t = run["router_edits"]
    po = t[t["edit"] == "project_out"]
    rnd = t[t["edit"] == "random"]
    if po.empty:
        raise ConfigError("route_routed_share needs project_out rows; run with --edits including project_out")
    ks = sorted(set(po["k"]))
    layers = sorted(set(po["layer"]))
    fig = new_figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for i, L in enumerate(layers):
        style = run_style(i)
        colour = style["color"]
        a = po[po["layer"] == L].groupby("k")["routed_after"].mean().reindex(ks)
        ax.plot(ks, a.to_numpy(), color=colour, marker="o", label=f"layer {L}")
        before = float(po[po["layer"] == L]["routed_before"].mean())
        ax.axhline(before, color=colour, linestyle=":", linewidth=0.9)
        r = rnd[rnd["layer"] == L]
        if not r.empty:
            per_sample = r.groupby(["k", "sample"])["routed_after"].mean().unstack("sample").reindex(ks)
            ax.plot(ks, per_sample.mean(axis=1).to_numpy(), color=colour, linestyle="--", linewidth=1.1)
            ax.fill_between(ks, per_sample.min(axis=1).to_numpy(), per_sample.max(axis=1).to_numpy(), color=colour, alpha=0.15, linewidth=0)
    _k_axis(ax, ks)
    ax.set_ylabel("share of top-k slots to the edited expert")
    n = int(run.manifest["options"].get("n_prompts", 0))
    ax.set_title(f"Routing to the edited expert: project_out (solid) vs random (dashed, band = samples)\n"
                 f"dotted: before the edit · mean over experts · {n} prompts", fontsize=9)
    ax.legend(fontsize=7, ncol=2 if len(layers) > 6 else 1, loc="best")
    return fig


@styled
def route_jsd_heatmap(run: Run) -> Figure:
    """Mean JSD (bits) of project_out per layer and k, with random's mean of equal norm written in each cell."""
    run = _check(run, "route_jsd_heatmap")
    t = run["router_edits"]
    po = t[t["edit"] == "project_out"]
    if po.empty:
        raise ConfigError("route_jsd_heatmap needs project_out rows; run with --edits including project_out")
    grid = po.pivot_table(index="layer", columns="k", values="jsd", aggfunc="mean")
    rnd = t[t["edit"] == "random"].pivot_table(index="layer", columns="k", values="jsd", aggfunc="mean").reindex_like(grid)
    layers, ks = list(grid.index), list(grid.columns)
    fig = new_figure(1.6 + 1.3 * len(ks), 1.4 + 0.32 * len(layers))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(grid.to_numpy(), aspect="auto", cmap="Purples", vmin=0)
    ax.grid(False)
    ax.set_xticks(range(len(ks)), [str(k) for k in ks])
    ax.set_yticks(range(len(layers)), [str(L) for L in layers])
    ax.set_xlabel("k (top singular directions removed)")
    ax.set_ylabel("MoE layer")
    top = float(np.nanmax(grid.to_numpy())) if grid.size else 0.0
    for i, L in enumerate(layers):
        for j, k in enumerate(ks):
            v, r = grid.loc[L, k], rnd.loc[L, k] if not rnd.empty else np.nan
            text = f"{v:.2g}" + (f"\n({r:.2g})" if r == r else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if top and v > 0.6 * top else "black")
    bar = fig.colorbar(image, ax=ax)
    bar.set_label("mean JSD, project_out (bits)")
    ax.set_title("Next-token JSD after project_out\n(in brackets: random of equal norm)", fontsize=9)
    return fig


@styled
def route_migration(run: Run, layers: Optional[int | Sequence[int]] = None) -> Figure:
    """Transplant's expert-migration matrix: where the edited expert's former tokens go (one layer)."""
    run = _check(run, "route_migration")
    m = run["router_edits_migration"]
    if m.empty:
        raise ConfigError("route_migration needs transplant rows; run with --edits including transplant")
    if layers is not None and not isinstance(layers, int):
        layers = list(layers)
        if len(layers) != 1:
            raise ConfigError(f"route_migration draws one layer; got {len(layers)} (give --layers L)")
        layers = layers[0]
    layer = int(layers) if layers is not None else int(sorted(set(m["layer"]))[0])
    part = m[m["layer"] == layer]
    if part.empty:
        raise ConfigError(f"route_migration: no transplant rows at layer {layer}; layers with them: {sorted(set(m['layer']))}")
    grid = part.pivot_table(index=["expert", "partner"], columns="to_expert", values="share", aggfunc="mean")
    n_to = grid.shape[1]
    fig = new_figure(1.8 + 0.42 * n_to, 1.4 + 0.36 * len(grid))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(grid.to_numpy(), aspect="auto", cmap="Greens", vmin=0, vmax=1)
    ax.grid(False)
    ax.set_xticks(range(n_to), [str(j) for j in grid.columns])
    ax.set_yticks(range(len(grid)), [f"{e} ← {p}" for e, p in grid.index])
    ax.set_xlabel("expert holding the token after the transplant")
    ax.set_ylabel("edited expert e ← donor row e'")
    for i in range(len(grid)):
        for j in range(n_to):
            v = grid.to_numpy()[i, j]
            if v == v:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v > 0.6 else "black")
    bar = fig.colorbar(image, ax=ax)
    bar.set_label("share of e's former positions")
    ax.set_title(f"Transplant (router hijack), layer {layer}:\nwhere expert e's former tokens go", fontsize=9)
    return fig


def headline(table: pd.DataFrame) -> dict[int, tuple[float, float, float]]:
    """Per k: (a, b, a / b), a and b the mean |routed_before − routed_after| of project_out and of
    random over every layer, expert (and sample): how many times more removing the aligned part
    moves routing to its expert than removing a random part of equal norm (NaN where b = 0)."""
    t = table.assign(change=(table["routed_before"] - table["routed_after"]).abs())
    out = {}
    for k in sorted(set(t.loc[t["edit"] == "project_out", "k"])):
        po = float(t[(t["edit"] == "project_out") & (t["k"] == k)]["change"].mean())
        rnd = float(t[(t["edit"] == "random") & (t["k"] == k)]["change"].mean())
        if rnd == rnd:
            out[int(k)] = (po, rnd, po / rnd if rnd > 0 else float("nan"))
    return out


def headline_text(run: Run) -> str:
    """The report's first sentence, from the run's table."""
    parts = []
    for k, (aligned, random, ratio) in headline(run["router_edits"]).items():
        times = f"{ratio:.2f}×" if ratio == ratio else "(random moved nothing)"
        parts.append(f"k = {k}: {times} ({aligned:.4f} vs {random:.4f})")
    if not parts:
        return "No project_out and random rows to compare."
    return ("Removing the aligned part of the router changes routing to its expert, as a multiple of a random part of equal norm "
            "(mean |Δ share of top-k slots|, over layers and experts): " + "; ".join(parts) + ".")


__all__ = ["headline", "headline_text", "route_jsd_heatmap", "route_migration", "route_routed_share"]
