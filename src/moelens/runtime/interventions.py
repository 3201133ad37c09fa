"""Many interventions per forward pass: hooks registered once, edits applied as masked writes.

Each row of a batch carries its own intervention. An :class:`Edit` names a hook point — a layer's
output, its attention or MLP/MoE block output, its router logits, the input embeddings (to add
noise) or its attention mask (to block attention) — and a boolean mask ``[R, T]`` of the rows and
token positions it changes. The hook replaces exactly those entries with ``torch.where``, so rows
without an edit at that point pass through bit for bit, and nothing synchronises with the host
inside the forward pass. Rows are right-padded: in a causal model padding after a prompt never
reaches its real tokens, and positions stay 0..length−1.

Router logits are replaced and routing is recomputed with the family's own rule: a router that
returns logits alone is edited in place (routing happens after it); a router that returns
``(logits, weights, indices)`` is re-run on the edited logits through a copy of itself whose weight
is ``[I | 0]`` (so its linear map returns the logits it is given, exactly), keeping the family's
softmax/sigmoid, grouping, bias correction and top-k.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from moelens.errors import ConfigError
from moelens.runtime.architecture import Architecture, first_tensor, replace_first, router_weight
from moelens.runtime.batching import right_padded

# Hook points of a layer; the embedding is point "embed" of layer -1.
POINTS = ("layer", "attn", "mlp", "router", "block", "embed")
Value = Union[None, torch.Tensor, Callable[[], torch.Tensor]]


@dataclass
class Edit:
    """Change the entries ``mask`` ([R, T] bool) of a hook point's output.

    ``value``: None writes zeros; a tensor broadcastable to the output ([d], [R, 1, d] or
    [R, T, d]); or a function returning one, called only when the hook runs (to build large values
    lazily). ``add=True`` adds the value instead of writing it (noise). For point ``block`` the mask
    holds the key positions the row's last position may not attend to.

    ``of_input=True`` (point ``router`` only): ``value`` is a function of the router's input and
    its logits, ``value(x [R·T, d], logits [R·T, E]) -> [R·T, E]``, called when the hook runs; router
    edits (:mod:`moelens.runtime.router_edits`) compute each row's logits from its own edited router
    weight this way."""

    mask: torch.Tensor
    value: Value = None
    add: bool = False
    of_input: bool = False

    def resolve(self, inputs: torch.Tensor | None = None, output: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.of_input:
            if inputs is None or output is None:
                raise ValueError("an edit computed from its input needs the hook point's input and output (router only)")
            return self.value(inputs, output)  # type: ignore[operator,misc]
        return self.value() if callable(self.value) else self.value


def _apply(t: torch.Tensor, mask: torch.Tensor, edit: Edit, inputs: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` [R, T, d] (or [R·T, E] for router logits with ``mask`` flattened) with the edit applied;
    ``inputs``: the hook point's input, for an edit computed from it."""
    value = edit.resolve(inputs, t) if edit.of_input else edit.resolve()
    if t.dim() == 2 and mask.dim() == 2:  # tokens flattened to [R·T, ·] (router logits, some MoE blocks)
        if isinstance(value, torch.Tensor) and value.dim() == 3:  # [R, T or 1, d] -> [R·T, d]
            value = value.expand(mask.shape[0], mask.shape[1], value.shape[-1]).reshape(-1, value.shape[-1])
        mask = mask.reshape(-1)
    m = mask.unsqueeze(-1)
    if edit.add:
        return torch.where(m, t + value.to(t.dtype), t)
    if value is None:
        return t.masked_fill(m, 0)
    return torch.where(m, value.to(t.dtype), t)


