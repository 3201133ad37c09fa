"""A transformers model without weights, and its weights read into it one group at a time.

:func:`empty_model` builds a causal LM whose parameters live on torch's ``meta`` device (shapes and
dtypes, no storage; buffers stay real, they are small and some, like rotary frequencies, are not
in the checkpoint). :class:`WeightGroups` knows which checkpoint tensors make which parameters,
through transformers' own renaming and conversion rules (per-expert files fused into
``gate_up_proj``, ``block_sparse_moe`` renamed ``mlp``, ...), so a group of parameters — one decoder
layer, the embedding, the head — is read from the safetensors files by moelens' checkpoint reader
(dequantised on read), converted and set on the target device, then put back on ``meta``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moelens.checkpoint.store import TensorStore
from moelens.errors import CheckpointFormatError, ConfigError

META = torch.device("meta")


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every ``nn.Parameter`` registered inside the block lands on ``meta`` (buffers do not)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device != META:
            module._parameters[name] = nn.Parameter(param.to(META), requires_grad=False)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def empty_model(directory: os.PathLike[str] | str, dtype: torch.dtype | None, device: torch.device) -> Any:
    """The checkpoint's causal LM in eval mode with every parameter on ``meta`` in ``dtype`` (None:
    the config's), its buffers on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    # Buffers (rotary frequencies, score biases) are allocated for real; parameters are allocated
    # on meta from the start so a large layer never touches memory.
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype if dtype is not None else config_dtype(config))
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)
    return model.eval()


