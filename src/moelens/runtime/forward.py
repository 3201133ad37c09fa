"""One way to run forward passes, whatever the model's size: in memory, or layer-streamed.

:func:`open_forward` returns a runtime with the same surface either way: ``model`` (the module tree
hooks are registered on), ``arch`` (its hook points), ``device``, ``streamed``, ``run(calls)`` (the
model's output for every :class:`~moelens.runtime.stream.Call`, in order) and
``materialised(module)`` (a module with its weights present, for reading them).

``stream``: ``on`` streams layers (:class:`~moelens.runtime.stream.StreamedForward`), ``off``
loads the whole model (and refuses, before loading, a model that would not fit, naming the
options that do), ``auto`` streams exactly when the model does not fit. Fitting means

    in-memory peak ≈ IN_MEMORY_FACTOR × weight bytes (in the forward dtype) ≤ FIT_SHARE × available,

the factor measured on a 24-layer Mixtral-shaped checkpoint loaded by transformers in float32
(peak RSS 19.4 GB for 8.6 GB of weights: the loader holds converted copies beside the model). A
streamed pass needs about one layer's weights (two while the next one is read ahead) plus the
rows' activations; the activations' share is the rest of the memory budget, and a pass whose rows
exceed it is split.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moelens.errors import ConfigError
from moelens.progress import ProgressCallback
from moelens.runtime.architecture import Architecture, describe
from moelens.runtime.stream import Call, StreamedForward

STREAM_MODES = ("auto", "on", "off")
IN_MEMORY_FACTOR = 2.3
#: The share of the available memory an in-memory run may plan to use: "available" moves with
#: other processes and the page cache, and running out on the CPU kills the process.
FIT_SHARE = 0.75
#: Weights held at once while streaming, in units of the largest layer: the layer in use, the next
#: one as read (prefetch) and the conversion's copy.
STREAM_WEIGHT_FACTOR = 3.0
#: The activations of a streamed pass may use this share of what the weights leave free (CPU) ...
ACTIVATION_SHARE = 0.5
#: ... and at most this many bytes on the CPU, so a streamed pass stays small beside other work.
CPU_ACTIVATION_CAP = 1 << 30


class InMemoryForward:
    """A model loaded whole by transformers; :meth:`run` runs the calls one after another."""

    streamed = False

    def __init__(self, model: Any):
        self.model = model
        self.arch: Architecture = describe(model)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    def run(self, calls: Sequence[Call], progress: ProgressCallback | None = None) -> list[Any]:
        out = []
        with torch.no_grad():
            for call in calls:
                call.begin()
                out.append(call.kept(self.model(**call.kwargs)))
        return out

    @contextmanager
    def materialised(self, module: nn.Module) -> Iterator[nn.Module]:
        yield module

    def close(self) -> None:
        pass


Forward = InMemoryForward | StreamedForward


def is_forward(model: Any) -> bool:
    """Whether ``model`` is a forward runtime (in memory or streamed) rather than a loaded module."""
    return isinstance(model, (InMemoryForward, StreamedForward))


def run_calls(model: Any, calls: Sequence[Call], progress: ProgressCallback | None = None) -> list[Any]:
    """Each call's kept output, from a forward runtime (a streamed one reads every layer once for
    all the calls) or from a loaded module (one call after another)."""
    if is_forward(model):
        return model.run(calls, progress)
    out = []
    with torch.no_grad():
        for call in calls:
            call.begin()
            out.append(call.kept(model(**call.kwargs)))
    return out


def runtime_device(model: Any) -> torch.device:
    """The device a runtime or a loaded module computes on."""
    return model.device if is_forward(model) else next(model.parameters()).device


def whole_module(model: Any) -> Any:
    """The loaded module whose layers can be re-run (to name the first non-finite one), or None
    for a streamed runtime, whose layers are not all there."""
    if is_forward(model):
        return None if model.streamed else model.model
    return model


def available_memory(device: torch.device) -> int:
    """Bytes free for a model: on CUDA the device's free memory, on the CPU ``MemAvailable``
    (free memory plus what the page cache would give back)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


