"""The one view of every checkpoint family: ``MoEModel -> MoELayer -> ExpertWeights``.

Every matrix is returned in torch ``Linear`` orientation [out, in]:
``gate`` and ``up`` are [F, d], ``down`` is [d, F], the router is [E, d]. Reads are lazy: nothing
but headers is read until a tensor is asked for, one expert of a fused tensor is read as a slice,
and :meth:`MoELayer.iter_experts` streams experts so peak memory stays near one expert.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional

from moelens.checkpoint.weights import ROLES, ExpertWeights, RouterWeights, check_role  # noqa: F401 (ROLES: read with the model)
from moelens.errors import ConfigError, IndexOutOfRangeError, NotMoEError
from moelens.ranges import compact_ranges

if TYPE_CHECKING:  # torch is imported where tensors are made, not when a family is listed
    import torch

    from moelens.checkpoint.families.base import Family
    from moelens.checkpoint.store import TensorStore

class MoELayer:
    """One MoE block of a model. Obtain it from :meth:`MoEModel.layer`."""

    def __init__(self, model: "MoEModel", index: int):
        self.model = model
        self.index = index
        self._family = model.family_adapter

    def __repr__(self) -> str:
        return f"MoELayer({self.model.name} L{self.index}, E={self.n_experts}, d={self.hidden_size}, F={self.expert_ffn})"

    @property
    def n_experts(self) -> int:
        return self._family.n_experts(self.index)

    @property
    def top_k(self) -> int:
        return self.model.top_k

    @property
    def hidden_size(self) -> int:
        return self.model.hidden_size

    @property
    def expert_ffn(self) -> int:
        return self._family.expert_ffn(self.index)

    def check(self) -> None:
        """Raise :class:`~moelens.errors.CheckpointFormatError` if this layer is incomplete on
        disk or a tensor's shape is not what ``config.json`` implies (headers only; see
        :meth:`MoEModel.check`)."""
        self._family.check_layer(self.index)

    def router(self) -> RouterWeights:
        """The router, weight [E, d] (+ biases where present)."""
        return self._family.router(self.index)

    def _check_expert(self, e: int) -> int:
        e = _as_index(e, "expert")
        if not 0 <= e < self.n_experts:
            raise IndexOutOfRangeError(
                f"expert {e} is out of range: layer {self.index} has experts 0..{self.n_experts - 1}"
            )
        return e

    def expert(self, e: int) -> ExpertWeights:
        """Expert ``e``'s gate, up and down matrices in [out, in] orientation."""
        return self._family.expert(self.index, self._check_expert(e))

    def expert_matrix(self, e: int, role: str) -> torch.Tensor:
        """One matrix of one expert, [out, in]; only that slice is read from disk."""
        check_role(role)
        return self._family.expert_matrix(self.index, self._check_expert(e), role)

    def has_role(self, role: str) -> bool:
        """Whether this layer's experts have a ``role`` matrix (every family has up and down;
        a gate is read to find out)."""
        try:
            self.expert_matrix(0, role)
        except ConfigError:
            return False
        return True

    def expert_stack(self, role: str) -> torch.Tensor:
        """All experts' ``role`` matrices as [E, out, in] in the stored dtype (one role of one
        layer in memory)."""
        check_role(role)
        return self._family.expert_stack(self.index, role)

    def iter_experts(self, role: str) -> Iterator[tuple[int, torch.Tensor]]:
        """Stream ``(e, matrix)`` over experts, one expert in memory at a time."""
        check_role(role)
        for e in range(self.n_experts):
            yield e, self._family.expert_matrix(self.index, e, role)

    def shared_experts(self) -> list[ExpertWeights]:
        """Shared (always-on) experts, [] when the family has none."""
        return self._family.shared_experts(self.index)

    def shared_expert_gate(self) -> Optional[torch.Tensor]:
        """Qwen2-MoE's sigmoid gate of the shared expert, [1, d]; None elsewhere."""
        return self._family.shared_expert_gate(self.index)


