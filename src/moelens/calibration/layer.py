"""Calibrate one MoE layer: run the calibration tokens up to it, record routing, run every expert.

For layer L and the N calibration tokens (docs/methods.md §3):

- ``router_logits`` [N, E] and ``topk`` [N, k]: what the layer's router computed and chose
  (:mod:`moelens.calibration.capture`);
- usage count c_e = #{(t, j): topk[t, j] = e} and frequency f_e = c_e / (N·k), the share of the
  layer's top-k selections (Σ_e f_e = 1);
- ``features`` [E, d]: every expert's mean output over all N tokens, from the checkpoint's
  expert weights and the family's nonlinearity (:mod:`moelens.calibration.features`).

Sequences go through the model in batches of consecutive sequences, right-padded, at most
``batch_tokens`` padded tokens each (always at least one sequence). A calibration may split
its sequences into shards (:func:`token_shards`) computed apart: a shard's record holds its own
tokens' rows and counts and its share Σ_{t ∈ shard} f_e(x_t) / N of the features, so the shards'
records add up (rows concatenated, counts and features summed) to the layer's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from moelens.calibration.activation import ExpertActivation
from moelens.calibration.capture import LayerCapture
from moelens.calibration.features import ExpertFeatures
from moelens.calibration.texts import CalibrationTokens
from moelens.checkpoint.model import MoELayer, MoEModel
from moelens.runtime.batching import batches, right_padded


@dataclass(frozen=True)
class LayerCalibration:
    """One layer's calibration record (arrays as the store keeps them)."""

    layer: int
    features: np.ndarray       # [E, d] float64 (a shard's: its share of the mean)
    router_logits: np.ndarray  # [N, E] float32
    topk: np.ndarray           # [N, k] int32
    counts: np.ndarray         # [E] int64
    routing: str               # where the top-k came from: experts | router | logits

    @property
    def frequency(self) -> np.ndarray:
        """[E] float64 f_e = c_e / (N·k)."""
        total = self.topk.size
        return self.counts / total if total else np.zeros(self.counts.shape)


def usage_counts(topk: np.ndarray, n_experts: int) -> np.ndarray:
    """[E] int64 number of top-k selections of each expert (indices outside 0..E−1, which some
    families use to mark a dropped slot, are not selections)."""
    flat = np.asarray(topk, dtype=np.int64).ravel()
    flat = flat[(flat >= 0) & (flat < n_experts)]
    return np.bincount(flat, minlength=n_experts).astype(np.int64)


def expert_weights(layer: MoELayer) -> dict[str, Optional[torch.Tensor]]:
    """One layer's expert stacks (gate/up [E, F, d], down [E, d, F]) and bias stacks (GPT-OSS)
    from the checkpoint, as stored."""
    gate = layer.expert_stack("gate") if layer.has_role("gate") else None
    out: dict[str, Optional[torch.Tensor]] = {"gate": gate, "up": layer.expert_stack("up"), "down": layer.expert_stack("down")}
    first = layer.expert(0)
    for name in ("gate_bias", "up_bias", "down_bias"):
        out[name] = None
        if getattr(first, name) is not None:  # only families with expert biases pay for a second read
            out[name] = torch.stack([getattr(layer.expert(e), name) for e in range(layer.n_experts)])
    return out


@dataclass
class CalibrationSetup:
    """What every layer of one calibration shares: the checkpoint view, the tokens, where and in
    which precision the model runs, and the model itself (loaded on first use: whole, or
    layer-streamed when ``stream`` is ``on``, as the plan decided)."""

    model: MoEModel
    tokens: CalibrationTokens
    activation: ExpertActivation
    device: torch.device
    dtype: Optional[str]
    batch_tokens: int
    pad_id: int
    stream: str = "off"
    _forward: Any = field(default=None, repr=False)
    _walk: Any = field(default=None, repr=False)

    def forward(self) -> Any:
        """The forward runtime (:mod:`moelens.runtime.forward`), opened once."""
        if self._forward is None:
            from moelens.runtime.forward import open_forward

            self._forward = open_forward(self.model.path, self.device, self.dtype, stream=self.stream, revision=self.model.revision)
        return self._forward

    def loaded(self) -> tuple[Any, Any]:
        """(the transformers model, its hook points), loaded once."""
        fw = self.forward()
        return fw.model, fw.arch


