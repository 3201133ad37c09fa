"""Shared token prefixes of restore's cells (docs/methods.md §4): the corrupted run's key/value
cache of positions < t stands in for them.

A restore cell at token t changes nothing before t, so in a causal model the states of positions
< t are those of the corrupted run at every layer. The corrupted run of a prompt is made once per
noise sample with a cache; a cell at t then runs only the suffix ``input_ids[t:]`` on a copy of
that cache cropped to t and repeated over its rows, and from the first layer the cell changes
(:func:`layers_from`; the corrupted run's output of the layer before is its input). This is exact
where the cache holds every earlier key and value of every layer, unchanged, and the decoder runs
its list of layers in order: transformers' plain ``DynamicCache`` of full-attention layers in the
families of :data:`CACHED_FAMILIES` (:func:`prefix_cache_supported`). Sliding-window caches
(Mistral-style, Gemma 2/3), latent (MLA) caches, linear-attention states, and families not
checked here run the whole prompt instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

# Families whose decoder keeps a plain full-attention DynamicCache and computes positions from its
# length (rotary positions t, t+1, ... for the suffix); each is checked against the full pass in
# the tests.
CACHED_FAMILIES = ("mixtral", "qwen3_moe", "olmoe", "llama")


def _text_config(config: Any) -> Any:
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def cache_keyword(model: Any) -> str:
    """The name the model's forward gives its cache argument (``cache`` in transformers ≥ 5.2x,
    ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def prefix_cache_supported(model: Any, n_layers: int) -> bool:
    """True when ``model`` (loaded whole) is of :data:`CACHED_FAMILIES`, has no sliding window,
    and its cache is one plain ``DynamicLayer`` per decoder layer."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:
        return False
    text = _text_config(model.config)
    if getattr(text, "model_type", None) not in CACHED_FAMILIES:
        return False
    if getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True):
        return False
    try:
        layers = getattr(DynamicCache(config=model.config), "layers", None)
    except Exception:  # a config the cache cannot lay out: not a plain cache
        return False
    plain = layers is not None and len(layers) == n_layers and all(type(layer) is DynamicLayer for layer in layers)
    first = next((m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers), None)
    return plain and first is not None and decoder_list(model, first[0]) is not None


def decoder_list(model: nn.Module, first: nn.Module) -> tuple[nn.Module, str] | None:
    """The module that holds the decoder layers' ModuleList (whose first entry is ``first``) and
    its attribute name; None if the list is not a direct child of one module."""
    for owner in model.modules():
        for name, child in owner.named_children():
            if isinstance(child, nn.ModuleList) and len(child) > 0 and child[0] is first:
                return owner, name
    return None


@contextmanager
def layers_from(model: nn.Module, first: nn.Module, start: int) -> Iterator[None]:
    """Within the block, the model's decoder runs its layers ``start``, ``start`` + 1, ... only
    (its ``inputs_embeds`` stand for the input of layer ``start``). The families of
    :data:`CACHED_FAMILIES` loop ``for layer in self.layers[:n]`` and each layer keeps its own
    cache index, so a shorter list runs exactly those layers."""
    if start == 0:
        yield
        return
    found = decoder_list(model, first)
    if found is None:
        raise ValueError("the decoder's list of layers was not found")
    owner, name = found
    full = getattr(owner, name)
    setattr(owner, name, nn.ModuleList(list(full)[start:]))
    try:
        yield
    finally:
        setattr(owner, name, full)


def new_cache(model: Any) -> Any:
    """An empty cache as the model would make it."""
    from transformers.cache_utils import DynamicCache

    return DynamicCache(config=model.config)


def cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) [B, H, T, d] of every layer of a filled cache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def concat_tensors(parts: Sequence[list[tuple[torch.Tensor, torch.Tensor]]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The caches of consecutive row chunks as one (rows concatenated)."""
    if len(parts) == 1:
        return parts[0]
    return [(torch.cat([p[i][0] for p in parts]), torch.cat([p[i][1] for p in parts])) for i in range(len(parts[0]))]


def prefix(model: Any, kv: Sequence[tuple[torch.Tensor, torch.Tensor]], length: int, repeats: int, start: int = 0) -> Any:
    """A new cache holding positions [0, length) of ``kv`` (rows B), its rows repeated ``repeats``
    times (row r of the result is row r mod B), so each batch row continues its own sample. Layers
    before ``start`` (which will not run) keep their B rows: they only give the cache its length."""
    from transformers.cache_utils import DynamicCache

    def layer(index: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = k[:, :, :length], v[:, :, :length]
        return (k, v) if index < start else (k.repeat(repeats, 1, 1, 1), v.repeat(repeats, 1, 1, 1))

    return DynamicCache((layer(index, k, v) for index, (k, v) in enumerate(kv)), config=model.config)


def cache_row_bytes(model: Any, length: int) -> int:
    """Bytes one batch row's cache of ``length`` positions holds at its peak (the repeated prefix
    and the concatenated keys and values of every layer)."""
    text = _text_config(model.config)
    heads = int(getattr(text, "num_attention_heads", 32) or 32)
    kv_heads = int(getattr(text, "num_key_value_heads", heads) or heads)
    head_dim = int(getattr(text, "head_dim", None) or getattr(text, "hidden_size", 4096) // heads)
    layers = int(getattr(text, "num_hidden_layers", 32) or 32)
    elem = next(model.parameters()).element_size()
    return 2 * 2 * layers * kv_heads * head_dim * length * elem


__all__ = ["CACHED_FAMILIES", "cache_keyword", "decoder_list", "layers_from", "cache_row_bytes", "cache_tensors", "concat_tensors", "new_cache",
           "prefix", "prefix_cache_supported"]
