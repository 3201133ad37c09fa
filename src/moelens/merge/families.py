"""Where a merge finds each family's routed experts in a transformers (v5) model in memory.

transformers 5 keeps a layer's routed experts fused: ``<block>.experts.gate_up_proj`` [E, 2F, d]
(gate = rows [:F], up = rows [F:]) and ``<block>.experts.down_proj`` [E, d, F], the router's
rows in ``<block>.<router>.weight`` [E, d]. The families below have exactly that form (checked
by building each one's tiny model); others (GPT-OSS's interleaved [E, d, 2F] with biases,
Llama4's [in, out] experts, DBRX, Granite, Jamba, …) are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from moelens.errors import ConfigError, UnsupportedArchitectureError


@dataclass(frozen=True)
class MergeLayout:
    """One family's routed experts in memory.

    ``block``: attribute of a decoder layer holding the MoE block; ``router``: attribute of the
    block holding the router (``weight`` [E, d]); ``experts_key``: the config key of the number
    of routed experts; ``score_bias``: dotted path inside the block of the [E] score-correction
    bias (DeepSeek-V3, GLM4-MoE); ``grouped``: routing first picks ``topk_group`` of ``n_group``
    groups of experts (so a compact G must split into equal groups)."""

    family: str
    experts_key: str
    block: str = "mlp"
    router: str = "gate"
    score_bias: Optional[str] = None
    grouped: bool = False


LAYOUTS = {
    layout.family: layout
    for layout in (
        MergeLayout("mixtral", "num_local_experts"),
        MergeLayout("qwen2_moe", "num_experts"),
        MergeLayout("qwen3_moe", "num_experts"),
        MergeLayout("olmoe", "num_experts"),
        MergeLayout("flex_olmo", "num_experts"),
        MergeLayout("deepseek_v2", "n_routed_experts", grouped=True),
        MergeLayout("deepseek_v3", "n_routed_experts", score_bias="gate.e_score_correction_bias", grouped=True),
        MergeLayout("glm4_moe", "n_routed_experts", score_bias="gate.e_score_correction_bias", grouped=True),
    )
}


def merge_layout(family: str) -> MergeLayout:
    """The layout of ``family`` (a :mod:`moelens.checkpoint` family name), or a clear error."""
    try:
        return LAYOUTS[family]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"merging experts is not supported for the {family!r} family; supported: {', '.join(sorted(LAYOUTS))}"
        ) from None


def is_grouped(layout: MergeLayout, config: dict[str, Any]) -> bool:
    """Whether routing goes through groups of experts (DeepSeek-V2 only with
    ``topk_method = "group_limited_greedy"``; V3 and GLM4-MoE always)."""
    if not layout.grouped:
        return False
    if layout.family == "deepseek_v2":
        return config.get("topk_method", "greedy") == "group_limited_greedy"
    return True


def compact_problems(layout: MergeLayout, config: dict[str, Any], groups: int, top_k: int) -> list[str]:
    """Why a checkpoint with ``groups`` routed experts per layer would not route ([] if it would):
    G ≥ top-k, and for grouped routing n_group | G, at least 2 experts per group (V3 and GLM
    score a group by its top two) and topk_group groups holding at least top-k experts."""
    out = []
    if groups < top_k:
        out.append(f"{groups} experts per layer are fewer than the {top_k} the router picks per token (top-k)")
    if is_grouped(layout, config):
        n_group = int(config.get("n_group") or 1)
        topk_group = int(config.get("topk_group") or 1)
        if groups % n_group:
            out.append(f"{groups} experts do not split into the router's n_group = {n_group} equal groups")
        else:
            per_group = groups // n_group
            if layout.family != "deepseek_v2" and per_group < 2:
                out.append(f"{groups} experts leave {per_group} per group, where the router scores each group by its top 2")
            if topk_group * per_group < top_k:
                out.append(f"topk_group = {topk_group} groups of {per_group} experts hold fewer than top-k = {top_k}")
    return out


def decoder_layers(model: Any) -> Any:
    """The model's decoder layers (``model.model.layers``)."""
    try:
        return model.model.layers
    except AttributeError:
        raise UnsupportedArchitectureError(f"{type(model).__name__} has no model.layers; merging cannot find its decoder layers") from None


def moe_block(model: Any, layout: MergeLayout, layer: int) -> Any:
    """Layer ``layer``'s MoE block, checked to hold fused experts and a router."""
    block = getattr(decoder_layers(model)[layer], layout.block, None)
    experts = getattr(block, "experts", None)
    router = getattr(block, layout.router, None)
    if experts is None or router is None or getattr(experts, "gate_up_proj", None) is None or getattr(router, "weight", None) is None:
        raise UnsupportedArchitectureError(
            f"layer {layer} of this {layout.family} model holds no {layout.block}.experts.gate_up_proj and "
            f"{layout.block}.{layout.router}.weight; the installed transformers lays the family out differently"
        )
    e = router.weight.shape[0]
    if experts.gate_up_proj.ndim != 3 or experts.gate_up_proj.shape[0] != e or experts.down_proj.shape[0] != e:
        raise UnsupportedArchitectureError(f"layer {layer}: fused experts {list(experts.gate_up_proj.shape)} do not match a router of {e} rows")
    return block


def get_path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def set_path(obj: Any, dotted: str, value: torch.Tensor) -> None:
    *head, last = dotted.split(".")
    for part in head:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def check_family_config(layout: MergeLayout, config: Any) -> None:
    """The transformers config must spell the expert count under ``layout.experts_key``."""
    if getattr(config, layout.experts_key, None) is None:
        raise ConfigError(f"this {layout.family} config has no {layout.experts_key!r}; cannot write the merged expert count")
