"""Mixtral, MiniMax, MiniMax-M2 and PhiMoE: ``block_sparse_moe`` with experts ``w1`` (gate),
``w3`` (up), ``w2`` (down), one tensor per expert on the Hub; transformers v5 can also save the
fused ``mlp.experts.gate_up_proj`` [E, 2F, d] / ``mlp.experts.down_proj`` [E, d, F], and then
renames the block ``mlp`` (and PhiMoE's router ``mlp.router``). Every layer is MoE."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moelens.checkpoint.families.base import StandardFamily
from moelens.checkpoint.families.layouts import FusedGateUp, PerExpert
from moelens.checkpoint.registry import register

if TYPE_CHECKING:  # torch is imported where tensors are made, not when a family is listed
    import torch

MIXTRAL_LAYOUTS = (
    PerExpert(
        gate="block_sparse_moe.experts.{e}.w1.weight",
        up="block_sparse_moe.experts.{e}.w3.weight",
        down="block_sparse_moe.experts.{e}.w2.weight",
    ),
    FusedGateUp(gate_up="block_sparse_moe.experts.gate_up_proj", down="block_sparse_moe.experts.down_proj"),
    # transformers v5 names the fused module ``mlp``
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


@register
class MiniMax(Mixtral):
    """MiniMax-Text-01: Mixtral's experts; attention alternates between softmax attention
    (``q_proj``…) and lightning (linear) attention, whose ``qkv_proj`` packs q, k and v per head."""

    name = "minimax"
    architectures = ("MiniMaxForCausalLM",)
    model_types = ("minimax",)

    def attention(self, L: int) -> dict[str, torch.Tensor]:
        out = super().attention(L)
        qkv = self._full("self_attn.qkv_proj.weight", L)
        if out or qkv not in self.store:
            return out
        return self._lightning_attention(L, self.store.read(qkv))

    def _lightning_attention(self, L: int, qkv: torch.Tensor) -> dict[str, torch.Tensor]:
        # transformers reshapes the qkv output to [heads, 3 * head_dim] and splits the last axis
        # into q, k, v, so the rows are grouped per head, not per role.
        heads = int(self.config["num_attention_heads"])
        head_dim = qkv.shape[0] // (3 * heads)
        per_head = qkv.reshape(heads, 3, head_dim, qkv.shape[1])
        out = {role: per_head[:, i].reshape(heads * head_dim, -1).contiguous() for i, role in enumerate("qkv")}
        out["o"] = self.store.read(self._full("self_attn.out_proj.weight", L))
        return out

    @classmethod
    def tiny_config(cls):
        from transformers import MiniMaxConfig

        # block_size shrinks the lightning-attention decay buffers saved with the weights
        return MiniMaxConfig(
            vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
            num_experts_per_tok=2, max_position_embeddings=64, block_size=16,
            bos_token_id=1, eos_token_id=2,
        )


@register
class MiniMaxM2(Mixtral):
    """MiniMax-M2: Mixtral's experts plus an ``e_score_correction_bias`` [E] used for top-k
    selection only (sigmoid routing)."""

    name = "minimax_m2"
    architectures = ("MiniMaxM2ForCausalLM",)
    model_types = ("minimax_m2",)
    score_correction_bias = ("block_sparse_moe.e_score_correction_bias", "mlp.e_score_correction_bias")

    @classmethod
    def tiny_config(cls):
        from transformers import MiniMaxM2Config

        return MiniMaxM2Config(
            vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
            num_experts_per_tok=2, max_position_embeddings=64,
        )


@register
class PhiMoE(Mixtral):
    """Phi-3.5-MoE: Mixtral's layout; the fused v5 layout calls the router ``mlp.router``."""

    name = "phimoe"
    # the Hub config spells the class PhiMoE, transformers Phimoe
    architectures = ("PhiMoEForCausalLM", "PhimoeForCausalLM")
    model_types = ("phimoe",)
    router_weight = ("block_sparse_moe.gate.weight", "mlp.router.weight")

    @classmethod
    def tiny_config(cls):
        from transformers import PhimoeConfig

        return PhimoeConfig(
            vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
            max_position_embeddings=64,
        )
