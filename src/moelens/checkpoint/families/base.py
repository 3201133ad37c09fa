"""What a family adapter is: the family's config read into layers, experts and top-k, and its
tensors found on disk, as the uniform view of :mod:`moelens.checkpoint.model`.

Adding a family is one module in this package that subclasses :class:`Family` (usually
:class:`StandardFamily`, filling in names and candidate expert layouts from
:mod:`moelens.checkpoint.families.layouts`) and decorates it with
:func:`moelens.checkpoint.registry.register`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Sequence

from moelens.checkpoint.families.layouts import (
    ExpertLayout,
    bind_layout,
    check_finite,
    format_shape,
    layout_example,
    shape_problem,
)
from moelens.checkpoint.store import TensorStore
from moelens.checkpoint.weights import ExpertWeights, RouterWeights
from moelens.errors import CheckpointFormatError, ConfigError

if TYPE_CHECKING:  # torch is imported where tensors are made, not when a family is listed
    import torch


def first_key(config: dict[str, Any], keys: Sequence[str], default: Any = None) -> Any:
    """The value of the first key present in ``config`` (config spellings vary by family)."""
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    return default


class Family:
    """A model family: reads its config and its tensors into the uniform view.

    Class attributes identify the family: ``name`` (moelens' spelling), ``architectures``
    (``config.json["architectures"]`` values) and ``model_types`` (``config.json["model_type"]``).
    ``tiny_layouts`` lists the on-disk layouts the test fixtures build for it."""

    name: ClassVar[str] = "?"
    architectures: ClassVar[tuple[str, ...]] = ()
    model_types: ClassVar[tuple[str, ...]] = ()
    tiny_layouts: ClassVar[tuple[str, ...]] = ("per_expert",)
    is_dense: ClassVar[bool] = False

    def __init__(self, config: dict[str, Any], store: TensorStore):
        self.config = config
        self.store = store

    # structure ---------------------------------------------------------------------------------
    def n_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    def moe_layer_indices(self) -> list[int]:
        raise NotImplementedError

    def n_experts(self, L: int) -> int:
        raise NotImplementedError

    def top_k(self) -> int:
        return int(first_key(self.config, ("num_experts_per_tok", "moe_k", "top_k", "num_selected_experts", "experts_per_token"), 0))

    def expert_ffn(self, L: int) -> int:
        raise NotImplementedError

    def n_shared_experts(self) -> int:
        return 0

    # Config keys of the routed experts' width F, in order of preference: families with both a
    # dense MLP and experts spell the experts' width moe_intermediate_size.
    expert_ffn_keys: ClassVar[tuple[str, ...]] = ("moe_intermediate_size", "intermediate_size")

    def config_expert_ffn(self) -> Optional[int]:
        """The routed experts' width F as ``config.json`` states it; None where it does not
        (then the checkpoint's first expert says)."""
        return positive_int(first_key(self.config, self.expert_ffn_keys))

    def config_shared_expert_ffn(self) -> Optional[int]:
        """The shared expert's width as ``config.json`` states it; None where it does not."""
        return None

    def expert_dtype(self) -> str:
        raise NotImplementedError

    def layout_name(self) -> str:
        raise NotImplementedError

    def expert_parameter_count(self, L: int) -> int:
        raise NotImplementedError

    def check_layer(self, L: int) -> None:
        """Raise :class:`CheckpointFormatError` if MoE layer ``L`` is incomplete on disk; reads
        headers only. The default touches what every analysis needs: router and expert shapes."""
        self.n_experts(L)
        self.expert_ffn(L)

    # tensors -----------------------------------------------------------------------------------
    def check_weights_readable(self) -> None:
        """Raise :class:`~moelens.errors.UnsupportedArchitectureError` when this family's tensors
        cannot be read by name (a causal LM opened for forward passes only); else nothing."""

    def router(self, L: int) -> RouterWeights:
        raise NotImplementedError

    def expert_matrix(self, L: int, e: int, role: str) -> torch.Tensor:
        raise NotImplementedError

    def expert(self, L: int, e: int) -> ExpertWeights:
        raise NotImplementedError

    def expert_stack(self, L: int, role: str) -> torch.Tensor:
        raise NotImplementedError

    def shared_experts(self, L: int) -> list[ExpertWeights]:
        return []

    def shared_expert_gate(self, L: int) -> Optional[torch.Tensor]:
        return None

    def attention(self, L: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def dense_mlp(self, L: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # test fixtures -----------------------------------------------------------------------------
    @classmethod
    def tiny_config(cls) -> Any:
        """A transformers config of a tiny model of this family (hidden 32-64, 2-4 layers, 4-8
        experts), used by :mod:`moelens.testing.tiny` to build test checkpoints."""
        raise NotImplementedError


class StandardFamily(Family):
    """A family described by tensor-name templates (``{L}`` = layer index, ``{e}`` = expert).

    Subclasses set the class attributes below and override :meth:`moe_layer_indices` when not
    every layer is MoE. Names are relative to the checkpoint root."""

    layer_prefix: ClassVar[str] = "model.layers.{L}."
    # e.g. "mlp.gate.weight" (relative to layer_prefix); a tuple lists candidates in order, since
    # transformers v5 renames some routers in the fused layout.
    router_weight: ClassVar[str | tuple[str, ...]] = ""
    # optional tensors; a tuple lists candidate names, the first present is read
    router_bias: ClassVar[str | tuple[str, ...] | None] = None
    score_correction_bias: ClassVar[str | tuple[str, ...] | None] = None
    expert_layouts: ClassVar[tuple[ExpertLayout, ...]] = ()  # templates relative to layer_prefix
    shared_expert_layouts: ClassVar[tuple[ExpertLayout, ...]] = ()  # PerExpert with {e} unused or shared index
    shared_gate_weight: ClassVar[Optional[str]] = None
    attention_names: ClassVar[dict[str, str]] = {
        "q": "self_attn.q_proj.weight",
        "k": "self_attn.k_proj.weight",
        "v": "self_attn.v_proj.weight",
        "o": "self_attn.o_proj.weight",
    }
    dense_mlp_names: ClassVar[dict[str, str]] = {
        "gate": "mlp.gate_proj.weight",
        "up": "mlp.up_proj.weight",
        "down": "mlp.down_proj.weight",
    }
    expert_count_keys: ClassVar[tuple[str, ...]] = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")

    def __init__(self, config: dict[str, Any], store: TensorStore):
        super().__init__(config, store)
        self._layout_cache: dict[int, ExpertLayout] = {}

    def _full(self, template: str, L: int) -> str:
        return (self.layer_prefix + template).format(L=L, e="{e}")

    # structure ---------------------------------------------------------------------------------
    def moe_layer_indices(self) -> list[int]:
        return list(range(self.n_layers()))

    def config_n_experts(self) -> int:
        return int(first_key(self.config, self.expert_count_keys, 0))

    def _router_name(self, L: int) -> str:
        candidates = (self.router_weight,) if isinstance(self.router_weight, str) else self.router_weight
        for c in candidates:
            if self._full(c, L) in self.store:
                return self._full(c, L)
        raise CheckpointFormatError(
            f"the router of layer {L} is missing: none of {', '.join(self._full(c, L) for c in candidates)} "
            f"is in {self.store.directory}; the checkpoint is incomplete or not a {self.name} checkpoint"
        )

    def n_experts(self, L: int) -> int:
        return self.store.shape(self._router_name(L))[0]

    def _layout(self, L: int) -> ExpertLayout:
        lay = self._layout_cache.get(L)
        if lay is not None:
            return lay
        for candidate in self.expert_layouts:
            bound = bind_layout(candidate, self.layer_prefix)
            if bound.present(self.store, L):
                self._layout_cache[L] = bound
                return bound
        raise CheckpointFormatError(
            f"layer {L} of this {self.name} checkpoint has none of the expert layouts moelens knows "
            f"({', '.join(c.name for c in self.expert_layouts)}); expected tensors like "
            f"{layout_example(self.expert_layouts[0], self.layer_prefix, L)!r}"
        )

    def layout_name(self) -> str:
        return self._layout(self.moe_layer_indices()[0]).name

    def expert_ffn(self, L: int) -> int:
        return self._layout(L).ffn(self.store, L)

    def expert_dtype(self) -> str:
        moe = self.moe_layer_indices()
        if not moe:
            return self.store.dtype(self._full(self.attention_names["q"], 0)) if self.attention_names else "?"
        return self._layout(moe[0]).dtype(self.store, moe[0])

    def expert_parameter_count(self, L: int) -> int:
        return self._layout(L).parameter_count(self.store, L)

    def check_layer(self, L: int) -> None:
        """Raise :class:`CheckpointFormatError` if MoE layer ``L`` is incomplete (a missing
        tensor) or malformed (a tensor whose shape is not what ``config.json`` implies: router
        [E, d], every expert's matrices, fused tensors as a whole, shared experts). Headers only."""
        d = self.hidden_size()
        router = self._router_name(L)
        # E as the config states it, so that a router with extra or missing rows is named as
        # the malformed tensor rather than every expert being counted against it
        n = self.config_n_experts()
        sources = {"E": "config.json", "d": "config.json"}
        if n <= 0:
            n, sources["E"] = self.store.shape(router)[0], "the router"
        malformed = shape_problem(self.store, router, (n, d), "[E, d]")
        for template in (self.router_bias, self.score_correction_bias):
            name = self._first_present(template, L)
            if name is not None and math.prod(self.store.shape(name)) != n:
                malformed.append(
                    f"tensor {name!r} has shape {format_shape(self.store.shape(name))} where E = {n} values are expected"
                )
        layout = self._layout(L)
        missing = layout.problems(self.store, L, n) + self.shared_expert_problems(L)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointFormatError(
                f"layer {L} of {self.store.directory} is incomplete: {missing[0]}{more}; "
                "the checkpoint is partly downloaded or damaged, re-download it"
            )
        f = self.config_expert_ffn()
        sources["F"] = "config.json"
        if f is None:
            f, sources["F"] = layout.ffn(self.store, L), "the layer's first expert"
        malformed += layout.shape_problems(self.store, L, n, d, f)
        malformed += self.shared_expert_shape_problems(L, d)
        if malformed:
            more = f" (and {len(malformed) - 1} more)" if len(malformed) > 1 else ""
            sizes = {"E": n, "F": f, "d": d}
            by_source: dict[str, list[str]] = {}
            for axis in ("E", "F", "d"):
                by_source.setdefault(sources[axis], []).append(f"{axis} = {sizes[axis]}")
            where = ", ".join(f"{_and(axes)} from {source}" for source, axes in by_source.items())
            raise CheckpointFormatError(
                f"layer {L} of {self.store.directory} is malformed: {malformed[0]}{more} ({where}); "
                "the checkpoint is damaged or does not match its config.json, re-download it"
            )

    def _shared_layout(self, L: int) -> Optional[ExpertLayout]:
        """The first of the family's shared-expert layouts present in layer ``L``, if any."""
        for candidate in self.shared_expert_layouts:
            bound = bind_layout(candidate, self.layer_prefix)
            if bound.present(self.store, L):
                return bound
        return None

    def shared_expert_problems(self, L: int) -> list[str]:
        """Missing shared-expert tensors of MoE layer ``L``: part of a shared expert, or all of
        it where the config declares one; [] when complete."""
        lay = self._shared_layout(L)
        if lay is not None:
            return lay.problems(self.store, L, 1)
        if self.shared_expert_layouts and self.n_shared_experts() > 0:
            example = layout_example(self.shared_expert_layouts[0], self.layer_prefix, L)
            return [f"{example} is missing (config.json declares a shared expert)"]
        return []

    def shared_expert_shape_problems(self, L: int, d: int) -> list[str]:
        """Shared-expert tensors (and the shared expert's gate) of layer ``L`` whose shapes are
        not [Fs, d] / [d, Fs] / [1, d], Fs from the config or else from the stored up matrix."""
        out: list[str] = []
        lay = self._shared_layout(L)
        if lay is not None:
            fs = self.config_shared_expert_ffn() or lay.ffn(self.store, L)
            out += lay.shape_problems(self.store, L, 1, d, fs, f_name="Fs")
        if self.shared_gate_weight is not None and self._full(self.shared_gate_weight, L) in self.store:
            out += shape_problem(self.store, self._full(self.shared_gate_weight, L), (1, d), "[1, d]")
        return out

    # tensors -----------------------------------------------------------------------------------
    def _first_present(self, template: str | tuple[str, ...] | None, L: int) -> Optional[str]:
        """The full name of the first present of one or several candidate tensors; None if none is."""
        if template is None:
            return None
        for candidate in (template,) if isinstance(template, str) else template:
            name = self._full(candidate, L)
            if name in self.store:
                return name
        return None

    def _read_opt(self, template: str | tuple[str, ...] | None, L: int) -> torch.Tensor | None:
        """The first present of one or several candidate tensors, flattened; None if none is."""
        name = self._first_present(template, L)
        return None if name is None else self.store.read(name).reshape(-1)

    def router(self, L: int) -> RouterWeights:
        name = self._router_name(L)
        weight = check_finite(name, self.store.read(name))
        return RouterWeights(
            weight=weight,
            bias=self._read_opt(self.router_bias, L),
            score_correction_bias=self._read_opt(self.score_correction_bias, L),
        )

    def expert_matrix(self, L: int, e: int, role: str) -> torch.Tensor:
        m = self._layout(L).matrix(self.store, L, e, role)
        if m is None:
            raise ConfigError(f"{self.name} experts have no {role!r} matrix; use 'up' or 'down'")
        return m

    def expert(self, L: int, e: int) -> ExpertWeights:
        lay = self._layout(L)
        return ExpertWeights(
            gate=lay.matrix(self.store, L, e, "gate"),
            up=lay.matrix(self.store, L, e, "up"),
            down=lay.matrix(self.store, L, e, "down"),
            gate_bias=lay.bias(self.store, L, e, "gate"),
            up_bias=lay.bias(self.store, L, e, "up"),
            down_bias=lay.bias(self.store, L, e, "down"),
        )

    def expert_stack(self, L: int, role: str) -> torch.Tensor:
        return self._layout(L).stack(self.store, L, role)

    def shared_experts(self, L: int) -> list[ExpertWeights]:
        bound = self._shared_layout(L)
        if bound is None:
            return []
        return [
            ExpertWeights(
                gate=bound.matrix(self.store, L, e, "gate"),
                up=bound.matrix(self.store, L, e, "up"),
                down=bound.matrix(self.store, L, e, "down"),
            )
            for e in range(bound.n_experts(self.store, L))
        ]

    def shared_expert_gate(self, L: int) -> Optional[torch.Tensor]:
        if self.shared_gate_weight is None:
            return None
        name = self._full(self.shared_gate_weight, L)
        return self.store.read(name) if name in self.store else None

    def attention(self, L: int) -> dict[str, torch.Tensor]:
        out = {}
        for key, template in self.attention_names.items():
            name = self._full(template, L)
            if name in self.store:
                out[key] = check_finite(name, self.store.read(name))  # NaN would reach eigh as a traceback
        return out

    def dense_mlp(self, L: int) -> dict[str, torch.Tensor]:
        out = {}
        for key, template in self.dense_mlp_names.items():
            name = self._full(template, L)
            out[key] = check_finite(name, self.store.read(name))
        return out


def _and(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def positive_int(value: Any) -> Optional[int]:
    """``value`` if it is a positive integer, else None (config values may be missing, null or
    lists)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value
