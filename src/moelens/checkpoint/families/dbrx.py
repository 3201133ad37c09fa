"""DBRX (Databricks): experts stacked along the rows of 2-D tensors, attention fused.

Under ``transformer.blocks.{L}.``: ``ffn.router.layer.weight`` [E, d];
``ffn.experts.mlp.w1`` (gate) and ``ffn.experts.mlp.v1`` (up) [E·F, d], expert ``e`` owning rows
``e·F:(e+1)·F`` in [out, in]; ``ffn.experts.mlp.w2`` [E·F, d], each expert's rows in [in, out]
(the down matrix transposed). Attention is one ``norm_attn_norm.attn.Wqkv.weight``
[d + 2·kv_heads·head_dim, d] (q, then k, then v) and ``norm_attn_norm.attn.out_proj.weight``.

The config spells things its own way: ``d_model``, ``n_layers``, ``n_heads``, and
``ffn_config`` / ``attn_config`` sub-dicts with ``moe_num_experts``, ``moe_top_k``,
``ffn_hidden_size`` and ``kv_n_heads``. Every block is MoE.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Optional

from moelens.checkpoint.families.base import StandardFamily, positive_int
from moelens.checkpoint.families.layouts import FlatExperts, check_finite
from moelens.checkpoint.registry import register
from moelens.errors import CheckpointFormatError

if TYPE_CHECKING:  # torch is imported where tensors are made, not when a family is listed
    import torch

WQKV = "norm_attn_norm.attn.Wqkv.weight"
OUT_PROJ = "norm_attn_norm.attn.out_proj.weight"


@register
class Dbrx(StandardFamily):
    name = "dbrx"
    architectures = ("DbrxForCausalLM",)
    model_types = ("dbrx",)
    tiny_layouts = ("fused",)
    layer_prefix = "transformer.blocks.{L}."
    router_weight = "ffn.router.layer.weight"
    expert_layouts = (
        FlatExperts(
            gate="ffn.experts.mlp.w1", up="ffn.experts.mlp.v1", down="ffn.experts.mlp.w2",
            router="ffn.router.layer.weight",
        ),
    )
    attention_names: ClassVar[dict[str, str]] = {"qkv": WQKV, "o": OUT_PROJ}

    def _sub(self, key: str) -> dict[str, Any]:
        sub = self.config.get(key) or {}
        return sub if isinstance(sub, dict) else {}

    def n_layers(self) -> int:
        return int(self.config["n_layers"])

    def hidden_size(self) -> int:
        return int(self.config["d_model"])

    def config_n_experts(self) -> int:
        return int(self._sub("ffn_config").get("moe_num_experts") or 0)

    def top_k(self) -> int:
        return int(self._sub("ffn_config").get("moe_top_k") or 0)

    def config_expert_ffn(self) -> Optional[int]:
        return positive_int(self._sub("ffn_config").get("ffn_hidden_size"))

    def attention(self, L: int) -> dict[str, torch.Tensor]:
        """``q``, ``k``, ``v`` split out of ``Wqkv``, and ``o``, all [out, in]."""
        name = self._full(WQKV, L)
        qkv = check_finite(name, self.store.read(name))
        d = self.hidden_size()
        head_dim = d // int(self.config["n_heads"])
        kv = int(self._sub("attn_config").get("kv_n_heads") or self.config["n_heads"]) * head_dim
        if qkv.shape[0] != d + 2 * kv:
            raise CheckpointFormatError(
                f"{name} has {qkv.shape[0]} rows, but d_model={d} and {kv // head_dim} key/value heads of "
                f"{head_dim} need {d + 2 * kv}; config.json does not match the weights"
            )
        q, k, v = qkv.split([d, kv, kv], dim=0)
        out_name = self._full(OUT_PROJ, L)
        return {"q": q.contiguous(), "k": k.contiguous(), "v": v.contiguous(), "o": self.store.read(out_name)}

    @classmethod
    def tiny_config(cls):
        from transformers import DbrxConfig

        return DbrxConfig(
            vocab_size=128, d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
            attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
            ffn_config={"ffn_hidden_size": 48, "moe_num_experts": 4, "moe_top_k": 2},
        )
