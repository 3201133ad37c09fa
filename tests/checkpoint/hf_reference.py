"""What transformers itself loads, arranged like the moelens view, for equivalence tests.

``reference_layer(hf_model, family, L)`` returns a dict with ``router`` [E, d] (and optional
``router_bias``, ``score_correction_bias``), ``gate``/``up`` [E, F, d] and ``down`` [E, d, F],
and ``shared`` (a list of (gate, up, down)). The generic rule covers every family whose
transformers v5 module holds ``experts.gate_up_proj`` [E, 2F, d] (gate first) and
``experts.down_proj`` [E, d, F]; families that differ register their own extractor in
``SPECIAL``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

SPECIAL: dict[str, Callable[[Any, int], dict[str, Any]]] = {}


def decoder_layers(hf_model: Any) -> Any:
    inner = getattr(hf_model, "model", None) or getattr(hf_model, "transformer", None)
    for attr in ("layers", "blocks"):
        if hasattr(inner, attr):
            return getattr(inner, attr)
    raise AttributeError("no decoder layers found")


def _find(module: Any, *names: str) -> Any:
    for n in names:
        sub = getattr(module, n, None)
        if sub is not None:
            return sub
    raise AttributeError(f"none of {names} on {type(module).__name__}")


def generic_layer(hf_model: Any, L: int) -> dict[str, Any]:
    layer = decoder_layers(hf_model)[L]
    block = _find(layer, "mlp", "block_sparse_moe", "feed_forward")
    experts = block.experts
    gu = experts.gate_up_proj.detach()
    f = gu.shape[1] // 2
    router_mod = _find(block, "gate", "router")
    out: dict[str, Any] = {
        "router": router_mod.weight.detach(),
        "gate": gu[:, :f],
        "up": gu[:, f:],
        "down": experts.down_proj.detach(),
        "shared": [],
    }
    bias = getattr(router_mod, "e_score_correction_bias", None)
    if bias is not None:
        out["score_correction_bias"] = bias.detach().reshape(-1)
    for name in ("shared_expert", "shared_experts"):
        sh = getattr(block, name, None)
        if sh is not None:
            out["shared"].append((sh.gate_proj.weight.detach(), sh.up_proj.weight.detach(), sh.down_proj.weight.detach()))
    sgate = getattr(block, "shared_expert_gate", None)
    if sgate is not None:
        out["shared_expert_gate"] = sgate.weight.detach()
    return out


def reference_layer(hf_model: Any, family: str, L: int) -> dict[str, Any]:
    return SPECIAL.get(family, generic_layer)(hf_model, L)