class _MoECount:
    """A count the family adapter knows (its method of the same name), 0 for a dense model;
    ``per_layer``: asked of the first MoE layer (every MoE layer of a checkpoint shares it)."""

    def __init__(self, method: str, per_layer: bool = False):
        self.method = method
        self.per_layer = per_layer

    def __get__(self, model: "MoEModel | None", owner: type) -> Any:
        if model is None:
            return self
        if not model.is_moe:
            return 0
        ask = getattr(model.family_adapter, self.method)
        return int(ask(model.moe_layers[0]) if self.per_layer else ask())


@dataclass
class MoEModel:
    """A checkpoint opened for reading. Build it with :func:`moelens.open_model`.

    Attributes mirror ``moelens inspect``: ``family``, ``n_layers``, ``hidden_size`` (d),
    ``moe_layers`` and ``dense_layers`` (indices), ``n_experts`` (E), ``top_k``, ``expert_ffn`` (F),
    ``n_shared_experts``, ``dtype`` (of the expert weights as stored)."""

    path: Path
    source: str
    config: dict[str, Any]
    store: "TensorStore"
    family_adapter: "Family"
    revision: Optional[str] = None
    _layers: dict[int, MoELayer] = field(default_factory=dict, repr=False)

    # -- structure ---------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.family_adapter.name

    @property
    def name(self) -> str:
        """A short name: the repo id when opened from the cache, else the directory name."""
        return self.source if "/" in self.source and not Path(self.source).exists() else self.path.name

    @property
    def n_layers(self) -> int:
        return self.family_adapter.n_layers()

    @property
    def hidden_size(self) -> int:
        return self.family_adapter.hidden_size()

    @property
    def moe_layers(self) -> list[int]:
        return self.family_adapter.moe_layer_indices()

    @property
    def dense_layers(self) -> list[int]:
        moe = set(self.moe_layers)
        return [i for i in range(self.n_layers) if i not in moe]

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    n_experts = _MoECount("n_experts", per_layer=True)
    top_k = _MoECount("top_k")
    expert_ffn = _MoECount("expert_ffn", per_layer=True)
    n_shared_experts = _MoECount("n_shared_experts")

    @property
    def dtype(self) -> str:
        """Stored dtype of the expert weights (``"BF16"``, ``"F32"``, ``"F8_E4M3"``, ``"MXFP4"``)."""
        return self.family_adapter.expert_dtype()

    def dtypes(self) -> dict[str, int]:
        """Count of tensors per stored dtype."""
        out: dict[str, int] = {}
        for info in self.store.infos.values():
            out[info.dtype] = out.get(info.dtype, 0) + 1
        return out

    # -- parameter counts ----------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """``total`` and ``experts`` (routed experts only) parameter counts, from headers only.
        Quantised tensors count logical weights (scales are not parameters)."""
        total = 0
        for name in self.store.infos:
            if name.endswith(("_scale_inv", "_scales")):
                continue
            base = name[: -len("_blocks")] if name.endswith("_blocks") else name
            total += math.prod(self.store.shape(base))
        experts = 0
        for L in self.moe_layers:
            experts += self.family_adapter.expert_parameter_count(L)
        return {"total": total, "experts": experts}

    def size_on_disk(self) -> int:
        return self.store.total_bytes()

    # -- access --------------------------------------------------------------------------------
    def _check_layer(self, i: int) -> int:
        i = _as_index(i, "layer")
        if not 0 <= i < self.n_layers:
            raise IndexOutOfRangeError(f"layer {i} is out of range: {self.name} has layers 0..{self.n_layers - 1}")
        return i

    def layer(self, i: int) -> MoELayer:
        """MoE layer ``i``. Raises :class:`NotMoEError` for a dense layer or a dense model."""
        i = self._check_layer(i)
        if i not in set(self.moe_layers):
            if not self.is_moe:
                raise NotMoEError(f"{self.name} is a dense {self.family} model with no MoE layers; this needs an MoE checkpoint")
            raise NotMoEError(
                f"layer {i} of {self.name} is dense, not MoE; MoE layers are {_ranges(self.moe_layers)}"
            )
        if i not in self._layers:
            self._layers[i] = MoELayer(self, i)
        return self._layers[i]

    def layers(self, indices: Optional[list[int]] = None) -> Iterator[MoELayer]:
        """Iterate over MoE layers (all of them by default)."""
        for i in (self.moe_layers if indices is None else indices):
            yield self.layer(i)

    def attention(self, i: int) -> dict[str, torch.Tensor]:
        """Layer ``i``'s attention projections in [out, in], keyed ``q``, ``k``, ``v``, ``o``.

        Families with other attention keep their own parts: DeepSeek's latent attention gives
        ``q`` (or ``q_a``/``q_b``), ``kv_a``, ``kv_b``, ``o``; JetMoE gives only the shared ``k``
        and ``v``. A layer without attention (a Mamba layer of Jamba, a linear-attention layer
        of Qwen3-Next) gives {}."""
        return self.family_adapter.attention(self._check_layer(i))

    def dense_mlp(self, i: int) -> dict[str, torch.Tensor]:
        """Dense layer ``i``'s MLP ``gate``, ``up``, ``down`` in [out, in]."""
        self._check_layer(i)
        if i in set(self.moe_layers):
            raise NotMoEError(f"layer {i} is an MoE layer; use model.layer({i}) for its experts")
        return self.family_adapter.dense_mlp(i)

    def file_hashes(self, whole: bool = False, whole_files: Iterable[str] = ()) -> dict[str, str]:
        """Fingerprints of config and weight files (see :meth:`TensorStore.file_hashes`):
        sampled for large files unless ``whole`` or named in ``whole_files``."""
        return self.store.file_hashes(max_bytes=-1 if whole else None, whole_files=whole_files)

    def check(self) -> None:
        """Raise :class:`~moelens.errors.CheckpointFormatError` naming a missing or misshapen
        tensor if an MoE layer is incomplete on disk (a partial download) or holds a tensor whose
        shape is not what ``config.json`` implies (router [E, d], each expert's gate/up [F, d]
        and down [d, F], fused expert tensors as a whole, shared experts). Reads headers only, so
        it is cheap at any scale; NaN weights are found when a tensor is read."""
        for i in self.moe_layers:
            self.family_adapter.check_layer(i)

    def summary(self) -> dict[str, Any]:
        """What ``moelens inspect --json`` prints. Checks first that the checkpoint is complete
        (:meth:`check`), so that a summary never describes a partial download."""
        self.check()
        counts = self.parameter_counts()
        return {
            "source": self.source,
            "path": str(self.path),
            "family": self.family,
            "architecture": (self.config.get("architectures") or [None])[0],
            "n_layers": self.n_layers,
            "moe_layers": self.moe_layers,
            "dense_layers": self.dense_layers,
            "n_experts": self.n_experts,
            "top_k": self.top_k,
            "hidden_size": self.hidden_size,
            "expert_ffn": self.expert_ffn,
            "shared_experts": self.n_shared_experts,
            "dtype": self.dtype,
            "dtypes": self.dtypes(),
            "parameters_total": counts["total"],
            "parameters_experts": counts["experts"],
            "size_on_disk_bytes": self.size_on_disk(),
            "expert_layout": self.family_adapter.layout_name() if self.is_moe else None,
        }


def _as_index(value: Any, what: str) -> int:
    """An integer index (Python or numpy int); bools and floats are refused."""
    if isinstance(value, bool):
        raise IndexOutOfRangeError(f"{what} index {value!r} is a bool; pass an integer")
    try:
        return operator.index(value)
    except TypeError:
        raise IndexOutOfRangeError(f"{what} index {value!r} is not an integer; pass an integer") from None



def _ranges(values: list[int]) -> str:
    if not values:
        return "none"
    return compact_ranges(values)
