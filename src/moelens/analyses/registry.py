"""Every analysis, by its declaration: the one list an analysis is added to.

:data:`REGISTRY` names each analysis's :class:`~moelens.analyses.declaration.Declaration`
(``"module:NAME"``, in a torch-free module) in the order the commands are listed, the atlas runs
them and the report shows their sections. :func:`declarations` reads them (cheap: configs only);
:data:`ANALYSES` (the :class:`~moelens.analyses.base.Analysis` classes by name) imports every
analysis, and so torch, on first use.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from moelens.analyses.declaration import Declaration, load
from moelens.errors import ConfigError

#: One line per analysis: where its declaration is.
REGISTRY: tuple[str, ...] = (
    "moelens.analyses.router_alignment:DECLARATION",
    "moelens.analyses.expert_distance:DECLARATION",
    "moelens.analyses.module_metrics:DECLARATION",
    "moelens.analyses.interventions:DECLARATION",
    "moelens.analyses.router_edits:DECLARATION",
    "moelens.analyses.clustering:CLUSTERING",
    "moelens.analyses.calibration:DECLARATION",
    "moelens.analyses.clustering:MERGE_COST",
    "moelens.analyses.router_norms:DECLARATION",
)


@lru_cache(maxsize=1)
def declarations() -> dict[str, Declaration]:
    """Every analysis's declaration by its name, in :data:`REGISTRY` 's order."""
    out: dict[str, Declaration] = {}
    for target in REGISTRY:
        declaration = load(target)
        if declaration.name in out:
            raise ValueError(f"two analyses are called {declaration.name!r} ({target})")
        out[declaration.name] = declaration
    return out


def declaration(name: str) -> Declaration:
    """The declaration of analysis ``name``, or a ConfigError listing the known ones."""
    known = declarations()
    if name not in known:
        raise ConfigError(f"no analysis named {name!r}; known: {', '.join(known)}")
    return known[name]


@lru_cache(maxsize=1)
def _analyses() -> dict[str, type]:
    classes = {name: load(d.analysis) for name, d in declarations().items()}
    for name, cls in classes.items():
        if cls.name != name:
            raise ValueError(f"{cls.__name__}.name is {cls.name!r} but its declaration says {name!r}")
    return classes


def get_analysis(name: str) -> Any:
    """An analysis by name (``router_alignment``), or a ConfigError listing the known ones."""
    declaration(name)
    return _analyses()[name]()


def __getattr__(name: str) -> Any:
    if name == "ANALYSES":  # every analysis by its manifest name (imports them all, and torch)
        return _analyses()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ANALYSES", "REGISTRY", "declaration", "declarations", "get_analysis"]  # noqa: F822 (ANALYSES: module __getattr__)
