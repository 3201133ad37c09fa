"""Where a layer's experts lie on disk: the expert layouts that recur across families.

:class:`PerExpert` (one tensor per expert and role, name templates with ``{L}`` and ``{e}``),
:class:`FusedGateUp` (a [E, 2F, d] or [E, d, 2F] gate_up tensor and a [E, ...] down tensor),
and :class:`FlatExperts` (DBRX: experts stacked along the rows of a 2-D tensor). A family
(:mod:`moelens.checkpoint.families.base`) lists its candidate layouts; the first whose tensors
exist in the checkpoint is used. Every matrix is read in torch ``Linear`` orientation [out, in].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

from moelens.checkpoint.store import TensorStore
from moelens.errors import CheckpointFormatError

if TYPE_CHECKING:  # torch is imported where tensors are made, not when a family is listed
    import torch


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


def bind_layout(layout: ExpertLayout, prefix: str) -> ExpertLayout:
    """Prefix every template of a layout with the family's layer prefix."""
    from dataclasses import fields, replace

    changes = {}
    for f in fields(layout):
        v = getattr(layout, f.name)
        if f.name != "name" and isinstance(v, str) and f.name not in ("orientation", "split"):
            changes[f.name] = prefix + v
    return replace(layout, **changes)


def layout_example(layout: ExpertLayout, prefix: str, L: int) -> str:
    bound = bind_layout(layout, prefix)
    if isinstance(bound, PerExpert):
        return bound.up.format(L=L, e=0)
    if isinstance(bound, FusedGateUp):
        return bound.gate_up.format(L=L)
    if isinstance(bound, FlatExperts):
        return bound.up.format(L=L)
    return bound.name


__all__ = ["ExpertLayout", "FlatExperts", "FusedGateUp", "PerExpert", "bind_layout", "check_finite", "format_shape",
           "layout_example", "shape_problem"]
