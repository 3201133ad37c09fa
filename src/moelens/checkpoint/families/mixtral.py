"""Mixtral, MiniMax, MiniMax-M2 and PhiMoE: ``block_sparse_moe`` with experts ``w1`` (gate),
``w3`` (up), ``w2`` (down), one tensor per expert on the Hub; transformers v5 can also save the
fused ``experts.gate_up_proj`` [E, 2F, d] / ``experts.down_proj`` [E, d, F]."""

from __future__ import annotations

from moelens.checkpoint.families.base import FusedGateUp, PerExpert, StandardFamily
from moelens.checkpoint.registry import register

MIXTRAL_LAYOUTS = (
    PerExpert(
        gate="block_sparse_moe.experts.{e}.w1.weight",
        up="block_sparse_moe.experts.{e}.w3.weight",
        down="block_sparse_moe.experts.{e}.w2.weight",
    ),
    FusedGateUp(gate_up="block_sparse_moe.experts.gate_up_proj", down="block_sparse_moe.experts.down_proj"),
    # transformers v5 names the fused module under ``mlp`` for some of these families
    FusedGateUp(gate_up="mlp.experts.gate_up_proj", down="mlp.experts.down_proj"),
)


@register
class Mixtral(StandardFamily):
    name = "mixtral"
    architectures = ("MixtralForCausalLM",)
    model_types = ("mixtral",)
    tiny_layouts = ("per_expert", "fused")
    router_weight = ("block_sparse_moe.gate.weight", "mlp.gate.weight")
    expert_layouts = MIXTRAL_LAYOUTS

    @classmethod
    def tiny_config(cls):
        from transformers import MixtralConfig

        return MixtralConfig(
            vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
            max_position_embeddings=64,
        )
