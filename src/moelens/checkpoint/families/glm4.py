"""GLM-4.5 / GLM-4.6 (``Glm4MoeForCausalLM``): DeepSeek-V3's MoE block (dense first layers,
router with ``e_score_correction_bias``, shared experts ``mlp.shared_experts``) with ordinary
q/k/v/o attention. Like DeepSeek-V3, the Hub files hold the multi-token-prediction module as an
extra layer ``num_hidden_layers``, which moelens never reads."""

from __future__ import annotations

from moelens.checkpoint.families.deepseek import DenseFirstFamily
from moelens.checkpoint.registry import register


@register
class Glm4Moe(DenseFirstFamily):
    name = "glm4_moe"
    architectures = ("Glm4MoeForCausalLM",)
    model_types = ("glm4_moe",)
    score_correction_bias = "mlp.gate.e_score_correction_bias"
    default_first_k_dense = 1

    @classmethod
    def tiny_config(cls):
        from transformers import Glm4MoeConfig

        return Glm4MoeConfig(
            vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
            n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, n_shared_experts=1,
            first_k_dense_replace=1, n_group=1, topk_group=1,
        )
