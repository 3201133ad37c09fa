"""The zoo's model shapes and their transformers configs, one builder per family.

All families share one :class:`ModelShape`; each builder spells it in its family's config keys.
Load balancing is on in every family (``output_router_logits=True``), so training adds the
router's auxiliary loss times ``router_aux_loss_coef`` to the language-model loss, as the
published MoE models were trained.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moelens.errors import ConfigError


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a zoo model (the vocabulary comes from the tokenizer)."""

    hidden_size: int = 96
    expert_ffn: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    experts: int = 8
    top_k: int = 2
    router_aux_loss_coef: float = 0.02
    max_positions: int = 128


def _common(shape: ModelShape, vocab_size: int, special: dict[str, int]) -> dict[str, Any]:
    return dict(
        vocab_size=vocab_size, hidden_size=shape.hidden_size, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.hidden_size // shape.heads, max_position_embeddings=shape.max_positions,
        num_experts_per_tok=shape.top_k, output_router_logits=True,
        router_aux_loss_coef=shape.router_aux_loss_coef, tie_word_embeddings=False,
        attention_dropout=0.0, **special,
    )


def mixtral_config(shape: ModelShape, vocab_size: int, special: dict[str, int]) -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(
        intermediate_size=shape.expert_ffn, num_local_experts=shape.experts, router_jitter_noise=0.0,
        **_common(shape, vocab_size, special),
    )


def qwen3_moe_config(shape: ModelShape, vocab_size: int, special: dict[str, int]) -> Any:
    from transformers import Qwen3MoeConfig

    # Every layer sparse (decoder_sparse_step=1, no mlp_only_layers), top-k weights renormalised
    # as in Qwen3-30B-A3B.
    return Qwen3MoeConfig(
        moe_intermediate_size=shape.expert_ffn, intermediate_size=shape.expert_ffn * shape.top_k,
        num_experts=shape.experts, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
        **_common(shape, vocab_size, special),
    )


def olmoe_config(shape: ModelShape, vocab_size: int, special: dict[str, int]) -> Any:
    from transformers import OlmoeConfig

    common = _common(shape, vocab_size, special)
    common.pop("head_dim")  # OLMoE derives it from hidden_size / heads
    return OlmoeConfig(intermediate_size=shape.expert_ffn, num_experts=shape.experts, norm_topk_prob=False, **common)


CONFIG_BUILDERS: dict[str, Callable[[ModelShape, int, dict[str, int]], Any]] = {
    "mixtral": mixtral_config,
    "qwen3_moe": qwen3_moe_config,
    "olmoe": olmoe_config,
}
FAMILIES = tuple(CONFIG_BUILDERS)


def make_config(family: str, shape: ModelShape, vocab_size: int, special: dict[str, int]) -> Any:
    """The transformers config of a zoo model of ``family``; ``special`` holds the
    ``bos_token_id``, ``eos_token_id`` and ``pad_token_id``."""
    try:
        builder = CONFIG_BUILDERS[family]
    except KeyError:
        raise ConfigError(f"the zoo has no family {family!r}; choose one of {', '.join(FAMILIES)}") from None
    return builder(shape, vocab_size, special)


def make_model(family: str, shape: ModelShape, vocab_size: int, special: dict[str, int], seed: int) -> Any:
    """A freshly initialised model (float32, train mode) whose init is fixed by ``seed``."""
    import torch
    from transformers import AutoModelForCausalLM

    config = make_config(family, shape, vocab_size, special)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()
