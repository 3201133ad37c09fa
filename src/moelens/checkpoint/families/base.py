"""What a family adapter is, and the building blocks most families are made of.

A family adapter knows two things about one model family: how to read its ``config.json``
(layers, experts, top-k, which layers are MoE) and where its tensors lie on disk. It turns both
into the uniform view of :mod:`moelens.checkpoint.model`. Adding a family is one module in this
package that subclasses :class:`Family` (usually :class:`StandardFamily`, filling in names) and
decorates it with :func:`moelens.checkpoint.registry.register`.

Expert layouts are small objects because the same layout recurs across families:
:class:`PerExpert` (one tensor per expert and role, name templates with ``{L}`` and ``{e}``),
:class:`FusedGateUp` (a [E, 2F, d] or [E, d, 2F] gate_up tensor and a [E, ...] down tensor),
and :class:`FlatExperts` (DBRX: experts stacked along the rows of a 2-D tensor).
A family lists its candidate layouts; the first whose tensors exist in the checkpoint is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Sequence

from moelens.checkpoint.model import ExpertWeights, RouterWeights
from moelens.checkpoint.store import TensorStore
from moelens.errors import CheckpointFormatError, ConfigError

if TYPE_CHECKING:  # torch is imported where tensors are made, not when a family is listed
    import torch


def first_key(config: dict[str, Any], keys: Sequence[str], default: Any = None) -> Any:
    """The value of the first key present in ``config`` (config spellings vary by family)."""
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    return default


def check_finite(name: str, t: torch.Tensor) -> torch.Tensor:
    """NaN or inf in a weight makes every downstream number meaningless: refuse it."""
    import torch

    if t.is_floating_point() and not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointFormatError(f"tensor {name!r} holds {bad} NaN/inf values; the checkpoint is corrupt or was saved mid-divergence")
    return t


def format_shape(shape: Sequence[int]) -> str:
    """``[48, 32]``: shapes in messages are written as lists, as in safetensors headers."""
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def shape_problem(store: TensorStore, name: str, expected: Sequence[int], axes: str) -> list[str]:
    """[] if tensor ``name`` has the ``expected`` shape, else one line naming the tensor, its
    shape, and the expected shape with its axes spelled out (``axes`` like ``"[F, d]"``)."""
    shape = store.shape(name)
    if tuple(shape) == tuple(int(s) for s in expected):
        return []
    return [f"tensor {name!r} has shape {format_shape(shape)} where {axes} = {format_shape(expected)} is expected"]


# ----------------------------------------------------------------------------------------------
# Expert layouts
# ----------------------------------------------------------------------------------------------
class ExpertLayout:
    """Where one layer's experts lie. Subclasses read one expert's role matrix as [out, in]."""

    name: str = "?"

    def present(self, store: TensorStore, L: int) -> bool:
        raise NotImplementedError

    def n_experts(self, store: TensorStore, L: int) -> int:
        raise NotImplementedError

    def ffn(self, store: TensorStore, L: int) -> int:
        raise NotImplementedError

    def matrix(self, store: TensorStore, L: int, e: int, role: str) -> Optional[torch.Tensor]:
        raise NotImplementedError

    def bias(self, store: TensorStore, L: int, e: int, role: str) -> Optional[torch.Tensor]:
        return None

    def stack(self, store: TensorStore, L: int, role: str) -> torch.Tensor:
        import torch

        mats = [self.matrix(store, L, e, role) for e in range(self.n_experts(store, L))]
        return torch.stack(mats)

    def dtype(self, store: TensorStore, L: int) -> str:
        raise NotImplementedError

    def parameter_count(self, store: TensorStore, L: int) -> int:
        raise NotImplementedError

    def problems(self, store: TensorStore, L: int, n: int) -> list[str]:
        """What keeps layer ``L`` from holding all ``n`` experts its router scores (missing
        tensors, wrong expert counts), from headers only; [] when complete."""
        stored = self.n_experts(store, L)
        return [] if stored == n else [f"{stored} experts are stored where the router scores {n}"]

    def shape_problems(self, store: TensorStore, L: int, n: int, d: int, f: int, f_name: str = "F") -> list[str]:
        """Every stored tensor of layer ``L``'s ``n`` experts whose shape is not what hidden size
        ``d`` and expert width ``f`` imply, from headers only; [] when all agree. Called once
        :meth:`problems` found the layer complete. ``f_name`` is how messages spell the width
        (``"Fs"`` for a shared expert)."""
        raise NotImplementedError


@dataclass(frozen=True)
class PerExpert(ExpertLayout):
    """One tensor per (expert, role). Templates use ``{L}`` (layer) and ``{e}`` (expert), e.g.
    ``"model.layers.{L}.block_sparse_moe.experts.{e}.w1.weight"``. ``gate`` may be None for an
    ungated FFN. Bias templates are optional."""

    gate: Optional[str]
    up: str
    down: str
    gate_bias: Optional[str] = None
    up_bias: Optional[str] = None
    down_bias: Optional[str] = None
    name: str = "per_expert"

    def _name(self, role: str, L: int, e: int) -> Optional[str]:
        t = getattr(self, role)
        return None if t is None else t.format(L=L, e=e)

    def present(self, store: TensorStore, L: int) -> bool:
        return self.up.format(L=L, e=0) in store

    def n_experts(self, store: TensorStore, L: int) -> int:
        if "{e}" not in self.up:  # one MLP, e.g. a shared expert: counting would never end
            return int(self.present(store, L))
        e = 0
        while self.up.format(L=L, e=e) in store:
            e += 1
        return e

    def ffn(self, store: TensorStore, L: int) -> int:
        return store.shape(self.up.format(L=L, e=0))[0]

    def matrix(self, store: TensorStore, L: int, e: int, role: str) -> Optional[torch.Tensor]:
        name = self._name(role, L, e)
        if name is None:
            return None
        return check_finite(name, store.read(name))

    def bias(self, store: TensorStore, L: int, e: int, role: str) -> Optional[torch.Tensor]:
        t = getattr(self, f"{role}_bias")
        if t is None or t.format(L=L, e=e) not in store:
            return None
        return store.read(t.format(L=L, e=e))

    def dtype(self, store: TensorStore, L: int) -> str:
        return store.dtype(self.up.format(L=L, e=0))

    def parameter_count(self, store: TensorStore, L: int) -> int:
        total = 0
        for e in range(self.n_experts(store, L)):
            for role in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias"):
                t = getattr(self, role)
                if t is not None and t.format(L=L, e=e) in store:
                    total += math.prod(store.shape(t.format(L=L, e=e)))
        return total

    def problems(self, store: TensorStore, L: int, n: int) -> list[str]:
        if "{e}" not in self.up:  # one MLP (a shared expert): all of its matrices
            n = 1
        names = (t.format(L=L, e=e) for e in range(n) for t in (self.gate, self.up, self.down) if t is not None)
        return [f"{name} is missing" for name in names if name not in store]

    def shape_problems(self, store: TensorStore, L: int, n: int, d: int, f: int, f_name: str = "F") -> list[str]:
        F = f_name
        expected = (
            ("gate", (f, d), f"[{F}, d]"), ("up", (f, d), f"[{F}, d]"), ("down", (d, f), f"[d, {F}]"),
            ("gate_bias", (f,), f"[{F}]"), ("up_bias", (f,), f"[{F}]"), ("down_bias", (d,), "[d]"),
        )
        out: list[str] = []
        for e in range(n if "{e}" in self.up else 1):
            for attr, shape, axes in expected:
                template = getattr(self, attr)
                if template is not None and template.format(L=L, e=e) in store:  # biases are optional
                    out += shape_problem(store, template.format(L=L, e=e), shape, axes)
        return out


@dataclass(frozen=True)
class FusedGateUp(ExpertLayout):
    """Experts fused in 3-D tensors: ``gate_up`` [E, 2F, d] and ``down`` [E, d, F] when
    ``orientation == "out_in"`` (transformers v5 in memory, Granite, JetMoE), or [E, d, 2F] and
    [E, F, d] when ``"in_out"`` (GPT-OSS, Llama4). ``split`` says where gate and up are inside the
    2F axis: ``"halves"`` (gate first) or ``"interleaved"`` (gate = even, up = odd; GPT-OSS).
    Optional biases: ``gate_up_bias`` [E, 2F], ``down_bias`` [E, d]."""

    gate_up: str
    down: str
    orientation: str = "out_in"
    split: str = "halves"
    gate_up_bias: Optional[str] = None
    down_bias: Optional[str] = None
    name: str = "fused"

    def present(self, store: TensorStore, L: int) -> bool:
        return self.gate_up.format(L=L) in store and self.down.format(L=L) in store

    def n_experts(self, store: TensorStore, L: int) -> int:
        return store.shape(self.gate_up.format(L=L))[0]

    def ffn(self, store: TensorStore, L: int) -> int:
        shape = store.shape(self.gate_up.format(L=L))
        two_f = shape[1] if self.orientation == "out_in" else shape[2]
        return two_f // 2

    def _split(self, gu: torch.Tensor, role: str, axis: int) -> torch.Tensor:
        """Take gate or up out of the 2F axis ``axis`` of ``gu``."""
        import torch

        two_f = gu.shape[axis]
        if self.split == "interleaved":
            idx = torch.arange(0 if role == "gate" else 1, two_f, 2)
            return gu.index_select(axis, idx)
        f = two_f // 2
        return gu.narrow(axis, 0 if role == "gate" else f, f)

    def matrix(self, store: TensorStore, L: int, e: int, role: str) -> Optional[torch.Tensor]:
        if role == "down":
            name = self.down.format(L=L)
            m = store.read(name, index=e)  # [d, F] out_in, [F, d] in_out
            m = m if self.orientation == "out_in" else m.T
        else:
            name = self.gate_up.format(L=L)
            axis = 0 if self.orientation == "out_in" else 1  # the 2F axis of [2F, d] or [d, 2F]
            if self.split == "halves":
                f = self.ffn(store, L)
                m = store.read_part(name, e, axis, 0 if role == "gate" else f, f if role == "gate" else 2 * f)
            else:
                m = self._split(store.read(name, index=e), role, axis)
            m = m if self.orientation == "out_in" else m.T
        return check_finite(name, m.contiguous())

    def stack(self, store: TensorStore, L: int, role: str) -> torch.Tensor:
        if role == "down":
            name = self.down.format(L=L)
            m = store.read(name)
            m = m if self.orientation == "out_in" else m.transpose(1, 2)
        else:
            name = self.gate_up.format(L=L)
            axis = 1 if self.orientation == "out_in" else 2  # the 2F axis of [E, 2F, d] or [E, d, 2F]
            if self.split == "halves":
                f = self.ffn(store, L)
                m = store.read_part(name, None, axis, 0 if role == "gate" else f, f if role == "gate" else 2 * f)
            else:
                m = self._split(store.read(name), role, axis)
            m = m if self.orientation == "out_in" else m.transpose(1, 2)
        return check_finite(name, m.contiguous())

    def bias(self, store: TensorStore, L: int, e: int, role: str) -> Optional[torch.Tensor]:
        if role == "down":
            if self.down_bias is None or self.down_bias.format(L=L) not in store:
                return None
            return store.read(self.down_bias.format(L=L), index=e)
        if self.gate_up_bias is None or self.gate_up_bias.format(L=L) not in store:
            return None
        b = store.read(self.gate_up_bias.format(L=L), index=e)
        return self._split(b, role, 0)

    def dtype(self, store: TensorStore, L: int) -> str:
        return store.dtype(self.gate_up.format(L=L))

    def parameter_count(self, store: TensorStore, L: int) -> int:
        names = [self.gate_up, self.down, self.gate_up_bias, self.down_bias]
        return sum(math.prod(store.shape(n.format(L=L))) for n in names if n is not None and n.format(L=L) in store)

    def problems(self, store: TensorStore, L: int, n: int) -> list[str]:
        out = []
        for t in (self.gate_up, self.down):
            name = t.format(L=L)
            if name not in store:
                out.append(f"{name} is missing")
            elif store.shape(name)[0] != n:
                out.append(f"{name} holds {store.shape(name)[0]} experts where the router scores {n}")
        return out

    def shape_problems(self, store: TensorStore, L: int, n: int, d: int, f: int, f_name: str = "F") -> list[str]:
        F = f_name
        if self.orientation == "out_in":
            gate_up, down = ((n, 2 * f, d), f"[E, 2{F}, d]"), ((n, d, f), f"[E, d, {F}]")
        else:
            gate_up, down = ((n, d, 2 * f), f"[E, d, 2{F}]"), ((n, f, d), f"[E, {F}, d]")
        expected = [(self.gate_up, *gate_up), (self.down, *down)]
        expected += [(self.gate_up_bias, (n, 2 * f), f"[E, 2{F}]"), (self.down_bias, (n, d), "[E, d]")]
        out: list[str] = []
        for template, shape, axes in expected:
            if template is not None and template.format(L=L) in store:  # biases are optional
                out += shape_problem(store, template.format(L=L), shape, axes)
        return out


@dataclass(frozen=True)
class FlatExperts(ExpertLayout):
    """Experts stacked along the rows of 2-D tensors (DBRX): ``gate``, ``up`` and ``down`` are
    each [E·F, d], expert ``e`` owning rows ``e·F:(e+1)·F``. Gate and up rows are [out, in];
    down rows are [in, out] (``down_transposed``), so down is transposed on read. The tensors do
    not carry E, so it is taken from the first axis of the ``router`` tensor."""

    gate: str
    up: str
    down: str
    router: str
    down_transposed: bool = True
    name: str = "flat"

    def present(self, store: TensorStore, L: int) -> bool:
        return all(t.format(L=L) in store for t in (self.gate, self.up, self.down, self.router))

    def n_experts(self, store: TensorStore, L: int) -> int:
        return store.shape(self.router.format(L=L))[0]

    def ffn(self, store: TensorStore, L: int) -> int:
        rows = store.shape(self.up.format(L=L))[0]
        n = self.n_experts(store, L)
        if rows % n:
            raise CheckpointFormatError(
                f"{self.up.format(L=L)} has {rows} rows, not a multiple of the {n} experts its router scores; "
                "the checkpoint is inconsistent"
            )
        return rows // n

    def matrix(self, store: TensorStore, L: int, e: int, role: str) -> Optional[torch.Tensor]:
        name = getattr(self, role).format(L=L)
        f = self.ffn(store, L)
        m = store.read(name, index=slice(e * f, (e + 1) * f))  # only this expert's rows
        if role == "down" and self.down_transposed:
            m = m.T
        return check_finite(name, m.contiguous())

    def stack(self, store: TensorStore, L: int, role: str) -> torch.Tensor:
        name = getattr(self, role).format(L=L)
        m = store.read(name).reshape(self.n_experts(store, L), self.ffn(store, L), -1)
        if role == "down" and self.down_transposed:
            m = m.transpose(1, 2)
        return check_finite(name, m.contiguous())

    def dtype(self, store: TensorStore, L: int) -> str:
        return store.dtype(self.up.format(L=L))

    def parameter_count(self, store: TensorStore, L: int) -> int:
        return sum(math.prod(store.shape(t.format(L=L))) for t in (self.gate, self.up, self.down))

    def problems(self, store: TensorStore, L: int, n: int) -> list[str]:
        out = []
        for t in (self.gate, self.up, self.down):
            name = t.format(L=L)
            if name not in store:
                out.append(f"{name} is missing")
            elif store.shape(name)[0] % n:
                out.append(f"{name} has {store.shape(name)[0]} rows, not a multiple of the {n} experts")
        return out

    def shape_problems(self, store: TensorStore, L: int, n: int, d: int, f: int, f_name: str = "F") -> list[str]:
        F = f_name
        rows = ((n * f, d), f"[E·{F}, d]")
        # each expert's down rows are [in, out] = [F, d] when transposed, else [d, F]
        down = rows if self.down_transposed else ((n * d, f), f"[E·d, {F}]")
        out: list[str] = []
        for template, (shape, axes) in ((self.gate, rows), (self.up, rows), (self.down, down)):
            out += shape_problem(store, template.format(L=L), shape, axes)
        return out



# ----------------------------------------------------------------------------------------------
# Families
# ----------------------------------------------------------------------------------------------
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
            bound = _bind(candidate, self.layer_prefix)
            if bound.present(self.store, L):
                self._layout_cache[L] = bound
                return bound
        raise CheckpointFormatError(
            f"layer {L} of this {self.name} checkpoint has none of the expert layouts moelens knows "
            f"({', '.join(c.name for c in self.expert_layouts)}); expected tensors like "
            f"{_example(self.expert_layouts[0], self.layer_prefix, L)!r}"
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
            bound = _bind(candidate, self.layer_prefix)
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
            example = _example(self.shared_expert_layouts[0], self.layer_prefix, L)
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


def _bind(layout: ExpertLayout, prefix: str) -> ExpertLayout:
    """Prefix every template of a layout with the family's layer prefix."""
    from dataclasses import fields, replace

    changes = {}
    for f in fields(layout):
        v = getattr(layout, f.name)
        if f.name != "name" and isinstance(v, str) and f.name not in ("orientation", "split"):
            changes[f.name] = prefix + v
    return replace(layout, **changes)


def _example(layout: ExpertLayout, prefix: str, L: int) -> str:
    bound = _bind(layout, prefix)
    if isinstance(bound, PerExpert):
        return bound.up.format(L=L, e=0)
    if isinstance(bound, FusedGateUp):
        return bound.gate_up.format(L=L)
    if isinstance(bound, FlatExperts):
        return bound.up.format(L=L)
    return bound.name
