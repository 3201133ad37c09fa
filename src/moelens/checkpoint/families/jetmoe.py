"""JetMoE: experts fused on disk in [out, in] orientation, in the MLP and in the attention.

Under ``model.layers.{L}.mlp``: ``router.layer.weight`` [E, d]; ``input_linear.weight``
[E, 2F, d] (gate = the first F rows); ``output_linear.weight`` [E, d, F]; ``bias`` [d] is added
once to the mixture's output, so it belongs to no expert and is not an expert bias.

Attention is a mixture too (MoA): ``self_attention.experts.input_linear`` holds one query
projection per attention expert and ``output_linear`` one output projection each, while the
keys and values are shared, ``self_attention.kv_proj.weight`` [2·kv, d] (keys first).
:meth:`attention` returns ``k`` and ``v``; the per-expert ``q`` and ``o`` are not single
matrices and are left out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moelens.checkpoint.families.base import StandardFamily
from moelens.checkpoint.families.layouts import FusedGateUp, check_finite
from moelens.checkpoint.registry import register

if TYPE_CHECKING:  # torch is imported where tensors are made, not when a family is listed
    import torch


@register
class JetMoe(StandardFamily):
    name = "jetmoe"
    architectures = ("JetMoeForCausalLM",)
    model_types = ("jetmoe",)
    tiny_layouts = ("fused",)
    router_weight = "mlp.router.layer.weight"
    expert_layouts = (FusedGateUp(gate_up="mlp.input_linear.weight", down="mlp.output_linear.weight"),)

    def attention(self, L: int) -> dict[str, torch.Tensor]:
        name = self._full("self_attention.kv_proj.weight", L)
        kv = check_finite(name, self.store.read(name))
        k, v = kv.chunk(2, dim=0)
        return {"k": k.contiguous(), "v": v.contiguous()}

    @classmethod
    def tiny_config(cls):
        from transformers import JetMoeConfig

        return JetMoeConfig(
            vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, kv_channels=8, num_local_experts=4,
            num_experts_per_tok=2, max_position_embeddings=64,
        )