class _Router:
    """How to replace one router's logits and recompute its routing."""

    def __init__(self, router: nn.Module, hidden_size: int):
        self.router = router
        self.shadow: nn.Module | None = None
        self.hidden_size = hidden_size

    def prepare(self, args: tuple[Any, ...], output: Any) -> None:
        """Decide from one call (its input and output) how this router's routing is recomputed:
        its logits must be the linear map of its input, returned alone or first."""
        logits = output if isinstance(output, torch.Tensor) else (output[0] if isinstance(output, tuple) and output else None)
        weight = router_weight(self.router)
        n_experts, d = weight.shape
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        ok = isinstance(logits, torch.Tensor) and x is not None and logits.shape[-1] == n_experts
        if ok:
            bias = getattr(self.router, "bias", None)
            bias = bias if isinstance(bias, torch.Tensor) and bias.shape == (n_experts,) else None
            expected = F.linear(x.reshape(-1, d).float(), weight.float(), None if bias is None else bias.float())
            ok = logits.shape == expected.shape and torch.allclose(logits.float(), expected, rtol=1e-2, atol=1e-3)
        if not ok:
            raise ConfigError(f"the router {type(self.router).__name__} does not return its logits (the linear map of its "
                              "input) first; moelens cannot replace its router logits")
        if isinstance(output, torch.Tensor):
            return  # logits only: the block routes after the router
        if d < n_experts:
            raise ConfigError(f"router {type(self.router).__name__}: cannot recompute routing when hidden size {d} < experts {n_experts}")
        shadow = copy.deepcopy(self.router)
        for m in shadow.modules():  # a copy must not carry the original's hooks (they would recurse)
            m._forward_hooks.clear()
            m._forward_hooks_with_kwargs.clear()
            m._forward_pre_hooks.clear()
        with torch.no_grad():
            for name, p in shadow.named_parameters():
                if p is router_weight(shadow):
                    p.zero_()
                    p[:, :n_experts] = torch.eye(n_experts, dtype=p.dtype, device=p.device)
                elif name.split(".")[-1] == "bias":
                    p.zero_()
        self.shadow = shadow

    def reroute(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any, mask: torch.Tensor, edit: Edit) -> Any:
        logits = first_tensor(output)
        x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
        new = _apply(logits, mask, edit, None if x is None else x.reshape(-1, x.shape[-1]))
        if self.shadow is None:
            return replace_first(output, new)
        n, e = new.shape
        padded = new.new_zeros((n, self.hidden_size))
        padded[:, :e] = new
        return self.shadow(padded, *args[1:], **kwargs)  # the family's extra inputs (e.g. a score bias)


@contextmanager
def lower_index_ties() -> Iterator[None]:
    """``torch.topk`` (function and method) that breaks ties toward the lower index, as docs/methods.md §7 asks
    of recomputed routing: a zeroed router gives every expert the same logit, where
    ``torch.topk``'s choice is unspecified. For distinct values it picks the same entries."""
    original_fn, original_method = torch.topk, torch.Tensor.topk

    def topk(input: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True, **_: Any) -> Any:
        values, indices = torch.sort(input, dim=dim, descending=largest, stable=True)
        return torch.return_types.topk((values.narrow(dim, 0, k), indices.narrow(dim, 0, k)))

    torch.topk = topk  # type: ignore[assignment]
    torch.Tensor.topk = topk  # type: ignore[assignment,method-assign]
    try:
        yield
    finally:
        torch.topk = original_fn  # type: ignore[assignment]
        torch.Tensor.topk = original_method  # type: ignore[method-assign]


