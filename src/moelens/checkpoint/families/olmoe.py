"""OLMoE and FlexOlmo: every layer MoE, router ``mlp.gate.weight``, experts laid out like
Qwen-MoE's (``mlp.experts.{e}.{gate,up,down}_proj`` or fused ``mlp.experts.gate_up_proj``)."""

from __future__ import annotations

from moelens.checkpoint.families.base import StandardFamily
from moelens.checkpoint.families.qwen import QWEN_EXPERT_LAYOUTS
from moelens.checkpoint.registry import register


@register
class Olmoe(StandardFamily):
    name = "olmoe"
    architectures = ("OlmoeForCausalLM",)
    model_types = ("olmoe",)
    tiny_layouts = ("per_expert", "fused")
    router_weight = "mlp.gate.weight"
    expert_layouts = QWEN_EXPERT_LAYOUTS

    @classmethod
    def tiny_config(cls):
        from transformers import OlmoeConfig

        return OlmoeConfig(
            vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            num_experts=4, num_experts_per_tok=2, pad_token_id=1, bos_token_id=None, eos_token_id=2,
        )


@register
class FlexOlmo(Olmoe):
    name = "flex_olmo"
    architectures = ("FlexOlmoForCausalLM",)
    model_types = ("flex_olmo",)

    @classmethod
    def tiny_config(cls):
        from transformers import FlexOlmoConfig

        return FlexOlmoConfig(
            vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            num_experts=4, num_experts_per_tok=2, pad_token_id=1, bos_token_id=None, eos_token_id=2,
        )
