"""Read every MoE checkpoint family as one view: ``MoEModel -> MoELayer -> ExpertWeights``.

Names are imported on first use (PEP 562): :func:`open_model` checks its path before torch is
imported, so a mistyped path costs no start-up time."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("ROLES", "ExpertWeights", "RouterWeights"), "moelens.checkpoint.weights"),
    **dict.fromkeys(("MoELayer", "MoEModel"), "moelens.checkpoint.model"),
    "open_model": "moelens.checkpoint.open",
    **dict.fromkeys(("families", "supported_architectures"), "moelens.checkpoint.registry"),
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moelens.checkpoint' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [
    "ROLES", "ExpertWeights", "MoELayer", "MoEModel", "RouterWeights", "open_model", "families",
    "supported_architectures",
]
