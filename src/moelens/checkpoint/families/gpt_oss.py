"""GPT-OSS: experts fused on disk, in [in, out] orientation, gate and up interleaved.

``mlp.router.weight`` [E, d] and ``mlp.router.bias`` [E] (added to the logits);
``mlp.experts.gate_up_proj`` [E, d, 2F] with gate = even columns, up = odd columns, and
``gate_up_proj_bias`` [E, 2F]; ``mlp.experts.down_proj`` [E, F, d] and ``down_proj_bias`` [E, d].

The published checkpoints (openai/gpt-oss-20b, -120b) store both expert tensors as MXFP4:
``<name>_blocks`` U8 [E, rows, cols/32, 16] and ``<name>_scales`` U8 [E, rows, cols/32], packed
along the reduction axis, so the dequantised tensors are [E, 2F, d] and [E, d, F]: [out, in],
the transpose of the unquantised tensors of the same names (transformers transposes them back
after dequantising). Interleaving is the same in both: gate is every even row of the MXFP4
gate_up. Everything else (router, biases, attention) is stored in bf16.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moelens.checkpoint.families.base import StandardFamily
from moelens.checkpoint.families.layouts import FusedGateUp
from moelens.checkpoint.registry import register
from moelens.checkpoint.store import INDEX_NAME, TensorStore, quantize_mxfp4

EXPERT_TENSORS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


@dataclass(frozen=True)
class Mxfp4FusedGateUp(FusedGateUp):
    """The MXFP4 form of GPT-OSS's fused experts: dequantised [out, in], so ``out_in``. Present
    only where the gate_up tensor is stored as MXFP4 blocks, so that the bf16 layout of the same
    names is picked otherwise."""

    orientation: str = "out_in"

    def present(self, store: TensorStore, L: int) -> bool:
        return super().present(store, L) and store.dtype(self.gate_up.format(L=L)) == "MXFP4"


_BIASES = {"gate_up_bias": "mlp.experts.gate_up_proj_bias", "down_bias": "mlp.experts.down_proj_bias"}


@register
class GptOss(StandardFamily):
    name = "gpt_oss"
    architectures = ("GptOssForCausalLM",)
    model_types = ("gpt_oss",)
    tiny_layouts = ("fused", "mxfp4")
    tiny_custom_layouts = ("mxfp4",)
    router_weight = "mlp.router.weight"
    router_bias = "mlp.router.bias"
    expert_layouts = (
        Mxfp4FusedGateUp(gate_up=EXPERT_TENSORS[0], down=EXPERT_TENSORS[1], split="interleaved", **_BIASES),
        FusedGateUp(gate_up=EXPERT_TENSORS[0], down=EXPERT_TENSORS[1], orientation="in_out", split="interleaved", **_BIASES),
    )

    @classmethod
    def tiny_config(cls):
        from transformers import GptOssConfig

        # d and F are multiples of 32 so that the MXFP4 layout can pack them.
        return GptOssConfig(
            vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
            num_experts_per_tok=2, max_position_embeddings=131072, sliding_window=16,
        )

    @classmethod
    def tiny_write(cls, model: Any, out: Path, spec: Any) -> None:
        """Write ``model`` as the published GPT-OSS checkpoints are: expert tensors in MXFP4."""
        model.save_pretrained(out, **({"max_shard_size": "20KB"} if spec.sharded else {}))
        quantize_experts_to_mxfp4(Path(out))


def quantize_experts_to_mxfp4(directory: Path) -> None:
    """Rewrite a saved bf16/fp32 GPT-OSS checkpoint in place with MXFP4 experts: each
    ``mlp.experts.{gate_up,down}_proj`` [E, in, out] becomes ``_blocks``/``_scales`` of its
    transpose [E, out, in] in the same shard, the index and ``config.json`` follow."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    renamed: dict[str, list[str]] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as h:
            tensors = {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118 (a safe_open handle is not a dict)
        for name in [k for k in tensors if k.endswith(EXPERT_TENSORS)]:
            blocks, scales = quantize_mxfp4(tensors.pop(name).transpose(1, 2))
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
            renamed[name] = [f"{name}_blocks", f"{name}_scales"]
        save_file(tensors, str(file), metadata={"format": "pt"})
    index = directory / INDEX_NAME
    if index.is_file():
        data = json.loads(index.read_text())
        weight_map = {}
        for name, shard in data["weight_map"].items():
            for new in renamed.get(name, [name]):
                weight_map[new] = shard
        data["weight_map"] = dict(sorted(weight_map.items()))
        index.write_text(json.dumps(data, indent=2))
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
        "quant_method": "mxfp4",
        # Not in the published configs: lets transformers load the file on a CPU without
        # triton kernels or accelerate (it dequantises), which the tests use as the reference.
        "dequantize": True,
    }
    config_path.write_text(json.dumps(config, indent=2))