@dataclass(frozen=True)
class Estimate:
    """What a model needs: ``weights`` (bytes of every parameter in the forward dtype), ``layer``
    (the largest decoder layer's, embedding's or head's), ``available`` on the device."""

    weights: int
    layer: int
    available: int
    dtype: torch.dtype

    @property
    def in_memory(self) -> int:
        return int(IN_MEMORY_FACTOR * self.weights)

    @property
    def streamed(self) -> int:
        return int(STREAM_WEIGHT_FACTOR * self.layer)

    @property
    def fits(self) -> bool:
        return self.in_memory <= FIT_SHARE * self.available


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def estimate(directory: Any, device: torch.device, dtype: torch.dtype | None) -> Estimate:
    """Sizes from a weightless copy of the model (no weight is read)."""
    from moelens.runtime.weights import empty_model

    model = empty_model(directory, dtype, torch.device("cpu"))
    arch = describe(model)
    dt = next(model.parameters()).dtype
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    layers = [sum(p.numel() * p.element_size() for p in pts.layer.parameters()) for pts in arch.layers]
    rest = total - sum(layers)
    return Estimate(total, max([*layers, rest // 2 or rest]), available_memory(device), dt)


def refusal(est: Estimate, device: torch.device) -> str:
    """The one line that refuses an in-memory run that does not fit, with the options that do."""
    name = str(est.dtype).replace("torch.", "")
    options = [f"--stream on or auto (layer by layer: about {_gb(est.streamed)} of weights at once plus the rows' activations)"]
    if est.dtype == torch.float32 and est.in_memory / 2 <= FIT_SHARE * est.available:
        options.append(f"--dtype bfloat16 (about {_gb(est.in_memory / 2)} in memory)")
    return (f"the model needs about {_gb(est.in_memory)} to run in memory in {name} ({_gb(est.weights)} of weights), "
            f"but {_gb(est.available)} are available on {device} (at most {FIT_SHARE:.0%} planned); use " + " or ".join(options))


def activation_budget(device: torch.device, layer_bytes: int) -> int:
    """Bytes a streamed pass may keep for its rows: a share of what the weights leave free
    (capped on the CPU, where running out kills the process instead of raising)."""
    free = max(available_memory(device) - STREAM_WEIGHT_FACTOR * layer_bytes, 64 << 20)
    budget = int(free * ACTIVATION_SHARE)
    return min(budget, CPU_ACTIVATION_CAP) if device.type == "cpu" else budget


def choose_stream(stream: str, est: Estimate, device: torch.device) -> bool:
    """True to stream layers. ``off`` with a model that does not fit raises :class:`ConfigError`."""
    if stream not in STREAM_MODES:
        raise ConfigError(f"stream {stream!r}: choose one of {', '.join(STREAM_MODES)}")
    if stream == "on":
        return True
    if stream == "off":
        if not est.fits:
            raise ConfigError(refusal(est, device))
        return False
    return not est.fits


def open_forward(path: Any, device: torch.device, dtype: str | torch.dtype | None = None, stream: str = "auto",
                 revision: str | None = None, prefetch: bool = True) -> Forward:
    """The forward runtime of a checkpoint (see the module docstring)."""
    from moelens.checkpoint.source import resolve_source
    from moelens.runtime.load import load_causal_lm, resolve_dtype

    directory = resolve_source(path, revision)
    torch_dtype = resolve_dtype(dtype)
    est = estimate(directory, device, torch_dtype)
    if choose_stream(stream, est, device):
        return StreamedForward(directory, device, torch_dtype, activation_budget(device, est.layer), prefetch=prefetch)
    return InMemoryForward(load_causal_lm(path, device=device, dtype=dtype, revision=revision))


__all__ = ["Estimate", "Forward", "IN_MEMORY_FACTOR", "InMemoryForward", "STREAM_MODES", "activation_budget",
           "available_memory", "choose_stream", "estimate", "is_forward", "open_forward", "refusal", "run_calls", "runtime_device",
           "whole_module"]
