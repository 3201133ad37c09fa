"""Granite-MoE, Granite-MoE-Shared and Granite-MoE-Hybrid (IBM): experts fused on disk in
[out, in] orientation.

Under ``model.layers.{L}.``, as published: ``block_sparse_moe.router.layer.weight`` [E, d];
``block_sparse_moe.input_linear.weight`` [E, 2F, d] (gate = the first F rows);
``block_sparse_moe.output_linear.weight`` [E, d, F]. Transformers v5 renames these in memory
(``router.weight``, ``experts.gate_up_proj``, ``experts.down_proj``) and writes that form with
``save_original_format=False``; both are read. Granite-MoE-Shared adds one always-on MLP,
``shared_mlp.input_linear.weight`` [2Fs, d] (gate first) and ``shared_mlp.output_linear.weight``
[d, Fs]. Every layer is MoE (Hybrid: see :class:`GraniteMoeHybrid`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from moelens.checkpoint.families.base import StandardFamily, positive_int
from moelens.checkpoint.families.layouts import FusedGateUp, check_finite, shape_problem
from moelens.checkpoint.registry import register
from moelens.checkpoint.weights import ExpertWeights

if TYPE_CHECKING:  # torch is imported where tensors are made, not when a family is listed
    import torch

SHARED_GATE_UP = "shared_mlp.input_linear.weight"
SHARED_DOWN = "shared_mlp.output_linear.weight"


@register
class GraniteMoe(StandardFamily):
    name = "granitemoe"
    architectures = ("GraniteMoeForCausalLM",)
    model_types = ("granitemoe",)
    # "hub": the published names (save_original_format=True); "fused": transformers v5's.
    tiny_layouts = ("hub", "fused")
    router_weight = ("block_sparse_moe.router.layer.weight", "block_sparse_moe.router.weight")
    expert_layouts = (
        FusedGateUp(gate_up="block_sparse_moe.input_linear.weight", down="block_sparse_moe.output_linear.weight"),
        FusedGateUp(gate_up="block_sparse_moe.experts.gate_up_proj", down="block_sparse_moe.experts.down_proj"),
    )

    def _shared(self, L: int) -> ExpertWeights | None:
        gate_up_name, down_name = self._full(SHARED_GATE_UP, L), self._full(SHARED_DOWN, L)
        if gate_up_name not in self.store:
            return None
        gate_up = check_finite(gate_up_name, self.store.read(gate_up_name))
        f = gate_up.shape[0] // 2
        down = check_finite(down_name, self.store.read(down_name))
        return ExpertWeights(gate=gate_up[:f].contiguous(), up=gate_up[f:].contiguous(), down=down)

    def shared_experts(self, L: int) -> list[ExpertWeights]:
        shared = self._shared(L)
        return [] if shared is None else [shared]

    def config_shared_expert_ffn(self) -> Optional[int]:
        return positive_int(self.config.get("shared_intermediate_size"))

    def shared_expert_problems(self, L: int) -> list[str]:
        names = (self._full(SHARED_GATE_UP, L), self._full(SHARED_DOWN, L))
        if not any(name in self.store for name in names):
            return []  # Granite-MoE without the shared MLP
        return [f"{name} is missing" for name in names if name not in self.store]

    def shared_expert_shape_problems(self, L: int, d: int) -> list[str]:
        gate_up, down = self._full(SHARED_GATE_UP, L), self._full(SHARED_DOWN, L)
        if gate_up not in self.store:
            return []
        fs = self.config_shared_expert_ffn() or self.store.shape(gate_up)[0] // 2
        return shape_problem(self.store, gate_up, (2 * fs, d), "[2Fs, d]") + shape_problem(self.store, down, (d, fs), "[d, Fs]")

    def n_shared_experts(self) -> int:
        moe = self.moe_layer_indices()
        return int(bool(moe) and self._full(SHARED_GATE_UP, moe[0]) in self.store)

    @classmethod
    def tiny_config(cls):
        from transformers import GraniteMoeConfig

        return GraniteMoeConfig(
            vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
            max_position_embeddings=64,
        )


@register
class GraniteMoeShared(GraniteMoe):
    name = "granitemoeshared"
    architectures = ("GraniteMoeSharedForCausalLM",)
    model_types = ("granitemoeshared",)

    @classmethod
    def tiny_config(cls):
        from transformers import GraniteMoeSharedConfig

        return GraniteMoeSharedConfig(
            vocab_size=128, hidden_size=32, intermediate_size=48, shared_intermediate_size=40,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
            num_experts_per_tok=2, max_position_embeddings=64,
        )



@register
class GraniteMoeHybrid(GraniteMoeShared):
    """Granite 4 (hybrid Mamba-2 / attention): every layer has the shared MLP and, when
    ``num_local_experts`` > 0, the routed experts; the dense variants (``num_local_experts`` = 0)
    have only the shared MLP, which :meth:`dense_mlp` returns. Mamba layers have no attention."""

    name = "granitemoehybrid"
    architectures = ("GraniteMoeHybridForCausalLM",)
    model_types = ("granitemoehybrid",)

    def moe_layer_indices(self) -> list[int]:
        return list(range(self.n_layers())) if self.config_n_experts() > 0 else []

    def expert_dtype(self) -> str:
        if self.moe_layer_indices():
            return super().expert_dtype()
        return self.store.dtype(self._full(SHARED_GATE_UP, 0))  # layer 0 may be Mamba: no q_proj

    def dense_mlp(self, L: int) -> dict[str, torch.Tensor]:
        shared = self._shared(L)
        if shared is None:
            raise self.store._missing(self._full(SHARED_GATE_UP, L))
        return {"gate": shared.gate, "up": shared.up, "down": shared.down}

    @classmethod
    def tiny_config(cls):
        from transformers import GraniteMoeHybridConfig

        return GraniteMoeHybridConfig(
            vocab_size=128, hidden_size=32, intermediate_size=48, shared_intermediate_size=40,
            num_hidden_layers=2, layer_types=["mamba", "attention"], num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
            mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1, mamba_expand=2,
            mamba_chunk_size=16,
        )
