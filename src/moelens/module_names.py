"""The names of a layer's modules (docs/methods.md §5), shared by the module-metrics analysis and its
figures. A leaf module: it imports nothing.

============  ===========================================================================
module        what it is, per family
============  ===========================================================================
attn.q        query projection [heads·head_dim, d] (DBRX: rows of the fused Wqkv)
attn.k        key projection (JetMoE: its one shared k)
attn.v        value projection (JetMoE: its one shared v)
attn.o        output projection [d, heads·head_dim]
attn.q_a      DeepSeek MLA with q-LoRA: q_a_proj [q_lora_rank, d]
attn.q_b      DeepSeek MLA with q-LoRA: q_b_proj [heads·qk_head_dim, q_lora_rank]
attn.kv_a     DeepSeek MLA: kv_a_proj_with_mqa [kv_lora_rank + rope_dim, d]
attn.kv_b     DeepSeek MLA: kv_b_proj [heads·(nope + v), kv_lora_rank]
mlp.gate      dense MLP gate [F, d]; an MoE layer: the mean over its routed experts
mlp.up        dense MLP up [F, d]; MoE: mean over routed experts
mlp.down      dense MLP down [d, F]; MoE: mean over routed experts
shared.gate   the shared expert's gate (Qwen2-MoE, DeepSeek — its n shared experts stored as
shared.up     one wide MLP —, Llama 4, Granite-MoE-Shared); ``shared1.*``, … for a second
shared.down   shared expert where a family stores several
router        the router G [E, d]
============  ===========================================================================

A module a layer lacks is simply absent from its rows: Mamba layers (Jamba) and linear-attention
layers (Qwen3-Next) have no ``attn.*``; GPT-OSS's attention sinks are one number per head, not a
matrix, and are not reported.
"""

from __future__ import annotations

ROLES = ("gate", "up", "down")
ATTENTION = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "o": "attn.o",
             "q_a": "attn.q_a", "q_b": "attn.q_b", "kv_a": "attn.kv_a", "kv_b": "attn.kv_b"}
#: The seed figure's column order; other modules follow in this order.
MODULE_ORDER = ("attn.q", "attn.k", "attn.v", "attn.o", "attn.q_a", "attn.q_b", "attn.kv_a", "attn.kv_b",
                "mlp.up", "mlp.down", "mlp.gate", "shared.up", "shared.down", "shared.gate", "router")


def mlp_module(role: str) -> str:
    return f"mlp.{role}"


def shared_module(index: int, role: str) -> str:
    return f"shared.{role}" if index == 0 else f"shared{index}.{role}"


def module_rank(module: str) -> tuple[int, str]:
    """Sort key: the seed's order first, anything else after, alphabetically."""
    return (MODULE_ORDER.index(module), "") if module in MODULE_ORDER else (len(MODULE_ORDER), module)


__all__ = ["ATTENTION", "MODULE_ORDER", "ROLES", "mlp_module", "module_rank", "shared_module"]
