"""One MoE layer's block inputs, router logits and top-k choices, from a forward pass stopped early.

A calibration unit is one layer, and it needs only that layer's inputs: the forward pass runs
the decoder layers before it, then the layer's attention, then enters its MoE block; hooks there
record

- x_t, the MoE block's input (a forward pre-hook on the block);
- the router logits, from the router's output: its first tensor (Llama4's router returns
  (scores, logits): its second; JetMoE's gating: its last);
- the top-k choices the family's own routing made: the expert indices the block hands its
  experts module (``experts(hidden, top_k_index, top_k_weights)`` in every transformers 5 family
  but Llama4 and JetMoE), so softmax or sigmoid scoring, score-correction biases and group-limited
  routing are all the family's. Where the experts module takes no indices, they are the router
  output's [n, k] integer tensor, or else top-k of the logits (ties to the lower index; the
  families concerned, Llama4 and JetMoE, pick the top-k logits themselves);

and then raise a private exception that ends the pass: the layer's experts, the layers after it
and the LM head never run. Memory holds one batch of one layer's activations; the price is that
layer L re-runs layers 0..L−1, so calibrating all n layers costs about (n + 1)/2 forward passes
(measured in ``benchmarks/calibration.py``). Hooks are removed however the pass ends.

Rows are right-padded; padding never reaches the real tokens of a causal model, and only real
tokens (attention mask 1) are kept, in row-major order: sequence by sequence, position by position.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moelens.errors import ConfigError
from moelens.runtime.architecture import Architecture, router_width
from moelens.runtime.batching import right_padded

#: Where a router's logits sit in its output tuple, for the routers whose first element is not them.
ROUTER_LOGITS_AT = {"llama4": 1, "llama4_text": 1, "jetmoe": -1}


class _StopForward(Exception):
    """Raised by a hook once the layer's routing is known: the rest of the pass is not needed."""


@dataclass(frozen=True)
class Routing:
    """One batch of one layer: ``inputs`` [n, d] (block inputs, on the model's device and dtype),
    ``logits`` [n, E] float32 and ``topk`` [n, k] int64 (CPU); ``source`` says where the top-k came
    from (``experts``, ``router`` or ``logits``)."""

    inputs: torch.Tensor
    logits: torch.Tensor
    topk: torch.Tensor
    source: str


def _logits_of(output: Any, model_type: str) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        picked = output[ROUTER_LOGITS_AT.get(model_type, 0)]
        if isinstance(picked, torch.Tensor):
            return picked
    raise ConfigError(f"cannot find the router logits in the output of this {model_type} router ({type(output).__name__}); "
                      "calibration reads routers that return their logits")


def _topk_of(output: Any, n_rows: int, top_k: int) -> torch.Tensor | None:
    """The [n, k] integer tensor of a router's output tuple, if it has one."""
    if not isinstance(output, (tuple, list)):
        return None
    for item in output:
        if isinstance(item, torch.Tensor) and item.ndim == 2 and not item.is_floating_point() and tuple(item.shape) == (n_rows, top_k):
            return item
    return None


def topk_of_logits(logits: torch.Tensor, k: int) -> torch.Tensor:
    """[n, k] indices of the k largest logits per row, ties to the lower index (torch.topk's
    order among equal values is unspecified): a stable sort of −logits."""
    return torch.sort(-logits.float(), dim=-1, stable=True).indices[:, :k]


class LayerCapture:
    """Hooks on one MoE layer of a loaded model; :meth:`run` returns one batch's :class:`Routing`."""

    def __init__(self, model: nn.Module, arch: Architecture, layer: int, top_k: int):
        points = arch.layers[layer]
        if points.mlp is None or points.router is None:
            raise ConfigError(f"layer {layer} of this {arch.model_type} model has no MoE block with a router")
        self.model = model
        self.arch = arch
        self.layer = layer
        self.top_k = int(top_k)
        self.mlp = points.mlp
        self.router = points.router
        experts = getattr(points.mlp, "experts", None)
        self.experts = experts if isinstance(experts, nn.Module) else None
        self.n_experts = router_width(points.router)

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Routing:
        seen: dict[str, Any] = {}
        handles = self.install(lambda: seen, stop=True)
        try:
            with torch.no_grad():
                self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return self.routing(seen, attention_mask)

    def install(self, sink: Callable[[], dict[str, Any]], stop: bool) -> list[Any]:
        """Hooks that record into ``sink()`` (the current batch's dictionary) and, with ``stop``,
        end the pass once the routing is known. Returns their handles (the caller removes them)."""

        def block_input(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs.get("hidden_states")
            sink()["x"] = x.detach()

        def router_output(module: nn.Module, args: Any, output: Any) -> None:
            sink()["router"] = output
            if stop and self.experts is None:
                raise _StopForward

        def experts_input(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            index = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
            if isinstance(index, torch.Tensor) and index.ndim == 2 and not index.is_floating_point():
                sink()["topk"] = index.detach()
            if stop:
                raise _StopForward

        handles = [self.mlp.register_forward_pre_hook(block_input, with_kwargs=True),
                   self.router.register_forward_hook(router_output)]
        if self.experts is not None:
            handles.append(self.experts.register_forward_pre_hook(experts_input, with_kwargs=True))
        return handles

    def routing(self, seen: dict[str, Any], attention_mask: torch.Tensor) -> Routing:
        """One batch's :class:`Routing` from what the hooks recorded."""
        if "x" not in seen or "router" not in seen:
            raise ConfigError(f"the forward pass never reached the router of layer {self.layer}; "
                              f"this {self.arch.model_type} model routes in a way calibration does not read")
        keep = attention_mask.reshape(-1).bool()
        n_rows = keep.numel()
        x = seen["x"]
        x = x.reshape(-1, x.shape[-1])[keep]                                                    # [n, d]
        logits = _logits_of(seen["router"], self.arch.model_type)
        if logits.ndim != 2 or tuple(logits.shape) != (n_rows, self.n_experts):
            raise ConfigError(f"the router of layer {self.layer} returned logits of shape {list(logits.shape)}, "
                              f"expected [{n_rows}, {self.n_experts}] (tokens × experts)")
        logits = logits.detach()[keep].float().cpu()                                            # [n, E]
        topk, source = seen.get("topk"), "experts"
        if topk is None or tuple(topk.shape) != (n_rows, self.top_k):
            topk, source = _topk_of(seen["router"], n_rows, self.top_k), "router"
        if topk is None:
            return Routing(x, logits, topk_of_logits(logits, self.top_k), "logits")
        return Routing(x, logits, topk.reshape(n_rows, -1)[keep.to(topk.device)].long().cpu(), source)


__all__ = ["LayerCapture", "ROUTER_LOGITS_AT", "Routing", "right_padded", "topk_of_logits"]
