"""Hook points of a transformers causal LM, named after the architecture.

Every family the reader knows (and dense Llama/Mistral/Qwen, and the other transformers causal
LMs: GPT-2, GPT-J, GPT-NeoX/Pythia, Phi, Gemma, Falcon, OPT, ...) keeps its decoder layers in one
``nn.ModuleList`` of the base model; inside a layer, the self-attention module, the MLP or MoE block
and, in an MoE block, the router have a handful of names across families:

| hook point | module names (first found wins)                                  |
|------------|-------------------------------------------------------------------|
| layer      | ``model.layers[i]``, ``transformer.h[i]`` (GPT-2, GPT-J, Falcon), ``gpt_neox.layers[i]``, ``model.decoder.layers[i]`` (OPT), ``transformer.blocks[i]`` (DBRX): the list of ``num_hidden_layers`` modules |
| attention  | ``self_attn``, ``self_attention``, ``attention``, ``attn`` (DBRX: ``norm_attn_norm.attn``) |
| mlp        | ``mlp``, ``block_sparse_moe``, ``feed_forward``, ``ffn``, ``moe``; OPT, which has no MLP module, ``fc2`` (its output, tokens flattened to [B·T, d], is the MLP output before the residual add) |
| router     | the MLP block's ``gate`` or ``router`` child                      |

Every attention module of these families takes the 4-D ``attention_mask`` by keyword (transformers
≥ 5), under eager and sdpa attention alike, so attention blocking edits that mask.

A layer without self-attention (Mamba, linear attention) has ``attention = None``; a dense layer
has ``router = None``. The outputs at these points are what docs/methods.md §4 calls the sites: the
decoder layer's output (``subj``/``last``), the attention module's own output before the residual
add (``attn``), the MLP/MoE block's output as the block returns it (``moe``), the router logits
(``router``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moelens.errors import ConfigError

ATTENTION_NAMES = ("self_attn", "self_attention", "attention", "attn")
MLP_NAMES = ("mlp", "block_sparse_moe", "feed_forward", "ffn", "moe", "fc2")
ROUTER_NAMES = ("gate", "router")


@dataclass(frozen=True)
class LayerPoints:
    """The modules of decoder layer ``index`` that interventions and calibration hook."""

    index: int
    layer: nn.Module
    attention: nn.Module | None
    mlp: nn.Module | None
    router: nn.Module | None

    @property
    def is_moe(self) -> bool:
        return self.router is not None


@dataclass(frozen=True)
class Architecture:
    """A loaded model's hook points: embeddings, decoder layers (in order) and the model itself."""

    model_type: str
    embedding: nn.Module
    layers: tuple[LayerPoints, ...] = field(repr=False)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def moe_layers(self) -> list[int]:
        return [p.index for p in self.layers if p.is_moe]

    @property
    def n_experts(self) -> int | None:
        """Number of routed experts (from the first router's logits width), None for a dense model."""
        for p in self.layers:
            if p.router is not None:
                return router_width(p.router)
        return None


def _child(module: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return child
    return None


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers: the longest list of identical-class layers, preferring the
    one whose length is ``config.num_hidden_layers``."""
    config = getattr(model, "config", None)
    expected = None
    if config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        expected = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layers", None)
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    exact = [m for m in candidates if expected is not None and len(m) == expected]
    pool = exact or candidates
    if not pool:
        raise ConfigError(f"{type(model).__name__} has no list of decoder layers; moelens hooks transformers causal LMs")
    return max(pool, key=len)


def _attention(layer: nn.Module) -> nn.Module | None:
    found = _child(layer, ATTENTION_NAMES)
    if found is None:
        # DBRX wraps the attention between its two norms.
        for child in layer.children():
            found = _child(child, ATTENTION_NAMES)
            if found is not None:
                break
    return found


def _router(mlp: nn.Module | None) -> nn.Module | None:
    if mlp is None:
        return None
    router = _child(mlp, ROUTER_NAMES)
    if router is None:
        return None
    # A dense MLP's ``gate`` would be a gate projection (named gate_proj in every family); an MoE
    # router has an [E, d] weight (directly or in a Linear child) and experts beside it.
    if not any(name in ("experts", "input_linear") for name, _ in mlp.named_children()):
        return None
    return router


def router_weight(router: nn.Module) -> torch.Tensor:
    """The router's [E, d] weight: its own ``weight`` or that of its one Linear child."""
    weight = getattr(router, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2:
        return weight
    linears = [m for m in router.children() if isinstance(m, nn.Linear)]
    if len(linears) == 1:
        return linears[0].weight
    raise ConfigError(f"cannot find the [experts, hidden] weight of router {type(router).__name__}")


def router_width(router: nn.Module) -> int:
    return int(router_weight(router).shape[0])


def describe(model: Any) -> Architecture:
    """The hook points of a transformers causal LM."""
    layers = _decoder_layers(model)
    points = []
    for i, layer in enumerate(layers):
        mlp = _child(layer, MLP_NAMES)
        points.append(LayerPoints(index=i, layer=layer, attention=_attention(layer), mlp=mlp, router=_router(mlp)))
    embedding = model.get_input_embeddings()
    if embedding is None:
        raise ConfigError(f"{type(model).__name__} has no input embeddings")
    config = getattr(model, "config", None)
    return Architecture(model_type=str(getattr(config, "model_type", type(model).__name__)), embedding=embedding, layers=tuple(points))


def first_tensor(output: Any) -> torch.Tensor:
    """A module's main output: the tensor itself, or the first element of its tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_first(output: Any, tensor: torch.Tensor) -> Any:
    """``output`` with its main tensor replaced (tuples keep their other elements)."""
    if isinstance(output, tuple):
        return (tensor, *output[1:])
    if isinstance(output, list):
        return [tensor, *output[1:]]
    return tensor


__all__ = [
    "Architecture", "LayerPoints", "describe", "first_tensor", "replace_first", "router_weight", "router_width",
]