def _streamed_routing(setup: CalibrationSetup, capture: LayerCapture, layer: int, plan: list[list[int]],
                      sequences: Sequence[Sequence[int]], whole: bool,
                      report: Callable[[int, int], None] | None) -> Iterator[Any]:
    """Each batch's :class:`Routing` at ``layer`` from a layer-streamed model.

    When every batch's hidden states fit the activation budget, one pass over all batches is kept
    between layers: calibrating layers in increasing order reads each decoder layer once in all.
    Otherwise (or for one shard of the tokens, ``whole`` false) each pass of batches runs from the
    embedding up to ``layer``."""
    from moelens.runtime.stream import Call

    fw = setup.forward()
    masks = []
    calls = []
    seen: list[dict[str, Any]] = []
    current = [0]
    for b, rows in enumerate(plan):
        ids, mask = right_padded([sequences[i] for i in rows], setup.pad_id, setup.device)
        masks.append(mask)
        seen.append({})
        calls.append(Call({"input_ids": ids, "attention_mask": mask, "use_cache": False}, lambda b=b: current.__setitem__(0, b)))
    passes = fw.passes(calls)
    handles = capture.install(lambda: seen[current[0]], stop=False)
    try:
        if len(passes) == 1 and whole:
            walk = setup._walk
            if walk is None or walk.done > layer or len(walk.calls) != len(calls):
                walk = setup._walk = fw.walk(calls)
            walk.calls[:] = calls  # the same batches; this layer's enter callbacks
            walk.through(layer)
        else:
            for group in passes:
                fw.walk(group).through(layer)
    finally:
        for h in handles:
            h.remove()
    for b, mask in enumerate(masks):
        yield capture.routing(seen[b], mask)
        seen[b] = {}
        if report is not None:
            report(b + 1, len(plan))


def token_shards(sequences: Sequence[Sequence[int]], shard_tokens: Optional[int]) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive sequences with at most ``shard_tokens`` tokens each
    (a longer sequence is a shard of its own); one shard of every sequence when None. The shards
    depend on the tokens alone (not on the batch size), so a resumed run finds the same ones."""
    n = len(sequences)
    if shard_tokens is None or n == 0:
        return [(0, n)]
    out: list[tuple[int, int]] = []
    start, size = 0, 0
    for i, s in enumerate(sequences):
        if i > start and size + len(s) > shard_tokens:
            out.append((start, i))
            start, size = i, 0
        size += len(s)
    out.append((start, n))
    return out


def calibrate_layer(setup: CalibrationSetup, layer: int, report: Callable[[int, int], None] | None = None,
                    shard: tuple[int, int] | None = None) -> LayerCalibration:
    """Layer ``layer``'s calibration record (in memory: one forward pass per batch, stopped after
    the router; layer-streamed: every batch through the layers up to this one); with ``shard`` =
    [start, end) only those sequences' (see the module docstring)."""
    lm, arch = setup.loaded()
    view = setup.model.layer(layer)
    capture = LayerCapture(lm, arch, layer, view.top_k)
    w = expert_weights(view)
    features = ExpertFeatures(w["gate"], w["up"], w["down"], setup.activation, w["gate_bias"], w["up_bias"], w["down_bias"],
                              device=setup.device)
    del w
    setup.model.store.release()  # the experts' pages read through the memory maps go with them
    start, end = shard if shard is not None else (0, len(setup.tokens.sequences))
    sequences = setup.tokens.sequences[start:end]
    n, e, k = sum(len(s) for s in sequences), view.n_experts, view.top_k
    logits = np.empty((n, e), dtype=np.float32)
    topk = np.empty((n, k), dtype=np.int32)
    sources: set[str] = set()
    plan = list(batches(sequences, setup.batch_tokens))
    row = 0
    whole = (start, end) == (0, len(setup.tokens.sequences))
    streamed = _streamed_routing(setup, capture, layer, plan, sequences, whole, None) if setup.forward().streamed else None
    for b, rows in enumerate(plan):
        if streamed is not None:
            routing = next(streamed)
        else:
            ids, mask = right_padded([sequences[i] for i in rows], setup.pad_id, setup.device)
            routing = capture.run(ids, mask)
        m = routing.logits.shape[0]
        logits[row:row + m] = routing.logits.numpy()
        topk[row:row + m] = routing.topk.numpy()
        features.add(routing.inputs)
        sources.add(routing.source)
        row += m
        if report is not None:
            report(b + 1, len(plan))
    if row != n:
        raise RuntimeError(f"layer {layer}: {row} tokens captured of {n}")
    return LayerCalibration(layer, features.result(setup.tokens.n_tokens), logits, topk, usage_counts(topk, e), "+".join(sorted(sources)))


__all__ = ["CalibrationSetup", "LayerCalibration", "batches", "calibrate_layer", "expert_weights", "token_shards", "usage_counts"]
