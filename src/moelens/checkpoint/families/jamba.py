"""Jamba (AI21): a hybrid of Mamba and attention layers whose feed-forward blocks are called
``feed_forward``. Layer ``i`` is MoE (router ``feed_forward.router.weight``, experts
``feed_forward.experts.{e}.{gate,up,down}_proj`` or fused ``feed_forward.experts.gate_up_proj``)
when ``i % expert_layer_period == expert_layer_offset``, dense otherwise. Only layers with
``i % attn_layer_period == attn_layer_offset`` have attention; the Mamba layers have none."""

from __future__ import annotations

from typing import ClassVar

from moelens.checkpoint.families.base import StandardFamily
from moelens.checkpoint.families.layouts import FusedGateUp, PerExpert
from moelens.checkpoint.registry import register


@register
class Jamba(StandardFamily):
    name = "jamba"
    architectures = ("JambaForCausalLM",)
    model_types = ("jamba",)
    tiny_layouts = ("per_expert", "fused")
    router_weight = "feed_forward.router.weight"
    expert_layouts = (
        PerExpert(
            gate="feed_forward.experts.{e}.gate_proj.weight",
            up="feed_forward.experts.{e}.up_proj.weight",
            down="feed_forward.experts.{e}.down_proj.weight",
        ),
        FusedGateUp(gate_up="feed_forward.experts.gate_up_proj", down="feed_forward.experts.down_proj"),
    )
    dense_mlp_names: ClassVar[dict[str, str]] = {
        "gate": "feed_forward.gate_proj.weight",
        "up": "feed_forward.up_proj.weight",
        "down": "feed_forward.down_proj.weight",
    }

    def moe_layer_indices(self) -> list[int]:
        # transformers builds a dense MLP wherever the layer would have a single expert
        if self.config_n_experts() <= 1:
            return []
        period = int(self.config.get("expert_layer_period", 2))  # defaults: transformers'
        offset = int(self.config.get("expert_layer_offset", 1))
        return [i for i in range(self.n_layers()) if i % period == offset]

    def expert_dtype(self) -> str:
        moe = self.moe_layer_indices()
        if moe:
            return super().expert_dtype()
        # the first layer may be a Mamba layer without attention: ask a dense MLP instead
        return self.store.dtype(self._full(self.dense_mlp_names["up"], 0))

    @classmethod
    def tiny_config(cls):
        from transformers import JambaConfig

        # experts on layers 0 and 2, attention on layers 1 and 3 (Mamba on 0 and 2)
        return JambaConfig(
            vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            num_experts=4, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=0,
            attn_layer_period=2, attn_layer_offset=1,
            mamba_d_state=4, mamba_d_conv=2, mamba_expand=2, mamba_dt_rank=4,
        )
