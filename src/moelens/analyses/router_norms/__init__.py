"""Router norms (docs/methods.md §9): the L2 norm of every router row, per MoE layer and expert.

The whole of this analysis's declaration: its config (torch-free, so ``moelens --help`` and a
mistyped option cost no torch) and what every outer layer derives from it; the work is in
:mod:`.analysis`; its figure, report section, command summary and atlas runs in :mod:`.surface`,
each imported when first used.
"""

from __future__ import annotations

from dataclasses import dataclass

from moelens.analyses.declaration import Command, Declaration, FigureSpec
from moelens.analyses.fields import as_index_tuple, option
from moelens.lazy import lazy_package
from moelens.ranges import parse_ranges


@dataclass(frozen=True)
class RouterNormsConfig:
    """Options of :func:`router_norms`."""

    layers: tuple[int, ...] | None = option(None, "MoE layers, e.g. 0,5,10-13 (default: every MoE layer).", parse=parse_ranges, metavar="LIST")

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", as_index_tuple(self.layers, "layer"))


_HERE = "moelens.analyses.router_norms.analysis"
_SURFACE = "moelens.analyses.router_norms.surface"

#: Router norms, declared once (:mod:`moelens.analyses.declaration`).
DECLARATION = Declaration(
    name="router_norms", title="Router norms", config="moelens.analyses.router_norms:RouterNormsConfig",
    analysis=f"{_HERE}:RouterNorms", run=f"{_HERE}:run", function="router_norms", signature=("layers",),
    tables=("router_norms", "router_norms_layers"),
    section=f"{_SURFACE}:section",
    figures={"router_norm_heatmap": FigureSpec(f"{_SURFACE}:router_norm_heatmap", "Router norms by layer and expert", one_run=True)},
    command=Command("norms", "Router norms: the L2 norm of every router row per MoE layer and expert, and its spread within each layer.",
                    show=f"{_SURFACE}:show"),
    atlas=f"{_SURFACE}:atlas_calls",
)

__getattr__, __dir__ = lazy_package(__name__, {"RouterNorms": _HERE, "router_norms": "moelens.analyses.api"})

__all__ = ["DECLARATION", "RouterNorms", "RouterNormsConfig", "router_norms"]