class InterventionHooks:
    """Forward hooks on every hook point of a model, installed once; ``edits`` (set per batch)
    decide what each forward pass changes, ``capture`` which outputs it records."""

    def __init__(self, model: nn.Module, arch: Architecture):
        self.model = model
        self.arch = arch
        self.edits: dict[tuple[int, str], list[Edit]] = {}
        self.capture: set[tuple[int, str]] = set()
        self.captured: dict[tuple[int, str], torch.Tensor] = {}
        self.attention_mask: torch.Tensor | None = None  # [R, T] of the current batch (block edits)
        self.last: torch.Tensor | None = None  # [R] last position of each row (block edits)
        self._handles: list[Any] = []
        self._routers: dict[int, _Router] = {}
        hidden = int(router_weight(next(p.router for p in arch.layers if p.router is not None)).shape[1]) if arch.moe_layers else 0
        for p in arch.layers:
            if p.router is not None:
                self._routers[p.index] = _Router(p.router, hidden)

    # -- installation ---------------------------------------------------------------------------
    def install(self) -> None:
        a = self.arch
        self._handles.append(a.embedding.register_forward_hook(self._output_hook(-1, "embed")))
        for p in a.layers:
            self._handles.append(p.layer.register_forward_hook(self._output_hook(p.index, "layer")))
            if p.attention is not None:
                self._handles.append(p.attention.register_forward_hook(self._output_hook(p.index, "attn")))
                self._handles.append(p.attention.register_forward_pre_hook(self._block_hook(p.index), with_kwargs=True))
            if p.mlp is not None:
                self._handles.append(p.mlp.register_forward_hook(self._output_hook(p.index, "mlp")))
            if p.router is not None:
                self._handles.append(p.router.register_forward_hook(self._router_hook(p.index), with_kwargs=True))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def prepare_routers(self, sample_input: dict[str, torch.Tensor], run: Callable[[dict[str, Any]], Any] | None = None) -> None:
        """Run one clean forward to learn each router's output form (done once). ``run`` makes the
        call (default: the model itself); each router is prepared while its layer runs, so a
        layer-streamed model copies its router while the weights are there."""
        done: set[int] = set()

        def recorder(i: int) -> Callable[..., None]:
            def record(module: nn.Module, args: Any, output: Any) -> None:
                if i not in done:
                    done.add(i)
                    self._routers[i].prepare(args, output)
            return record

        handles = [r.router.register_forward_hook(recorder(i)) for i, r in self._routers.items()]
        try:
            with torch.no_grad():
                if run is None:
                    self.model(**sample_input, use_cache=False)
                else:
                    run(sample_input)
        finally:
            for h in handles:
                h.remove()

    # -- hooks ----------------------------------------------------------------------------------
    def _output_hook(self, layer: int, point: str) -> Callable[..., Any]:
        key = (layer, point)

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if key in self.capture:
                self.captured[key] = self._as_rows(first_tensor(output))
            edits = self.edits.get(key)
            if not edits:
                return None
            t = first_tensor(output)
            for edit in edits:
                t = _apply(t, edit.mask, edit)
            return replace_first(output, t)

        return hook

    def _router_hook(self, layer: int) -> Callable[..., Any]:
        key = (layer, "router")
        router = self._routers[layer]

        def hook(module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
            if key in self.capture:
                self.captured[key] = self._as_rows(first_tensor(output))
            edits = self.edits.get(key)
            if not edits:
                return None
            for edit in edits:
                output = router.reroute(args, kwargs, output, edit.mask, edit)
            return output

        return hook

    def _as_rows(self, t: torch.Tensor) -> torch.Tensor:
        """A captured output as [R, T, ·] (routers and some MoE blocks return tokens flattened)."""
        t = t.detach().clone()
        if t.dim() == 2 and self.attention_mask is not None:
            R, T = self.attention_mask.shape
            t = t.view(R, T, -1)
        return t

    def _block_hook(self, layer: int) -> Callable[..., Any]:
        key = (layer, "block")

        def hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> Any:
            edits = self.edits.get(key)
            if not edits:
                return None
            if "attention_mask" not in kwargs:
                raise ConfigError(f"{type(module).__name__} takes no attention_mask keyword; attention blocking is not available for it")
            mask = kwargs["attention_mask"]
            if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 4):
                raise ConfigError(f"layer {layer}: {type(module).__name__} takes no 4-D attention mask (linear attention?); "
                                  "attention blocking needs softmax attention: choose layers without it")
            keys = edits[0].mask
            for e in edits[1:]:
                keys = keys | e.mask
            kwargs["attention_mask"] = blocked_mask(kwargs["attention_mask"], self.attention_mask, self.last, keys)
            return args, kwargs

        return hook

    @contextmanager
    def installed(self) -> Iterator["InterventionHooks"]:
        self.install()
        try:
            yield self
        finally:
            self.remove()


