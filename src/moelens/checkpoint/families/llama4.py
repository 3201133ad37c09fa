"""Llama 4 (Scout, Maverick): experts fused on disk in [in, out] orientation, one shared expert,
MoE and dense layers interleaved.

Under ``model.layers.{L}.feed_forward``: ``router.weight`` [E, d]; ``experts.gate_up_proj``
[E, d, 2F] with gate = the first F columns; ``experts.down_proj`` [E, F, d];
``shared_expert.{gate,up,down}_proj.weight`` in [out, in]. A dense layer has
``feed_forward.{gate,up,down}_proj.weight`` (width ``intermediate_size_mlp``). MoE layers are
``moe_layers`` when the config lists them, else every ``interleave_moe_layer_step``-th layer.

The published checkpoints are multimodal (``Llama4ForConditionalGeneration``): the language
model's settings sit under ``text_config`` and its tensors under ``language_model.model.``; this
adapter reads both that form and the text-only ``Llama4ForCausalLM``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Optional

from moelens.checkpoint.families.base import StandardFamily
from moelens.checkpoint.families.layouts import FusedGateUp, PerExpert
from moelens.checkpoint.registry import register
from moelens.checkpoint.store import TensorStore

MULTIMODAL_PREFIX = "language_model.model.layers.{L}."


def language_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's settings: ``text_config`` of a multimodal wrapper (keeping the
    wrapper's ``architectures``), else the config itself."""
    text = config.get("text_config")
    if not isinstance(text, dict):
        return config
    return {**text, "architectures": config.get("architectures")}


@register
class Llama4(StandardFamily):
    name = "llama4"
    architectures = ("Llama4ForCausalLM", "Llama4ForConditionalGeneration")
    model_types = ("llama4_text", "llama4")
    tiny_layouts = ("fused", "multimodal")
    tiny_custom_layouts = ("multimodal",)
    router_weight = "feed_forward.router.weight"
    expert_layouts = (
        FusedGateUp(gate_up="feed_forward.experts.gate_up_proj", down="feed_forward.experts.down_proj", orientation="in_out"),
    )
    shared_expert_layouts = (
        PerExpert(
            gate="feed_forward.shared_expert.gate_proj.weight",
            up="feed_forward.shared_expert.up_proj.weight",
            down="feed_forward.shared_expert.down_proj.weight",
        ),
    )
    dense_mlp_names: ClassVar[dict[str, str]] = {
        "gate": "feed_forward.gate_proj.weight",
        "up": "feed_forward.up_proj.weight",
        "down": "feed_forward.down_proj.weight",
    }

    def __init__(self, config: dict[str, Any], store: TensorStore):
        super().__init__(language_config(config), store)
        if any(name.startswith("language_model.model.layers.") for name in store.names()):
            self.layer_prefix = MULTIMODAL_PREFIX

    def moe_layer_indices(self) -> list[int]:
        listed = self.config.get("moe_layers")
        if listed is not None:
            return sorted(int(i) for i in listed)
        step = int(self.config.get("interleave_moe_layer_step") or 1)
        return list(range(step - 1, self.n_layers(), step))

    def n_shared_experts(self) -> int:
        return 1

    def config_shared_expert_ffn(self) -> Optional[int]:
        return self.config_expert_ffn()  # the shared expert is as wide as a routed one

    @classmethod
    def tiny_config(cls):
        from transformers import Llama4TextConfig

        # Layers 1 and 3 are MoE, 0 and 2 dense, as in Maverick (step 2).
        return Llama4TextConfig(
            vocab_size=128, hidden_size=32, intermediate_size=48, intermediate_size_mlp=64,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
            max_position_embeddings=64,
        )

    @classmethod
    def tiny_write(cls, model: Any, out: Path, spec: Any) -> None:
        """The ``multimodal`` layout: ``model`` wrapped, as the Hub checkpoints are, in a
        ``Llama4ForConditionalGeneration`` with a one-layer vision tower."""
        import torch
        from transformers import Llama4Config, Llama4ForConditionalGeneration

        vision = {
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
            "image_size": 28, "patch_size": 14, "vision_output_dim": 32, "projector_input_dim": 32,
            "projector_output_dim": 32, "pixel_shuffle_ratio": 0.5,
        }
        config = Llama4Config(text_config=model.config.to_dict(), vision_config=vision)
        wrapper = Llama4ForConditionalGeneration(config)
        with torch.no_grad():
            # parameters only: ``.to(dtype)`` would also cast the complex rotary buffers
            for p in wrapper.parameters():
                p.data = p.data.to(model.dtype)
        wrapper.language_model.load_state_dict(model.state_dict())
        wrapper.save_pretrained(out, **({"max_shard_size": "20KB"} if spec.sharded else {}))
