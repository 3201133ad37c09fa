"""DeepSeek-V2 and DeepSeek-V3 (also Kimi-K2, which ships as ``DeepseekV3ForCausalLM``).

The first ``first_k_dense_replace`` layers hold a dense ``mlp.{gate,up,down}_proj``; later layers
hold a router ``mlp.gate.weight``, routed experts laid out like Qwen-MoE's, and the shared experts
``mlp.shared_experts.*``: one MLP ``n_shared_experts`` experts wide (its F is
``n_shared_experts * moe_intermediate_size``), so :meth:`shared_experts` returns that one MLP while
:meth:`n_shared_experts` says how many experts it stands for. V3 adds
``mlp.gate.e_score_correction_bias`` [E], added to the scores for top-k selection only.

Attention is multi-head latent attention; :meth:`attention` returns its projections by their
own names: ``q`` (no q-LoRA) or ``q_a``/``q_b``, ``kv_a`` (``kv_a_proj_with_mqa``), ``kv_b``, ``o``.

DeepSeek-V3's Hub files also hold the multi-token-prediction module as layer
``num_hidden_layers`` (61); it is not a decoder layer and moelens never reads it.
The Hub files store the weights as FP8 e4m3 with a ``weight_scale_inv`` per 128 x 128 block;
:mod:`moelens.checkpoint.store` dequantises them on read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from moelens.checkpoint.families.base import StandardFamily
from moelens.checkpoint.families.layouts import PerExpert
from moelens.checkpoint.families.qwen import QWEN_EXPERT_LAYOUTS
from moelens.checkpoint.registry import register

if TYPE_CHECKING:  # torch is imported where tensors are made, not when a family is listed
    import torch

SHARED_EXPERTS = PerExpert(
    gate="mlp.shared_experts.gate_proj.weight",
    up="mlp.shared_experts.up_proj.weight",
    down="mlp.shared_experts.down_proj.weight",
)

MLA_ATTENTION = {
    "q": "self_attn.q_proj.weight",
    "q_a": "self_attn.q_a_proj.weight",
    "q_b": "self_attn.q_b_proj.weight",
    "kv_a": "self_attn.kv_a_proj_with_mqa.weight",
    "kv_b": "self_attn.kv_b_proj.weight",
    "o": "self_attn.o_proj.weight",
}

# DeepSeek-V3 publishes 128 x 128 blocks; the tiny FP8 checkpoint uses 16 x 16 blocks so that its
# small matrices hold several blocks, one of them partial, like V3's 576-row kv_a_proj_with_mqa.
FP8_TINY_BLOCK = 16
FP8_E4M3_MAX = 448.0


class DenseFirstFamily(StandardFamily):
    """Layers ``i >= first_k_dense_replace`` are MoE, the first ones dense (DeepSeek, GLM4-MoE,
    dots1). ``moe_layer_freq`` (DeepSeek's own code; 1 in every published config) thins them.
    ``default_first_k_dense`` is transformers' default for a config that omits the key."""

    default_first_k_dense: ClassVar[int] = 0
    router_weight = "mlp.gate.weight"
    expert_layouts = QWEN_EXPERT_LAYOUTS
    shared_expert_layouts = (SHARED_EXPERTS,)
    tiny_layouts = ("per_expert", "fused")

    def moe_layer_indices(self) -> list[int]:
        if self.config_n_experts() <= 0:
            return []
        first = int(self.config.get("first_k_dense_replace", self.default_first_k_dense) or 0)
        freq = int(self.config.get("moe_layer_freq") or 1)
        return [i for i in range(first, self.n_layers()) if i % freq == 0]

    def n_shared_experts(self) -> int:
        return int(self.config.get("n_shared_experts") or 0)

    def config_shared_expert_ffn(self) -> Optional[int]:
        # one MLP standing for n_shared_experts experts side by side
        f = self.config_expert_ffn()
        return f * self.n_shared_experts() if f and self.n_shared_experts() else None


class DeepSeek(DenseFirstFamily):
    attention_names = MLA_ATTENTION


@register
class DeepSeekV2(DeepSeek):
    name = "deepseek_v2"
    architectures = ("DeepseekV2ForCausalLM",)
    model_types = ("deepseek_v2",)

    @classmethod
    def tiny_config(cls):
        from transformers import DeepseekV2Config

        # V2-Lite's shape: no q-LoRA, two shared experts, layer 0 dense
        return DeepseekV2Config(
            vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
            n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, n_shared_experts=2,
            first_k_dense_replace=1, n_group=1, topk_group=1,
            q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
        )


@register
class DeepSeekV3(DeepSeek):
    name = "deepseek_v3"
    architectures = ("DeepseekV3ForCausalLM",)
    model_types = ("deepseek_v3", "kimi_k2")
    score_correction_bias = "mlp.gate.e_score_correction_bias"
    default_first_k_dense = 3
    tiny_custom_layouts = ("fp8",)

    @classmethod
    def tiny_config(cls):
        from transformers import DeepseekV3Config

        # dimensions are multiples of the tiny FP8 block except kv_a_proj_with_mqa (20 rows)
        return DeepseekV3Config(
            vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
            n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
            first_k_dense_replace=1, n_group=1, topk_group=1,
            q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
        )

    @classmethod
    def tiny_write(cls, model: Any, out: Path, spec: Any) -> None:
        """Write ``model`` the way DeepSeek-V3 is published: per-expert Hub names, every linear
        weight of the decoder layers (not the router) as FP8 e4m3 with a ``weight_scale_inv``
        [ceil(out/b), ceil(in/b)] float32 tensor in the same file, and a ``quantization_config``."""
        write_fp8_checkpoint(model, Path(out), spec, FP8_TINY_BLOCK)


def is_fp8_linear(name: str, shape: tuple[int, ...]) -> bool:
    """The weights DeepSeek-V3 stores in FP8: 2-D projections of the decoder layers; the router
    (``mlp.gate.weight``), norms, embeddings and the LM head stay in higher precision."""
    return name.startswith("model.layers.") and len(shape) == 2 and name.endswith(("_proj.weight", "_mqa.weight"))


def quantize_fp8_blocks(weight: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block FP8 e4m3 quantisation: ``scale_inv`` [ceil(out/b), ceil(in/b)] is each block's
    absolute maximum over 448, and ``weight ≈ fp8 * scale_inv`` block by block."""
    import torch

    rows, cols = weight.shape
    nr, nc = math.ceil(rows / block), math.ceil(cols / block)
    w = weight.float()
    padded = torch.zeros(nr * block, nc * block)
    padded[:rows, :cols] = w
    blocks = padded.reshape(nr, block, nc, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / FP8_E4M3_MAX
    expanded = scale_inv.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
    fp8 = (w / expanded).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return fp8, scale_inv.float()


def write_fp8_checkpoint(model: Any, out: Path, spec: Any, block: int) -> None:
    """Save ``model`` in the Hub layout, then rewrite each file with FP8 weights and scales."""
    from safetensors.torch import load_file, save_file

    kwargs: dict[str, Any] = {"save_original_format": True}
    if spec.sharded:
        kwargs["max_shard_size"] = "20KB"
    model.save_pretrained(out, **kwargs)
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    for file in sorted(out.glob("*.safetensors")):
        tensors = load_file(str(file))
        for name in list(tensors):
            if is_fp8_linear(name, tuple(tensors[name].shape)):
                tensors[name], tensors[f"{name}_scale_inv"] = quantize_fp8_blocks(tensors[name], block)
                if index is not None:
                    index["weight_map"][f"{name}_scale_inv"] = file.name
        save_file(tensors, str(file), metadata={"format": "pt"})
    if index is not None:
        index_path.write_text(json.dumps(index, indent=2))
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [block, block],
    }
    config_path.write_text(json.dumps(config, indent=2))
    (out / "moelens_tiny.json").write_text(json.dumps({
        "family": spec.family, "layout": spec.layout, "dtype": spec.dtype, "sharded": spec.sharded,
    }))


@register
class Dots1(DenseFirstFamily):
    """rednote dots.llm1: DeepSeek-V3's MoE block (score-correction bias, shared experts,
    ``first_k_dense_replace``) with ordinary q/k/v/o attention."""

    name = "dots1"
    architectures = ("Dots1ForCausalLM",)
    model_types = ("dots1",)
    score_correction_bias = "mlp.gate.e_score_correction_bias"

    @classmethod
    def tiny_config(cls):
        from transformers import Dots1Config

        return Dots1Config(
            vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
            n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, n_shared_experts=1,
            first_k_dense_replace=1, n_group=1, topk_group=1,
        )
