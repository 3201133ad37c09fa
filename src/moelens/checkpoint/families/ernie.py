"""ERNIE-4.5 MoE (``Ernie4_5_MoeForCausalLM``).

Experts and shared experts are laid out like DeepSeek's (the shared MLP is
``moe_num_shared_experts`` experts wide). The score-correction bias is
``mlp.moe_statics.e_score_correction_bias`` [1, E] on the Hub and
``mlp.gate.moe_statics.e_score_correction_bias`` in the transformers v5 layout.
A layer ``i`` is MoE when ``(i + 1) % moe_layer_interval == 0`` and
``moe_layer_start_index <= i <= moe_layer_end_index`` (an end of -1 means the last layer).
"""

from __future__ import annotations

from typing import Optional

from moelens.checkpoint.families.base import StandardFamily
from moelens.checkpoint.families.deepseek import SHARED_EXPERTS
from moelens.checkpoint.families.qwen import QWEN_EXPERT_LAYOUTS
from moelens.checkpoint.registry import register


@register
class Ernie45Moe(StandardFamily):
    name = "ernie4_5_moe"
    architectures = ("Ernie4_5_MoeForCausalLM",)
    model_types = ("ernie4_5_moe",)
    tiny_layouts = ("per_expert", "fused")
    router_weight = "mlp.gate.weight"
    score_correction_bias = ("mlp.moe_statics.e_score_correction_bias", "mlp.gate.moe_statics.e_score_correction_bias")
    expert_layouts = QWEN_EXPERT_LAYOUTS
    shared_expert_layouts = (SHARED_EXPERTS,)

    def moe_layer_indices(self) -> list[int]:
        if self.config_n_experts() <= 0:
            return []
        n = self.n_layers()
        start = int(self.config.get("moe_layer_start_index", 1) or 0)  # defaults: transformers'
        end = self.config.get("moe_layer_end_index", -1)
        end = n - 1 if end is None or int(end) == -1 else int(end)
        interval = int(self.config.get("moe_layer_interval") or 1)
        return [i for i in range(n) if (i + 1) % interval == 0 and start <= i <= end]

    def n_shared_experts(self) -> int:
        return int(self.config.get("moe_num_shared_experts") or 0)

    def config_shared_expert_ffn(self) -> Optional[int]:
        # one MLP standing for moe_num_shared_experts experts side by side
        f = self.config_expert_ffn()
        return f * self.n_shared_experts() if f and self.n_shared_experts() else None

    @classmethod
    def tiny_config(cls):
        from transformers import Ernie4_5_MoeConfig

        # all three parts of the rule matter: MoE layers 1 and 3 (interval 2 from layer 1,
        # layer 5 cut by the end index 4); dense layers 0, 2, 4, 5
        return Ernie4_5_MoeConfig(
            vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            moe_num_experts=4, moe_k=2, moe_intermediate_size=24, moe_num_shared_experts=2,
            moe_layer_start_index=1, moe_layer_end_index=4, moe_layer_interval=2,
        )