def config_dtype(config: Any) -> torch.dtype:
    """The dtype a transformers config names (``dtype``/``torch_dtype``; float32 when none): the
    dtype ``from_pretrained(dtype="auto")`` builds the model in."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "dtype", None) or getattr(config, "dtype", None)
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)
    return torch.float32


def logical_names(store: TensorStore) -> dict[str, bool]:
    """The checkpoint's tensors as the reader presents them: quantisation side tensors
    (``*_scale_inv``, ``*_scales``) folded into their weight, ``X_blocks`` read as ``X``. The value
    says whether the tensor is MXFP4, which the reader returns transposed ([..., out, in])."""
    names: dict[str, bool] = {}
    infos = store.infos
    for name in infos:
        if name.endswith("_scale_inv") and name[: -len("_scale_inv")] in infos:
            continue
        if name.endswith("_scales") and f"{name[: -len('_scales')]}_blocks" in infos:
            continue
        if name.endswith("_blocks") and f"{name[: -len('_blocks')]}_scales" in infos:
            names[name[: -len("_blocks")]] = True
            continue
        names[name] = False
    return names


@dataclass(frozen=True)
class Group:
    """Parameters set together: their names in the model and the checkpoint tensors that make them."""

    name: str
    params: tuple[str, ...]
    sources: tuple[str, ...]
    nbytes: int  # the parameters' bytes in the model's dtype


class WeightGroups:
    """Which checkpoint tensors make which parameters of an :func:`empty_model`, and the means to
    read a group into the model and drop it again."""

    def __init__(self, model: nn.Module, store: TensorStore, device: torch.device):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self.model = model
        self.store = store
        self.device = device
        self.mapping = get_model_conversion_mapping(model)
        # (group, dtype) whose loaded weights were found finite: a pass reads the same tensors
        # from the same files again, so the scan (a third of a layer's load) is made once per run
        self.finite: set[tuple[str, str]] = set()
        renamings = [m for m in self.mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in self.mapping if isinstance(m, WeightConverter)]
        state = model.state_dict()
        self.logical = logical_names(store)
        self.targets: dict[str, list[str]] = {}  # parameter or buffer name -> checkpoint tensors
        for key in self.logical:
            target, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, state)
            if target not in state and key in state:
                target = key
            if target in state:
                self.targets.setdefault(target, []).append(key)
        # tied parameters (an LM head sharing the embedding's matrix) share one object
        self.aliases: dict[str, list[str]] = {}
        by_id: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), []).append(name)
        for names in by_id.values():
            for n in names:
                self.aliases[n] = names
        self.shapes = {n: (tuple(p.shape), p.dtype) for n, p in model.named_parameters(remove_duplicate=False)}

    def group(self, name: str, prefixes: Iterable[str], exclude: Iterable[str] = ()) -> Group:
        """The parameters (and persistent buffers) whose names start with one of ``prefixes`` and
        none of ``exclude``, and their checkpoint tensors."""
        pre, ex = tuple(prefixes), tuple(exclude)

        def inside(n: str) -> bool:
            return n.startswith(pre) and not (ex and n.startswith(ex))

        params = tuple(n for n in self.shapes if inside(n))
        buffers = [n for n in self.targets if inside(n) and n not in self.shapes]
        sources: list[str] = []
        for n in (*params, *buffers):
            found = self.targets.get(n) or next((self.targets[a] for a in self.aliases.get(n, ()) if a in self.targets), None)
            if found is None:
                raise CheckpointFormatError(f"the checkpoint has no tensor for the model's parameter {n!r}; "
                                            "layer streaming needs every weight in the files (use --stream off)")
            sources.extend(k for k in found if k not in sources)
        nbytes = sum(_numel(self.shapes[n][0]) * self.shapes[n][1].itemsize for n in params)
        return Group(name, params, tuple(sources), nbytes)

    def read(self, group: Group) -> dict[str, torch.Tensor]:
        """The group's checkpoint tensors, dequantised (CPU, the checkpoint's dtype); MXFP4 tensors
        are turned back to the unquantised layout. The files' memory maps are released after, so
        what was read does not stay resident as mapped pages."""
        try:
            out = {}
            for key in group.sources:
                t = self.store.read(key)
                out[key] = t.transpose(-1, -2).contiguous() if self.logical[key] else t
            return out
        finally:
            self.store.release()

    def load(self, group: Group, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
             device: torch.device | None = None) -> None:
        """Convert ``tensors`` (from :meth:`read`) with transformers' rules and set them on the
        model, on the target device in the model's dtype (or on ``device`` in ``dtype``, to be
        edited there first: see :meth:`cast`)."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        if dtype is None:
            dtype = next((dt for _, dt in self.shapes.values()), None)
        else:
            # transformers converts each tensor to its empty parameter's dtype: those are set first
            for name in group.params:
                shape, was = self.shapes[name]
                if was.is_floating_point and was != dtype:
                    self._set(name, nn.Parameter(torch.empty(shape, dtype=dtype, device=META), requires_grad=False))
        config = LoadStateDictConfig(device_map={"": device or self.device}, dtype=dtype, weight_mapping=self.mapping)
        from transformers.utils import logging as hf_logging

        from moelens.runtime.checks import quiet_transformers

        bar_was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a layer's load is a step of moelens' own progress
        try:
            with quiet_transformers():
                info, _ = convert_and_load_state_dict_in_model(self.model, tensors, config)
        finally:
            if bar_was_on:
                hf_logging.enable_progress_bar()
        for name in group.params:
            if self._get(name).device == META:
                alias = next((a for a in self.aliases[name] if self._get(a).device != META), None)
                if alias is None:
                    raise CheckpointFormatError(f"could not read the model's parameter {name!r} from the checkpoint "
                                                f"({sorted(info.mismatched_keys)[:2] or 'no matching tensor'}); use --stream off")
                self._set(name, self._get(alias))
        from moelens.runtime.checks import check_parameters_finite

        checked = (group.name, str(dtype))
        if checked not in self.finite:
            check_parameters_finite(_Named(self, group.params), self.store.directory)
            self.finite.add(checked)

    def cast(self, group: Group, dtype: torch.dtype) -> None:
        """The group's loaded parameters on the target device, the floating ones in ``dtype``
        (after a load in another dtype or on another device)."""
        for name in group.params:
            value = self._get(name)
            moved = value.to(device=self.device, dtype=dtype if value.is_floating_point() else value.dtype)
            if moved is not value:
                for n in self.aliases[name]:
                    self._set(n, moved)

    def drop(self, group: Group) -> None:
        """Put the group's parameters (and their aliases) back on ``meta``."""
        for name in group.params:
            for n in self.aliases[name]:
                shape, dtype = self.shapes[n]
                self._set(n, nn.Parameter(torch.empty(shape, dtype=dtype, device=META), requires_grad=False))

    def _get(self, name: str) -> torch.Tensor:
        module, _, attr = name.rpartition(".")
        return getattr(self.model.get_submodule(module) if module else self.model, attr)

    def _set(self, name: str, value: torch.Tensor) -> None:
        module, _, attr = name.rpartition(".")
        owner = self.model.get_submodule(module) if module else self.model
        owner._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)


class _Named:
    """``named_parameters`` of one group, for :func:`check_parameters_finite`."""

    def __init__(self, groups: WeightGroups, names: tuple[str, ...]):
        self.groups, self.names = groups, names

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        for n in self.names:
            yield n, self.groups._get(n)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def layer_prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    """The dotted name of the decoder layers' list in ``model`` (``model.layers``)."""
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise ConfigError(f"{type(model).__name__}: cannot find its decoder layers by name")


def module_name(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ConfigError(f"{type(model).__name__}: module {type(target).__name__} is not part of the model")


__all__ = ["Group", "META", "config_dtype", "WeightGroups", "empty_model", "layer_prefix", "logical_names", "module_name", "parameters_on_meta"]
