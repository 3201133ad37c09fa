"""The registry of families: the one place that maps a ``config.json`` to a family adapter.

A family module in :mod:`moelens.checkpoint.families` decorates its adapter class with
:func:`register`; every module of that package is imported on first use, so adding a family is
adding one module.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from moelens.errors import UnsupportedArchitectureError

_FAMILIES: dict[str, type] = {}
_loaded = False


def register(cls: type) -> type:
    """Class decorator: make a :class:`~moelens.checkpoint.families.base.Family` known."""
    if cls.name in _FAMILIES and _FAMILIES[cls.name] is not cls:
        raise RuntimeError(f"two families are named {cls.name!r}")
    _FAMILIES[cls.name] = cls
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    package = importlib.import_module("moelens.checkpoint.families")
    for mod in pkgutil.iter_modules(package.__path__):
        if mod.name != "base":
            importlib.import_module(f"{package.__name__}.{mod.name}")
    _loaded = True


def families() -> dict[str, type]:
    """Every registered family by name."""
    _load_all()
    return dict(sorted(_FAMILIES.items()))


def supported_architectures() -> list[str]:
    return sorted({a for cls in families().values() for a in cls.architectures})


def family_for_config(config: dict[str, Any]) -> type:
    """The family whose ``architectures`` or ``model_type`` matches the config; else, for any
    ``model_type`` that ``AutoModelForCausalLM`` loads, the forward-only
    :class:`~moelens.checkpoint.families.causal_lm.CausalLMFamily`."""
    fams = families()
    archs = config.get("architectures") or []
    for cls in fams.values():
        if any(a in cls.architectures for a in archs):
            return cls
    model_type = config.get("model_type")
    for cls in fams.values():
        if model_type in cls.model_types:
            return cls
    # Not read by name, but loadable by AutoModelForCausalLM: forward-pass analyses only.
    from moelens.checkpoint.families.causal_lm import CausalLMFamily

    if CausalLMFamily.accepts(config):
        return CausalLMFamily
    found = ", ".join(archs) or f"model_type={model_type!r}"
    raise UnsupportedArchitectureError(
        f"unsupported architecture {found}; moelens reads: {', '.join(supported_architectures())}, "
        "and opens any other transformers causal LM for moelens trace"
    )
