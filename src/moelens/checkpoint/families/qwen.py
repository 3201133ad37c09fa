"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B), Qwen3-MoE and Qwen3-Next.

Experts are ``mlp.experts.{e}.{gate,up,down}_proj`` on the Hub, fused ``mlp.experts.gate_up_proj``
/ ``down_proj`` when transformers v5 saves its in-memory layout. Qwen2-MoE and Qwen3-Next add one
shared expert ``mlp.shared_expert`` whose output is scaled by ``sigmoid(shared_expert_gate · x)``.
A layer is MoE when it is not listed in ``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step
== 0``; the other layers hold a dense ``mlp.{gate,up,down}_proj``.
"""

from __future__ import annotations

from typing import Optional

from moelens.checkpoint.families.base import StandardFamily
from moelens.checkpoint.families.layouts import FusedGateUp, PerExpert
from moelens.checkpoint.registry import register

QWEN_EXPERT_LAYOUTS = (
    PerExpert(
        gate="mlp.experts.{e}.gate_proj.weight",
        up="mlp.experts.{e}.up_proj.weight",
        down="mlp.experts.{e}.down_proj.weight",
    ),
    FusedGateUp(gate_up="mlp.experts.gate_up_proj", down="mlp.experts.down_proj"),
)


class QwenMoeRule(StandardFamily):
    """The MoE-layer rule Qwen2-MoE and Qwen3-MoE share."""

    router_weight = "mlp.gate.weight"
    expert_layouts = QWEN_EXPERT_LAYOUTS
    tiny_layouts = ("per_expert", "fused")

    def moe_layer_indices(self) -> list[int]:
        if self.config_n_experts() <= 0:
            return []
        dense = set(self.config.get("mlp_only_layers") or [])
        step = int(self.config.get("decoder_sparse_step") or 1)
        return [i for i in range(self.n_layers()) if i not in dense and (i + 1) % step == 0]


@register
class Qwen2Moe(QwenMoeRule):
    name = "qwen2_moe"
    architectures = ("Qwen2MoeForCausalLM",)
    model_types = ("qwen2_moe",)
    shared_expert_layouts = (
        PerExpert(
            gate="mlp.shared_expert.gate_proj.weight",
            up="mlp.shared_expert.up_proj.weight",
            down="mlp.shared_expert.down_proj.weight",
        ),
    )
    shared_gate_weight = "mlp.shared_expert_gate.weight"

    def n_shared_experts(self) -> int:
        return 1 if int(self.config.get("shared_expert_intermediate_size") or 0) > 0 else 0

    def config_shared_expert_ffn(self) -> Optional[int]:
        f = int(self.config.get("shared_expert_intermediate_size") or 0)
        return f if f > 0 else None

    @classmethod
    def tiny_config(cls):
        from transformers import Qwen2MoeConfig

        # layer 2 is dense through mlp_only_layers: MoE layers 0, 1, 3
        return Qwen2MoeConfig(
            vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
            shared_expert_intermediate_size=40, decoder_sparse_step=1, mlp_only_layers=[2],
        )


@register
class Qwen3Moe(QwenMoeRule):
    name = "qwen3_moe"
    architectures = ("Qwen3MoeForCausalLM",)
    model_types = ("qwen3_moe",)

    @classmethod
    def tiny_config(cls):
        from transformers import Qwen3MoeConfig

        # decoder_sparse_step=2: MoE layers 1, 3; dense layers 0, 2
        return Qwen3MoeConfig(
            vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=2,
        )


@register
class Qwen3Next(Qwen2Moe):
    """Qwen3-Next: Qwen2-MoE's MoE block (shared expert and its gate, same layer rule). Most
    layers use linear attention (``linear_attn.*``), for which :meth:`attention` returns {}; the
    ``q_proj`` of the full-attention layers packs each head's query with its output gate."""

    name = "qwen3_next"
    architectures = ("Qwen3NextForCausalLM",)
    model_types = ("qwen3_next",)

    @classmethod
    def tiny_config(cls):
        from transformers import Qwen3NextConfig

        # layers 0-2 linear attention, 3 full attention; layer 1 dense through mlp_only_layers
        return Qwen3NextConfig(
            vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
            shared_expert_intermediate_size=40, decoder_sparse_step=1, mlp_only_layers=[1],
            linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
            linear_value_head_dim=8, linear_conv_kernel_dim=2,
        )
