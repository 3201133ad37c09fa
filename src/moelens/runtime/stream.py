"""Forward passes layer by layer: one decoder layer's weights in memory at a time.

The technique of llm-compressor's sequential pipeline and AirLLM. The model is built without
weights (:func:`~moelens.runtime.weights.empty_model`); a pass over a list of batches (:class:`Call`)
then runs in stages, each stage over every batch before the next begins:

1. the embedding's weights are read; each batch runs the model's own forward with every decoder
   layer replaced by a recorder that keeps the layer's inputs (the hidden states of layer 0, and
   each layer's other arguments: attention mask, positions, rotary embeddings) and passes the
   hidden states on unchanged; the last recorder ends the pass;
2. for ℓ = 0 … n−1: layer ℓ's weights are read and set on the device, every batch's hidden states
   go through the layer itself (``layer(h, **its recorded arguments)``, so every forward hook on it
   and its children runs as in an ordinary pass), the outputs replace the hidden states, and the
   layer's weights go back to ``meta``;
3. the final norm and LM head's weights are read; each batch runs the model's forward once more,
   with the embedding and the layers stubbed out and the last layer returning its stored states,
   so the family's own head (logit scaling, ``logits_to_keep``) computes the output.

So each layer's weights are read once per pass over all rows. A batch's ``enter`` callback runs
before each of its stage calls, so per-batch hook state (the edits of an intervention, what to
capture) is in place whenever that batch's rows go through a layer; its ``keep`` callback reduces
its output as soon as the head has made it (the last position's logits, a log-likelihood sum), so
a pass never holds every batch's logits. A background thread reads layer ℓ+1 from the files while
layer ℓ computes (``prefetch``).

A pass may start at a later layer (``run(..., start=ℓ)``) from each batch's hidden states entering
it (``Call.states``, from a clean pass: router edits change nothing before their layer): the
embedding still runs, for the layers' other arguments, and the layers before ℓ are not read.
Layers may be edited as they are read (:meth:`StreamedForward.edit_layers`: a merge of experts),
on the CPU in a chosen dtype and then moved to the device, as an edited checkpoint written and
loaded again would be.

Memory: one layer's weights (two while prefetching: the next one as read, in the checkpoint's dtype)
plus every row's hidden states and recorded arguments. When those do not fit the activation
budget, the batches are split into several passes, each reading every layer once; the progress
says so.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moelens.errors import ConfigError
from moelens.progress import ProgressCallback, report
from moelens.runtime.architecture import Architecture, describe


@dataclass
class Call:
    """One batch of a pass: the model call's keyword arguments, what to set before its rows go
    through any part of the model (hook state), and what of the model's output to keep (``keep``:
    e.g. the last position's logits; default all of it). ``keep`` runs as soon as the batch's
    output exists, so a pass over many batches holds one batch's logits [R, T, V] at a time."""

    kwargs: dict[str, Any]
    enter: Callable[[], None] | None = None
    keep: Callable[[Any], Any] | None = None
    #: in a pass that starts at a later layer (``start`` of :meth:`StreamedForward.run`): this
    #: batch's hidden states [R, T, d] entering that layer (consumed by the pass)
    states: torch.Tensor | None = None

    def begin(self) -> None:
        if self.enter is not None:
            self.enter()

    def kept(self, output: Any) -> Any:
        return output if self.keep is None else self.keep(output)


#: Edits a decoder layer's module once its weights are loaded (a merge of its experts) and returns
#: what undoes the edit's changes that outlive the weights (counts set on modules), or None.
LayerEdit = Callable[[nn.Module], "Callable[[], None] | None"]


def release_freed_memory_promptly() -> None:
    """Make freed tensors go back to the operating system (glibc only; elsewhere nothing).

    glibc raises its mmap threshold each time a large block is freed, so after the first layer
    every layer-sized tensor comes from the heap, where freed space is kept and fragments: the
    process grew by ~45 MB per streamed layer of a d = 1024 Mixtral. A fixed threshold (1 MiB)
    keeps large tensors in their own mappings, returned to the system when freed."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except OSError:
        pass


class _Stop(Exception):
    """Ends a recording forward after the last decoder layer."""


class _Stub(nn.Module):
    """Stands in for a decoder layer (or the embedding) during the recording and head stages."""

    def __init__(self, inner: nn.Module, step: Callable[..., Any]):
        super().__init__()
        object.__setattr__(self, "_inner", inner)  # not a child: its parameters stay out of sight
        object.__setattr__(self, "_step", step)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._step(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # a model that reads a layer's attributes (layer_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_inner"), name)


@dataclass
class _Rows:
    """One batch between stages: its hidden states and each layer's recorded arguments."""

    hidden: torch.Tensor | None = None
    args: list[tuple[tuple[Any, ...], dict[str, Any]]] | None = None