def blocked_mask(mask: torch.Tensor | None, padding: torch.Tensor, last: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The 4-D attention mask with the last query position of each row barred from ``keys``.

    ``mask`` is what the layer received: None (sdpa's implicit causal mask), a boolean mask (True =
    attend) or an additive float mask; ``padding`` [R, T] marks real tokens, ``last`` [R] each row's
    last position, ``keys`` [R, T] the key positions to bar."""
    T = padding.shape[1]
    query = torch.arange(T, device=padding.device)[None, :] == last[:, None]  # [R, T]
    return barred_mask(mask, padding, query[:, :, None] & keys[:, None, :])


def barred_mask(mask: torch.Tensor | None, padding: torch.Tensor, bar: torch.Tensor) -> torch.Tensor:
    """The 4-D attention mask with the (query, key) pairs of ``bar`` [R, T, T] barred.

    ``mask`` is what the layer received: None (sdpa's implicit causal mask), a boolean mask (True =
    attend) or an additive float mask; ``padding`` [R, T] marks real tokens."""
    R, T = padding.shape
    bar = bar.unsqueeze(1)  # [R, 1, T, T]
    if mask is None:
        causal = torch.ones(T, T, dtype=torch.bool, device=padding.device).tril()
        mask = causal[None, None] & padding.bool()[:, None, None, :]
    mask = mask.expand(R, *mask.shape[1:]) if mask.shape[0] == 1 and R > 1 else mask
    # The mask's key axis may be longer than the batch (never for these passes) but not shorter.
    tq, tk = mask.shape[-2], mask.shape[-1]
    bar = bar[..., -tq:, :tk] if (tq, tk) != (T, T) else bar
    if mask.dtype == torch.bool:
        return mask & ~bar
    return mask.masked_fill(bar, torch.finfo(mask.dtype).min)


@dataclass(frozen=True)
class Batch:
    """Right-padded token ids of R rows, their lengths, and the device tensors derived from them."""

    input_ids: torch.Tensor  # [R, T]
    attention_mask: torch.Tensor  # [R, T]
    last: torch.Tensor  # [R]

    @staticmethod
    def of(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device, width: int | None = None) -> "Batch":
        """Rows right-padded with ``pad_id`` to ``width`` (default: the longest row)."""
        ids, mask = right_padded(rows, pad_id, device, width)
        return Batch(ids, mask, mask.sum(1) - 1)


def last_logits(model: nn.Module, batch: Batch, lengths: Sequence[int]) -> torch.Tensor:
    """Logits [R, V] at each row's last position. Only the distinct last positions go through the
    LM head (``logits_to_keep``), so a large vocabulary costs R·U·V, U = distinct lengths."""
    kwargs, pick = logits_call(batch, lengths)
    return pick(model(**kwargs))


def logits_call(batch: Batch, lengths: Sequence[int]) -> tuple[dict[str, Any], Callable[[Any], torch.Tensor]]:
    """The keyword arguments of :func:`last_logits`' model call, and the function that takes the
    [R, V] last-position logits out of its output (for runtimes that make the call themselves)."""
    unique = sorted(set(int(n) - 1 for n in lengths))
    keep = torch.tensor(unique, dtype=torch.long, device=batch.input_ids.device)
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "use_cache": False, "logits_to_keep": keep}

    def pick(out: Any) -> torch.Tensor:
        logits = out.logits  # [R, U, V]
        if logits.shape[1] != len(unique):  # a model that ignores logits_to_keep returns every position
            return logits[torch.arange(logits.shape[0], device=logits.device), batch.last]
        index = {p: i for i, p in enumerate(unique)}
        column = torch.tensor([index[int(n) - 1] for n in lengths], dtype=torch.long, device=logits.device)
        return logits[torch.arange(logits.shape[0], device=logits.device), column]

    return kwargs, pick


def batch_for_hooks(hooks: InterventionHooks, rows: Sequence[Sequence[int]], pad_id: int, device: torch.device, width: int,
                    edits: dict[tuple[int, str], list[Edit]]) -> tuple[Batch, dict[str, Any], Callable[[Any], torch.Tensor], Callable[[], None]]:
    """``rows`` padded to ``width`` as a batch; its model call's keyword arguments and last-logits
    picker (:func:`logits_call`); and the function that points ``hooks`` at it (its attention mask,
    last positions and ``edits``), called before the batch runs through a layer."""
    batch = Batch.of(rows, pad_id, device, width)
    kwargs, pick = logits_call(batch, [len(r) for r in rows])

    def point() -> None:
        hooks.attention_mask = batch.attention_mask
        hooks.last = batch.last
        hooks.edits = edits

    return batch, kwargs, pick, point


__all__ = ["Batch", "Edit", "InterventionHooks", "POINTS", "batch_for_hooks", "lower_index_ties", "barred_mask", "blocked_mask", "last_logits",
           "logits_call"]
