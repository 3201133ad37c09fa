"""What transformers itself loads, arranged like the moelens view, for equivalence tests.

``reference_layer(hf_model, family, L)`` returns a dict with ``router`` [E, d] (and optional
``router_bias``, ``score_correction_bias``), ``gate``/``up`` [E, F, d] and ``down`` [E, d, F]
(and optional expert biases ``gate_bias``/``up_bias`` [E, F], ``down_bias`` [E, d]),
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
    # the score-correction bias sits on the router (DeepSeek-V3, GLM4-MoE), on its statistics
    # module (Ernie4.5) or on the MoE block (MiniMax-M2)
    for owner in (router_mod, getattr(router_mod, "moe_statics", None), block):
        bias = getattr(owner, "e_score_correction_bias", None)
        if bias is not None:
            out["score_correction_bias"] = bias.detach().reshape(-1)
            break
    for name in ("shared_expert", "shared_experts"):
        sh = getattr(block, name, None)
        if sh is not None:
            out["shared"].append((sh.gate_proj.weight.detach(), sh.up_proj.weight.detach(), sh.down_proj.weight.detach()))
    sgate = getattr(block, "shared_expert_gate", None)
    if sgate is not None:
        out["shared_expert_gate"] = sgate.weight.detach()
    return out


def _split_in_out(gate_up: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, d, 2F] ([in, out]) -> gate, up as [E, F, d]."""
    if interleaved:
        gate, up = gate_up[:, :, 0::2], gate_up[:, :, 1::2]
    else:
        f = gate_up.shape[2] // 2
        gate, up = gate_up[:, :, :f], gate_up[:, :, f:]
    return gate.transpose(1, 2), up.transpose(1, 2)


def gpt_oss_layer(hf_model: Any, L: int) -> dict[str, Any]:
    """GPT-OSS: [in, out] experts, gate = even columns, biases on router and experts."""
    block = decoder_layers(hf_model)[L].mlp
    experts = block.experts
    gate, up = _split_in_out(experts.gate_up_proj.detach(), interleaved=True)
    gate_up_bias = experts.gate_up_proj_bias.detach()
    return {
        "router": block.router.weight.detach(),
        "router_bias": block.router.bias.detach(),
        "gate": gate,
        "up": up,
        "down": experts.down_proj.detach().transpose(1, 2),
        "gate_bias": gate_up_bias[:, 0::2],
        "up_bias": gate_up_bias[:, 1::2],
        "down_bias": experts.down_proj_bias.detach(),
        "shared": [],
    }


def llama4_layer(hf_model: Any, L: int) -> dict[str, Any]:
    """Llama4: [in, out] experts, gate = first half of the columns, one shared expert."""
    block = decoder_layers(hf_model)[L].feed_forward
    gate, up = _split_in_out(block.experts.gate_up_proj.detach(), interleaved=False)
    sh = block.shared_expert
    return {
        "router": block.router.weight.detach(),
        "gate": gate,
        "up": up,
        "down": block.experts.down_proj.detach().transpose(1, 2),
        "shared": [(sh.gate_proj.weight.detach(), sh.up_proj.weight.detach(), sh.down_proj.weight.detach())],
    }


def granite_layer(hf_model: Any, L: int) -> dict[str, Any]:
    """Granite-MoE (+Shared): generic experts; the shared MLP fuses gate and up (gate first)."""
    out = generic_layer(hf_model, L)
    shared = getattr(decoder_layers(hf_model)[L], "shared_mlp", None)
    if shared is not None:
        gate_up = shared.input_linear.weight.detach()
        f = gate_up.shape[0] // 2
        out["shared"].append((gate_up[:f], gate_up[f:], shared.output_linear.weight.detach()))
    return out


def jetmoe_layer(hf_model: Any, L: int) -> dict[str, Any]:
    """JetMoE: ``input_linear`` [E, 2F, d] (gate first), ``output_linear`` [E, d, F]."""
    block = decoder_layers(hf_model)[L].mlp
    gate_up = block.input_linear.weight.detach()
    f = gate_up.shape[1] // 2
    return {
        "router": block.router.layer.weight.detach(),
        "gate": gate_up[:, :f],
        "up": gate_up[:, f:],
        "down": block.output_linear.weight.detach(),
        "shared": [],
    }


def dbrx_layer(hf_model: Any, L: int) -> dict[str, Any]:
    """DBRX: experts stacked along rows, [E·F, d]; each expert's w2 rows are [in, out]."""
    block = decoder_layers(hf_model)[L].ffn
    router = block.router.layer.weight.detach()
    mlp = block.experts.mlp
    shape = (router.shape[0], -1, router.shape[1])
    return {
        "router": router,
        "gate": mlp.w1.detach().view(shape),
        "up": mlp.v1.detach().view(shape),
        "down": mlp.w2.detach().view(shape).transpose(1, 2),
        "shared": [],
    }


SPECIAL.update({
    "gpt_oss": gpt_oss_layer,
    "llama4": llama4_layer,
    "granitemoe": granite_layer,
    "granitemoeshared": granite_layer,
    "granitemoehybrid": granite_layer,
    "jetmoe": jetmoe_layer,
    "dbrx": dbrx_layer,
})


def hf_moe_layer_indices(hf_model: Any) -> list[int]:
    """The decoder layers transformers built with routed experts: a layer holds a module named
    ``experts`` or a fused 3-D expert weight (Granite, JetMoE), a convolution's 3-D kernel aside."""
    out = []
    for i, layer in enumerate(decoder_layers(hf_model)):
        has_experts = any(name.rsplit(".", 1)[-1] == "experts" for name, _ in layer.named_modules())
        fused = any(
            p.ndim == 3 and not isinstance(m, torch.nn.modules.conv._ConvNd)
            for m in layer.modules()
            for p in m.parameters(recurse=False)
        )
        if has_experts or fused:
            out.append(i)
    return out


def reference_layer(hf_model: Any, family: str, L: int) -> dict[str, Any]:
    return SPECIAL.get(family, generic_layer)(hf_model, L)