def hidden_bytes(rows: int, width: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Bytes a batch keeps between stages: its hidden states [R, T, d], and as much again for the
    recorded arguments and one layer's output beside its input."""
    return 2 * rows * width * hidden_size * dtype.itemsize


class StreamedForward:
    """A causal LM whose decoder layers are read one at a time (see the module docstring)."""

    streamed = True

    def __init__(self, directory: Any, device: torch.device, dtype: torch.dtype | None, activation_budget: int,
                 prefetch: bool = True):
        from moelens.checkpoint.store import TensorStore
        from moelens.runtime.weights import WeightGroups, empty_model, layer_prefix, module_name

        self.device = device
        self.model = empty_model(directory, dtype, device)
        self.arch: Architecture = describe(self.model)
        self.dtype = next(self.model.parameters()).dtype
        self.layers = _layer_list(self.model, self.arch)
        self.groups_of = WeightGroups(self.model, TensorStore(directory), device)
        prefix = layer_prefix(self.model, self.layers)
        embed = module_name(self.model, self.arch.embedding)
        head_module = self.model.get_output_embeddings()
        head = module_name(self.model, head_module) if head_module is not None else None
        self.layer_groups = [self.groups_of.group(f"layer {i}", [f"{prefix}.{i}."]) for i in range(len(self.layers))]
        others = [n for n in self.groups_of.shapes if not n.startswith(f"{prefix}.")]
        self.embed_group = self.groups_of.group("embedding", [n for n in others if not (head and n.startswith(f"{head}."))])
        self.head_group = self.groups_of.group("head", [n for n in others if not n.startswith(f"{embed}.")]
                                               + ([f"{head}."] if head else []))
        self.activation_budget = activation_budget
        self.prefetch = prefetch
        self.layer_edits: dict[int, LayerEdit] = {}
        self.edit_dtype: torch.dtype | None = None
        release_freed_memory_promptly()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="moelens-read")
        self._embed_owner, self._embed_attr = _parent(self.model, self.arch.embedding)

    # -- sizes ------------------------------------------------------------------------------------
    @property
    def largest_group_bytes(self) -> int:
        return max(g.nbytes for g in (*self.layer_groups, self.embed_group, self.head_group))

    @property
    def hidden_size(self) -> int:
        return int(self.arch.embedding.weight.shape[1])

    def call_bytes(self, call: Call) -> int:
        ids = call.kwargs["input_ids"]
        return hidden_bytes(int(ids.shape[0]), int(ids.shape[1]), self.hidden_size, self.dtype)

    # -- weights ----------------------------------------------------------------------------------
    def edit_layers(self, edits: dict[int, LayerEdit], dtype: torch.dtype | None = None) -> None:
        """Apply ``edits[i]`` to decoder layer i each time its weights are loaded: the weights are
        loaded on the CPU in ``dtype`` for the edit (None: the forward dtype), then moved to the
        device in the forward dtype, as a checkpoint edited on the CPU in ``dtype``, written and
        loaded again would be."""
        self.layer_edits = dict(edits)
        self.edit_dtype = dtype

    def _load_layer(self, i: int, tensors: dict[str, torch.Tensor]) -> Callable[[], None] | None:
        """Set layer i's weights on the model, edited when an edit is set for it; returns the
        edit's undo."""
        group = self.layer_groups[i]
        edit = self.layer_edits.get(i)
        if edit is None:
            self.groups_of.load(group, tensors)
            return None
        dtype = self.edit_dtype if self.edit_dtype is not None else self.dtype
        self.groups_of.load(group, tensors, dtype=dtype, device=torch.device("cpu"))
        try:
            undo = edit(self.layers[i])
            self.groups_of.cast(group, self.dtype)
        except BaseException:
            self.groups_of.drop(group)  # nothing of a failed layer stays resident
            raise
        for module in self.layers[i].modules():  # buffers loaded or set on the CPU (a score-correction bias)
            for name, buf in module._buffers.items():
                if buf is not None and buf.device != self.device:
                    module._buffers[name] = buf.to(self.device)
        return undo

    def _read(self, group: Any) -> concurrent.futures.Future:
        return self._pool.submit(self.groups_of.read, group)

    @contextmanager
    def materialised(self, module: nn.Module) -> Iterator[nn.Module]:
        """``module`` with its weights read (the embedding, to measure its entries' spread)."""
        from moelens.runtime.weights import module_name

        name = module_name(self.model, module)
        group = self.groups_of.group(name, [f"{name}."])
        self.groups_of.load(group, self._read(group).result())
        try:
            yield module
        finally:
            self.groups_of.drop(group)

    # -- passes -----------------------------------------------------------------------------------
    def passes(self, calls: Sequence[Call]) -> list[list[Call]]:
        """Consecutive batches grouped so each group's kept activations fit the budget (a batch
        larger than the budget still makes a pass of its own)."""
        out: list[list[Call]] = []
        used = 0
        for call in calls:
            need = self.call_bytes(call)
            if out and used + need <= self.activation_budget:
                out[-1].append(call)
                used += need
            else:
                out.append([call])
                used = need
        return out

    def run(self, calls: Sequence[Call], progress: ProgressCallback | None = None, start: int = 0) -> list[Any]:
        """The model's output for every call, in order (see the module docstring). ``start`` > 0:
        the pass starts at that decoder layer from each call's ``states`` (what the layers before it
        would compute: a caller that changes nothing before ``start`` has them from a clean pass),
        and the layers before it are not read."""
        outputs: list[Any] = []
        groups = self.passes(calls)
        for k, group in enumerate(groups):
            note = (f"pass {k + 1}/{len(groups)}: the rows' activations exceed the "
                    f"{self.activation_budget / 2**30:.1f} GiB budget") if len(groups) > 1 else ""
            outputs.extend(self._pass(group, progress, note, start))
        return outputs

    def _pass(self, calls: Sequence[Call], progress: ProgressCallback | None, note: str, start: int = 0) -> list[Any]:
        walk = self.walk(calls, start)
        total = len(self.layers) + 2
        report(progress, "streamed layers", 1 + start, total, note)
        for i in range(start, len(self.layers)):
            walk.through(i)
            report(progress, "streamed layers", i + 2, total, note)
        outputs = walk.head()
        report(progress, "streamed layers", total, total, note)
        return outputs

    def walk(self, calls: Sequence[Call], start: int = 0) -> "Walk":
        """A pass over ``calls`` that has run the embedding (and, with ``start``, set each call's
        ``states`` as layer ``start``'s input) and goes on layer by layer when told."""
        return Walk(self, calls, start)

    def _stage_embed(self, calls: Sequence[Call], rows: list[_Rows], tensors: dict[str, torch.Tensor]) -> None:
        self.groups_of.load(self.embed_group, tensors)
        del tensors
        n = len(self.layers)
        try:
            for call, r in zip(calls, rows):
                r.args = []
                previous: list[Any] = []

                def record(i: int, r: _Rows = r, previous: list[Any] = previous) -> Callable[..., Any]:
                    def step(*args: Any, **kwargs: Any) -> Any:
                        hidden = args[0] if args else kwargs.pop("hidden_states")
                        if i == 0:
                            r.hidden = hidden
                        elif not previous or hidden is not previous[0]:
                            raise ConfigError(f"{self.arch.model_type}: decoder layer {i} does not take layer {i - 1}'s "
                                              "output as its input; layer streaming cannot run this model (use --stream off)")
                        r.args.append((args[1:], kwargs))
                        previous[:] = [hidden]
                        if i == n - 1:
                            raise _Stop
                        return hidden
                    return step

                call.begin()
                with self._layers_replaced(record), self._no_router_outputs():
                    try:
                        self.model(**call.kwargs)
                    except _Stop:
                        pass
                if r.hidden is None or len(r.args) != n:
                    raise ConfigError(f"{self.arch.model_type}: the forward pass did not run every decoder layer in order; "
                                      "layer streaming cannot run this model (use --stream off)")
        finally:
            self.groups_of.drop(self.embed_group)

    def _stage_layer(self, i: int, calls: Sequence[Call], rows: list[_Rows], tensors: dict[str, torch.Tensor]) -> None:
        group = self.layer_groups[i]
        undo = self._load_layer(i, tensors)
        del tensors
        layer = self.layers[i]
        try:
            for call, r in zip(calls, rows):
                call.begin()
                args, kwargs = r.args[i]
                out = layer(r.hidden, *args, **kwargs)
                if not isinstance(out, torch.Tensor):
                    raise ConfigError(f"{self.arch.model_type}: decoder layer {i} returns {type(out).__name__}, not its hidden "
                                      "states; layer streaming cannot run this model (use --stream off)")
                r.hidden = out
        finally:
            self.groups_of.drop(group)
            if undo is not None:
                undo()

    def _stage_head(self, calls: Sequence[Call], rows: list[_Rows], tensors: dict[str, torch.Tensor]) -> list[Any]:
        self.groups_of.load(self.head_group, tensors)
        del tensors
        n = len(self.layers)
        outputs = []
        try:
            for call, r in zip(calls, rows):
                final = r.hidden
                r.hidden, r.args = None, None  # freed as the pass goes

                def substitute(i: int, final: torch.Tensor = final) -> Callable[..., Any]:
                    def step(*args: Any, **kwargs: Any) -> Any:
                        return final if i == n - 1 else (args[0] if args else kwargs["hidden_states"])
                    return step

                ids = call.kwargs["input_ids"]
                stub = _Stub(self.arch.embedding, lambda input_ids, *a, final=final, **k: final.new_zeros((*input_ids.shape, final.shape[-1])))
                call.begin()
                swapped = _swapped(self._embed_owner, self._embed_attr, stub)
                with self._layers_replaced(substitute), swapped, self._no_router_outputs():
                    outputs.append(call.kept(self.model(**{**call.kwargs, "input_ids": ids})))
        finally:
            self.groups_of.drop(self.head_group)
        return outputs

    @contextmanager
    def _no_router_outputs(self) -> Iterator[None]:
        """A model configured to return its routers' logits (for an auxiliary loss) collects them
        from the routers during its forward; in the embedding and head stages the layers are stubs,
        so nothing would be collected. Those stages return logits only."""
        config = self.model.config
        before = getattr(config, "output_router_logits", None)
        if before:
            config.output_router_logits = False
        try:
            yield
        finally:
            if before:
                config.output_router_logits = before

    @contextmanager
    def _layers_replaced(self, make: Callable[[int], Callable[..., Any]]) -> Iterator[None]:
        originals = list(self.layers)
        for i, layer in enumerate(originals):
            self.layers._modules[str(i)] = _Stub(layer, make(i))
        try:
            yield
        finally:
            for i, layer in enumerate(originals):
                self.layers._modules[str(i)] = layer

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class Walk:
    """A streamed pass in progress over a fixed list of batches: ``done`` layers have run.

    :meth:`through` runs the layers up to one (a calibration of layer ℓ reads ℓ's block inputs
    with its own hooks, and the next layer's calibration goes on from there); :meth:`head` ends
    the pass with the model's output for every batch."""

    def __init__(self, fw: StreamedForward, calls: Sequence[Call], start: int = 0):
        self.fw = fw
        self.calls = list(calls)
        self.rows = [_Rows() for _ in self.calls]
        self.done = start
        with torch.no_grad():
            # the embedding stage records every layer's other arguments (masks, positions), which
            # a pass that starts later needs as much as one from layer 0
            fw._stage_embed(self.calls, self.rows, fw._read(fw.embed_group).result())
        if start:
            for call, r in zip(self.calls, self.rows):
                if call.states is None or r.hidden is None or tuple(call.states.shape) != tuple(r.hidden.shape):
                    raise ValueError(f"a pass that starts at layer {start} needs each batch's states shaped as its hidden states")
                r.hidden = call.states.to(device=r.hidden.device, dtype=r.hidden.dtype)
                call.states = None  # consumed: the pass holds each batch's states once
        self._pending = fw._read(fw.layer_groups[start]) if fw.prefetch and start < len(fw.layer_groups) else None

    def _tensors(self, group: Any) -> dict[str, torch.Tensor]:
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else self.fw._read(group).result()

    def through(self, layer: int) -> None:
        """Run layers ``done`` … ``layer`` over every batch."""
        fw = self.fw
        n = len(fw.layers)
        with torch.no_grad():
            while self.done <= layer:
                i = self.done
                tensors = self._tensors(fw.layer_groups[i])
                if fw.prefetch:  # read the next layer while this one computes
                    self._pending = fw._read(fw.layer_groups[i + 1] if i + 1 < n else fw.head_group)
                fw._stage_layer(i, self.calls, self.rows, tensors)
                del tensors
                self.done += 1

    def head(self) -> list[Any]:
        """The model's output for every batch (runs any layers left first)."""
        self.through(len(self.fw.layers) - 1)
        with torch.no_grad():
            return self.fw._stage_head(self.calls, self.rows, self._tensors(self.fw.head_group))


def _layer_list(model: nn.Module, arch: Architecture) -> nn.ModuleList:
    first = arch.layers[0].layer
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == arch.n_layers and module[0] is first:
            return module
    raise ConfigError(f"{type(model).__name__}: cannot find its list of decoder layers")


def _parent(model: nn.Module, target: nn.Module) -> tuple[nn.Module, str]:
    for module in model.modules():
        for name, child in module.named_children():
            if child is target:
                return module, name
    raise ConfigError(f"{type(model).__name__}: cannot find the parent of {type(target).__name__}")


@contextmanager
def _swapped(owner: nn.Module, attr: str, value: nn.Module) -> Iterator[None]:
    original = owner._modules[attr]
    owner._modules[attr] = value
    try:
        yield
    finally:
        owner._modules[attr] = original


__all__ = ["Call", "LayerEdit", "StreamedForward", "Walk", "hidden_bytes"]
