"""Dense decoders (Llama, Mistral, Qwen2, Qwen3): no MoE layer at all.

They open like any checkpoint so that dense baselines (and the dense models MoE models were
upcycled from) can be read with the same API: ``model.is_moe`` is False,
``model.moe_layers == []``, ``model.dense_mlp(i)`` and ``model.attention(i)`` read every layer,
and ``model.layer(i)`` raises :class:`~moelens.errors.NotMoEError`.
"""

from __future__ import annotations

from moelens.checkpoint.families.base import StandardFamily
from moelens.checkpoint.registry import register

TINY_DENSE = {
    "vocab_size": 128, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
}


class DenseFamily(StandardFamily):
    is_dense = True

    def moe_layer_indices(self) -> list[int]:
        return []


@register
class Llama(DenseFamily):
    name = "llama"
    architectures = ("LlamaForCausalLM",)
    model_types = ("llama",)

    @classmethod
    def tiny_config(cls):
        from transformers import LlamaConfig

        return LlamaConfig(**TINY_DENSE)


@register
class Mistral(DenseFamily):
    name = "mistral"
    architectures = ("MistralForCausalLM",)
    model_types = ("mistral",)

    @classmethod
    def tiny_config(cls):
        from transformers import MistralConfig

        return MistralConfig(**TINY_DENSE, head_dim=8)


@register
class Qwen2(DenseFamily):
    name = "qwen2"
    architectures = ("Qwen2ForCausalLM",)
    model_types = ("qwen2",)

    @classmethod
    def tiny_config(cls):
        from transformers import Qwen2Config

        return Qwen2Config(**TINY_DENSE)


@register
class Qwen3(DenseFamily):
    name = "qwen3"
    architectures = ("Qwen3ForCausalLM",)
    model_types = ("qwen3",)

    @classmethod
    def tiny_config(cls):
        from transformers import Qwen3Config

        return Qwen3Config(**TINY_DENSE, head_dim=8)
