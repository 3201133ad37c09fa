"""Any other transformers causal LM (GPT-2, GPT-J, GPT-NeoX/Pythia, Phi, Gemma, Falcon, OPT, ...),
opened for forward-pass analyses only.

A checkpoint whose ``model_type`` no family adapter knows, but which ``AutoModelForCausalLM``
loads, opens as a dense model without experts: ``moelens trace`` hooks its decoder layers,
attention and MLP modules found by name (:mod:`moelens.runtime.architecture`). Its tensors are not
read by name, so the weight-space readings (``model.attention(i)``, ``model.dense_mlp(i)``, module
metrics) raise one :class:`~moelens.errors.UnsupportedArchitectureError` saying so.

This class is not registered: :func:`moelens.checkpoint.registry.family_for_config` falls back to
it after every registered family has declined the config.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, ClassVar

from moelens.checkpoint.families.base import Family, first_key
from moelens.errors import CheckpointFormatError, UnsupportedArchitectureError

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")


def causal_lm_model_types() -> frozenset[str]:
    """Every ``model_type`` that ``AutoModelForCausalLM`` maps to a model class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


class CausalLMFamily(Family):
    """A dense causal LM read by transformers only (no tensor names known to moelens)."""

    name: ClassVar[str] = "causal_lm"
    is_dense = True
    forward_only: ClassVar[bool] = True

    @classmethod
    def accepts(cls, config: dict[str, Any]) -> bool:
        return str(config.get("model_type")) in causal_lm_model_types()

    def __init__(self, config: dict[str, Any], store: Any):
        super().__init__(config, store)
        # the family as moelens names it: transformers' own model_type (gpt2, gpt_neox, opt, ...)
        self.name = str(config.get("model_type"))  # type: ignore[misc]

    def _config_int(self, keys: tuple[str, ...], what: str) -> int:
        text = self.config.get("text_config") if isinstance(self.config.get("text_config"), dict) else self.config
        value = first_key(text, keys)
        if not isinstance(value, int) or value <= 0:
            raise CheckpointFormatError(f"config.json of this {self.name} checkpoint states no {what} ({' or '.join(keys)})")
        return value

    def n_layers(self) -> int:
        return self._config_int(LAYER_KEYS, "number of layers")

    def hidden_size(self) -> int:
        return self._config_int(HIDDEN_KEYS, "hidden size")

    def moe_layer_indices(self) -> list[int]:
        return []

    def expert_dtype(self) -> str:
        """The most common stored dtype (there are no experts; ``inspect`` shows the weights')."""
        counts = Counter(info.dtype for info in self.store.infos.values())
        return counts.most_common(1)[0][0] if counts else "?"

    def _weights_unsupported(self) -> UnsupportedArchitectureError:
        return UnsupportedArchitectureError(
            f"{self.name} checkpoints are opened for forward-pass analyses only (moelens trace); reading their "
            "weights (attention, MLP, module metrics) needs a family moelens knows: see `moelens families`")

    def check_weights_readable(self) -> None:
        raise self._weights_unsupported()

    def attention(self, L: int) -> dict[str, Any]:
        raise self._weights_unsupported()

    def dense_mlp(self, L: int) -> dict[str, Any]:
        raise self._weights_unsupported()


def tiny_causal_lm_config(model_type: str, vocab_size: int = 128, layers: int = 2, special: dict[str, int] | None = None) -> Any:
    """A transformers config of a tiny model (hidden 32, 4 heads, ``layers`` layers) of one of the
    forward-only families the tests build: gpt2, gptj, gpt_neox, phi, gemma, falcon, opt.
    ``special``: bos/eos/pad token ids (default 1, 2, 0)."""
    import transformers as tf

    v, d, heads, ffn, positions = vocab_size, 32, 4, 48, 64
    special = special or {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    builders = {
        "gpt2": lambda: tf.GPT2Config(vocab_size=v, n_embd=d, n_layer=layers, n_head=heads, n_positions=positions, **special),
        "gptj": lambda: tf.GPTJConfig(vocab_size=v, n_embd=d, n_layer=layers, n_head=heads, n_positions=positions, rotary_dim=4, **special),
        "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=v, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                                             intermediate_size=ffn, max_position_embeddings=positions, **special),
        "phi": lambda: tf.PhiConfig(vocab_size=v, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                                    intermediate_size=ffn, max_position_embeddings=positions, **special),
        "gemma": lambda: tf.GemmaConfig(vocab_size=v, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                                        num_key_value_heads=2, head_dim=8, intermediate_size=ffn, max_position_embeddings=positions, **special),
        "falcon": lambda: tf.FalconConfig(vocab_size=v, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                                          max_position_embeddings=positions, **special),
        "opt": lambda: tf.OPTConfig(vocab_size=v, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
                                    max_position_embeddings=positions, word_embed_proj_dim=d, **special),
    }
    if model_type not in builders:
        raise KeyError(f"no tiny config for {model_type!r}; known: {', '.join(builders)}")
    return builders[model_type]()


#: The forward-only families the tests build tiny checkpoints of.
TINY_CAUSAL_LMS = ("falcon", "gemma", "gpt2", "gpt_neox", "gptj", "opt", "phi")
