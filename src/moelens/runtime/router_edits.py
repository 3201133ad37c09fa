"""Router-row edits measured in batched forward passes (docs/methods.md §8).

A cell edits one row of one router: r_e ← r'_e at layer ℓ (every position of the prompt), nothing
else. Its logits are recomputed at the interventions' ``router`` site
(:class:`~moelens.runtime.interventions.InterventionHooks`): column e of every token's logits
becomes x_t · r'_e + b_e (x_t the router's input, b_e its bias where it has one), every other
column keeps its value, and routing is recomputed with the family's own rule (softmax or sigmoid,
score-correction bias, group limits, renormalisation; ties to the lower index).

Many cells share one forward pass: row i of a batch is (prompt, cell) and carries its own edited
row, so a batch holds rows of many cells and prompts at once. Each batch records

- the top-k set S'_t the family chose at the cell's layer for every real position t (the expert
  indices its MoE block handed to its experts module, as calibration reads them), and
- the next-token distribution q at the prompt's last position,

and a clean pass gives S_t and p. Per cell, summed over its prompts: the positions where e ∈ S'_t,
the positions where S'_t ≠ S_t (as sets), JSD(p, q) and KL(p‖q) in bits, and, for every expert j,
the positions where e ∈ S_t and j ∈ S'_t (the migration of e's former tokens).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from moelens.calibration.capture import _topk_of, topk_of_logits
from moelens.errors import ConfigError
from moelens.metrics.jsd import LN2, js_divergence
from moelens.progress import ProgressCallback, report
from moelens.runtime.architecture import Architecture, first_tensor, router_weight
from moelens.runtime.checks import check_logits
from moelens.runtime.interventions import Batch, Edit, InterventionHooks, batch_for_hooks, lower_index_ties
from moelens.runtime.trace import memory_budget, row_bytes


def kl_bits(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = Σ_i p_i log₂(p_i / q_i) over the last axis, float64 (0 · log 0 = 0)."""
    p, q = p.double(), q.double()
    return ((torch.xlogy(p, p) - torch.xlogy(p, q)).sum(-1) / LN2).clamp_min(0.0)


@dataclass(frozen=True)
class Cell:
    """One router edit: row ``expert`` of layer ``layer``'s router becomes ``row`` [d].

    ``copy_of`` ≥ 0 (a transplant: ``row`` is that expert's row): column ``expert`` becomes a copy of
    column ``copy_of`` (its bias swapped for the expert's own), so the two logits tie exactly, as
    two equal rows of a weight matrix do, and ties go to the lower index."""

    layer: int
    expert: int
    row: torch.Tensor
    copy_of: int = -1


@dataclass
class CellTotals:
    """Sums over a cell's prompts (arrays indexed by cell)."""

    routed_after: np.ndarray  # positions with e ∈ S'_t
    changed: np.ndarray  # positions with S'_t ≠ S_t
    jsd: np.ndarray  # Σ over prompts, bits
    kl: np.ndarray  # Σ over prompts, bits
    migration: np.ndarray  # [C, E] positions with e ∈ S_t and j ∈ S'_t


@dataclass
class CleanRouting:
    """The clean pass: next-token distributions [P, V] and, per layer, top-k sets [P, T, k]."""

    probs: torch.Tensor
    topk: dict[int, torch.Tensor]
    real: torch.Tensor  # [P, T] bool
    width: int
    #: per layer, where the router can be re-run alone: its inputs [P, T, d] and its clean top-k
    #: indices and weights [P, T, k] from that re-run
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    indices: dict[int, torch.Tensor] = field(default_factory=dict)
    weights: dict[int, torch.Tensor] = field(default_factory=dict)
    #: per layer whose earlier decoder layers may be skipped: the decoder layer's clean input [P, T, d]
    layer_inputs: dict[int, torch.Tensor] = field(default_factory=dict)

    def routed(self, layer: int, n_experts: int) -> np.ndarray:
        """Positions (over every prompt) whose top-k set holds each expert, [E]."""
        sel = self.topk[layer][self.real]  # [N, k]
        return torch.bincount(sel.reshape(-1), minlength=n_experts).cpu().numpy()

    @property
    def n_positions(self) -> int:
        return int(self.real.sum())


@dataclass
class _Record:
    """What the hooks record in one batch's pass (a streamed pass runs every batch through a layer
    before the next layer, so each batch records into its own)."""

    seen: dict[int, torch.Tensor] = field(default_factory=dict)  # experts chosen, [R·T, k]
    router_out: dict[int, Any] = field(default_factory=dict)
    router_in: dict[int, torch.Tensor] = field(default_factory=dict)
    router_extra: dict[int, tuple[tuple, dict] | None] = field(default_factory=dict)
    layer_in: dict[int, torch.Tensor] = field(default_factory=dict)  # decoder layer inputs [R, T, d]


class RouterEditRunner:
    """Hooks on a causal LM that measure many router-row edits per forward pass; the model in
    memory or layer-streamed (``forward``, :func:`moelens.runtime.forward.open_forward`; default:
    ``model`` as loaded). A streamed model runs every batch of a step in one pass, each layer read
    once, starting at the edited layer; the tables are the same either way."""

    def __init__(self, model: Any, arch: Architecture, layers: Sequence[int], top_k: int, pad_id: int = 0,
                 rows_per_batch: int | None = None, skip_layers: bool = True, forward: Any = None):
        from moelens.runtime.forward import InMemoryForward

        self.forward = forward if forward is not None else InMemoryForward(model)
        self.model = self.forward.model
        self.skip_layers = skip_layers
        self.arch = arch
        self.layers = list(layers)
        self.top_k = int(top_k)
        self.pad_id = int(pad_id)
        self.device = self.forward.device
        self.hooks = InterventionHooks(self.model, arch)
        self.rows_per_batch = rows_per_batch
        self._rec = _Record()
        self._router_extra: dict[int, tuple[tuple, dict] | None] = {}
        self._keep_inputs = False
        self._prepared = False
        self._handles: list[Any] = []
        for L in self.layers:
            if arch.layers[L].router is None:
                raise ConfigError(f"layer {L} has no router")

    @property
    def streamed(self) -> bool:
        return bool(self.forward.streamed)

    # -- hooks --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def installed(self, sample_ids: Sequence[int]):
        """The interventions' hooks, then (so they see the edited routing) hooks that record each
        chosen layer's top-k sets."""
        from moelens.runtime.stream import Call

        with self.hooks.installed():
            if not self._prepared:  # the routers' form is learnt once (streamed, a pass that reads every layer)
                ids = torch.tensor([list(sample_ids)], device=self.device)
                self.hooks.prepare_routers({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                           run=lambda kwargs: self.forward.run([Call({**kwargs, "use_cache": False})]))
                self._prepared = True
            try:
                for L in self.layers:
                    points = self.arch.layers[L]
                    self._handles.append(points.router.register_forward_hook(self._router_hook(L), with_kwargs=True))
                    experts = getattr(points.mlp, "experts", None)
                    if isinstance(experts, nn.Module):
                        self._handles.append(experts.register_forward_pre_hook(self._experts_hook(L), with_kwargs=True))
                yield self
            finally:
                for h in self._handles:
                    h.remove()
                self._handles.clear()

    def _router_hook(self, layer: int):
        def hook(module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
            rec = self._rec
            rec.router_out[layer] = output
            if self._keep_inputs and args and isinstance(args[0], torch.Tensor):
                rec.router_in[layer] = args[0].detach()
                # the family's other inputs (e.g. MiniMax-M2's score-correction bias), for re-runs
                per_token = [t for t in (*args[1:], *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() > 1]
                rec.router_extra[layer] = None if per_token else (tuple(args[1:]), dict(kwargs))
        return hook

    def _experts_hook(self, layer: int):
        def hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            index = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
            if isinstance(index, torch.Tensor) and index.ndim == 2 and not index.is_floating_point():
                self._rec.seen[layer] = index.detach()
        return hook

    def _selection(self, layer: int, R: int, T: int, rec: _Record) -> torch.Tensor:
        """[R, T, k] experts the family chose at ``layer`` in the pass ``rec`` recorded."""
        n = R * T
        sel = rec.seen.get(layer)
        if sel is None or tuple(sel.shape) != (n, self.top_k):
            out = rec.router_out.get(layer)
            sel = _topk_of(out, n, self.top_k)
            if sel is None:
                if out is None:
                    raise ConfigError(f"the forward pass never reached the router of layer {layer}")
                sel = topk_of_logits(first_tensor(out).reshape(n, -1), self.top_k)
        return sel.reshape(R, T, self.top_k).long()

    # -- passes -------------------------------------------------------------------------------
    def _call(self, rows: Sequence[Sequence[int]], width: int, edits: dict[tuple[int, str], list[Edit]], rec: _Record,
              then: Any) -> Any:
        """One batch's call: ``rows`` padded to ``width`` with ``edits``, recording into ``rec``;
        its output is ``then(logits [R, V] float32, batch)`` of the last positions' logits."""
        from moelens.runtime.stream import Call

        batch, kwargs, pick, point = batch_for_hooks(self.hooks, rows, self.pad_id, self.device, width, edits)

        def enter() -> None:
            point()
            self._rec = rec

        def keep(output: Any) -> Any:
            logits = pick(output).float()
            lm = None if self.streamed else self.model
            check_logits(logits, lm, "forward pass", input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            return then(logits, batch)

        return Call(kwargs, enter, keep)

    def _run(self, calls: Sequence[Any], progress: ProgressCallback | None = None, start: int = 0, edited: bool = False) -> list[Any]:
        """Each call's kept output; ``edited`` (the calls edit routers): ties go to the lower expert."""
        ties = lower_index_ties() if edited else contextlib.nullcontext()
        try:
            with torch.no_grad(), ties:
                if start:
                    return self.forward.run(calls, progress, start=start)
                return self.forward.run(calls, progress)
        finally:
            self.hooks.edits = {}
            self._rec = _Record()

    @contextlib.contextmanager
    def _start_at(self, layer: int, states: torch.Tensor):
        """Decoder layers before ``layer`` return their input unchanged (no work), and ``layer``
        reads ``states`` [R, T, d] (the clean inputs of its rows) instead: a router edit at ``layer``
        changes nothing before it, so the pass starts there. (A streamed pass starts there by
        itself: :meth:`~moelens.runtime.stream.StreamedForward.run`'s ``start``.)"""
        layers = [p.layer for p in self.arch.layers[:layer]]

        def passthrough(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return hidden_states

        def swap(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> Any:
            if args:
                return (states.to(args[0].dtype), *args[1:]), kwargs
            kwargs["hidden_states"] = states.to(kwargs["hidden_states"].dtype)
            return args, kwargs

        for m in layers:
            m.forward = passthrough  # an instance attribute: Module.__call__ (and its hooks) calls it
        handle = self.arch.layers[layer].layer.register_forward_pre_hook(swap, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            for m in layers:
                del m.forward

    def batch_rows(self, width: int) -> int:
        if self.rows_per_batch is not None:
            return self.rows_per_batch
        per_row = row_bytes(self.model, width, restore=False)
        return int(max(1, min(1024, memory_budget(self.device) // max(per_row, 1))))

    def clean(self, prompts: Sequence[Sequence[int]], keep: Sequence[int] | None = None) -> CleanRouting:
        """Next-token distributions and every chosen layer's top-k sets of the unedited model; and,
        for the layers of ``keep`` (default: every chosen layer), the inputs that let a pass start
        there and, where the router returns its top-k indices and weights, its inputs and that
        output. Those inputs are [P, T, d] per layer, so a caller that edits one layer at a time
        keeps only that one."""
        kept = set(self.layers if keep is None else keep)
        width = max(len(p) for p in prompts)
        step = self.batch_rows(width)
        self.hooks.edits = {}
        probs, topk = [], {L: [] for L in self.layers}
        inputs: dict[int, list[torch.Tensor]] = {L: [] for L in self.layers}
        layer_in: dict[int, list[torch.Tensor]] = {L: [] for L in self.layers}
        plain = [True] * self.arch.n_layers  # decoder layers that return their hidden states as a plain tensor
        extra: list[dict[int, tuple[tuple, dict] | None]] = [{}]

        def record_input(i: int):
            def hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
                x = args[0] if args else kwargs.get("hidden_states")
                if isinstance(x, torch.Tensor):
                    self._rec.layer_in[i] = x.detach()
            return hook

        def record_output(i: int):
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                plain[i] = plain[i] and isinstance(output, torch.Tensor)
            return hook

        def collect(chunk: Sequence[Sequence[int]], rec: _Record):
            # each batch's records as its logits come (in memory: before the next batch runs)
            def then(logits: torch.Tensor, batch: Batch) -> None:
                probs.append(torch.softmax(logits, -1))
                for L in self.layers:
                    topk[L].append(self._selection(L, len(chunk), width, rec))
                    x = rec.router_in.get(L) if L in kept else None
                    if x is not None and x.numel() == len(chunk) * width * x.shape[-1]:
                        inputs[L].append(x.reshape(len(chunk), width, -1))
                    h = rec.layer_in.get(L)
                    if h is not None and tuple(h.shape[:2]) == (len(chunk), width):
                        layer_in[L].append(h)
                extra[0] = rec.router_extra
                rec.seen, rec.router_out, rec.router_in, rec.layer_in = {}, {}, {}, {}
            return then

        calls = []
        for start in range(0, len(prompts), step):
            chunk = prompts[start:start + step]
            rec = _Record()
            calls.append(self._call(chunk, width, {}, rec, collect(chunk, rec)))
        handles = [p.layer.register_forward_hook(record_output(p.index)) for p in self.arch.layers]
        handles += [self.arch.layers[L].layer.register_forward_pre_hook(record_input(L), with_kwargs=True) for L in self.layers if L in kept]
        self._keep_inputs = True
        try:
            self._run(calls)
        finally:
            self._keep_inputs = False
            for h in handles:
                h.remove()
        self._router_extra = extra[0]
        mask = Batch.of(prompts, self.pad_id, self.device, width).attention_mask
        clean = CleanRouting(torch.cat(probs), {L: torch.cat(v) for L, v in topk.items()}, mask.bool(), width)
        if self.skip_layers:
            for L in self.layers:
                if L > 0 and len(layer_in[L]) == len(topk[L]) and all(plain[:L]):
                    clean.layer_inputs[L] = torch.cat(layer_in[L])
        for L in self.layers:
            if len(inputs[L]) != len(topk[L]) or self._router_extra.get(L) is None:
                continue
            x = torch.cat(inputs[L])
            routed = self._route_alone(L, x, None)
            if routed is not None and torch.equal(routed[0], clean.topk[L]):
                clean.inputs[L], clean.indices[L], clean.weights[L] = x, routed[0], routed[1]
        return clean

    def _route_alone(self, layer: int, x: torch.Tensor, edits: dict | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(indices, weights) [R, T, k] of the router of ``layer`` run alone on its inputs x [R, T, d]
        with ``edits``; None when its output holds no top-k indices and weights."""
        R, T, d = x.shape
        self.hooks.edits = edits or {}
        self.hooks.attention_mask = torch.ones(R, T, dtype=torch.long, device=x.device)
        ties = lower_index_ties() if edits else contextlib.nullcontext()
        args, kwargs = self._router_extra[layer] or ((), {})
        router = self.arch.layers[layer].router
        try:
            # a streamed model reads the router's weights for the call
            with torch.no_grad(), ties, self.forward.materialised(router):
                out = router(x.reshape(R * T, d), *args, **kwargs)
        finally:
            self.hooks.edits = {}
        index = _topk_of(out, R * T, self.top_k)
        if index is None or not isinstance(out, (tuple, list)):
            return None
        weights = [t for t in out if isinstance(t, torch.Tensor) and t.is_floating_point() and tuple(t.shape) == (R * T, self.top_k)]
        if not weights:
            return None
        return index.reshape(R, T, self.top_k).long(), weights[0].reshape(R, T, self.top_k)

    def _edits(self, layer_of_row: torch.Tensor, expert_of_row: torch.Tensor, rows: torch.Tensor, copy_of_row: torch.Tensor,
               T: int) -> dict[tuple[int, str], list[Edit]]:
        """Router edits of one batch: row i's logits column expert_of_row[i] at layer
        layer_of_row[i] become x · rows[i] (+ the router's bias there), or a copy of column
        copy_of_row[i] where that is ≥ 0."""
        edits: dict[tuple[int, str], list[Edit]] = {}
        R = int(layer_of_row.shape[0])
        for L in torch.unique(layer_of_row).tolist():
            hit = layer_of_row == L
            index = hit.nonzero().squeeze(1)
            router = self.arch.layers[L].router
            n_experts = int(router_weight(router).shape[0])
            experts = expert_of_row[index]
            new_rows = rows[index]
            copies = copy_of_row[index]

            def value(x: torch.Tensor, logits: torch.Tensor, index=index, experts=experts, new_rows=new_rows, copies=copies,
                      router=router, n_experts=n_experts) -> torch.Tensor:
                # the bias read when the hook runs: a streamed layer's weights are there only then
                bias = getattr(router, "bias", None)
                bias = bias.detach() if isinstance(bias, torch.Tensor) and bias.shape == (n_experts,) else None
                out = logits.clone().view(R, T, -1)
                xs = x.view(R, T, -1)[index]  # [r, T, d]
                col = torch.einsum("rtd,rd->rt", xs.float(), new_rows.to(device=xs.device, dtype=torch.float32))
                if bias is not None:
                    col = col + bias.float()[experts][:, None]
                copied = copies >= 0
                if bool(copied.any()):
                    source = out[index[copied]].gather(2, copies[copied][:, None, None].expand(-1, T, 1)).squeeze(2).float()
                    if bias is not None:
                        source = source - bias.float()[copies[copied]][:, None] + bias.float()[experts[copied]][:, None]
                    col[copied] = source
                out[index[:, None], torch.arange(T, device=out.device)[None, :], experts[:, None]] = col.to(out.dtype)
                return out.view_as(logits)

            mask = hit[:, None].expand(R, T)
            edits[(L, "router")] = [Edit(mask, value, of_input=True)]
        return edits

    def _routing(self, totals: CellTotals, sel: torch.Tensor, before: torch.Tensor, experts: torch.Tensor, real: torch.Tensor,
                 cells: np.ndarray) -> None:
        """Add one group of rows' routing counts: ``sel`` and ``before`` [r, T, k] (edited, clean
        top-k), ``experts`` [r] the edited expert, ``real`` [r, T], ``cells`` [r] their cells."""
        n_experts = totals.migration.shape[1]
        e = experts[:, None, None]
        in_after = (sel == e).any(-1) & real
        in_before = (before == e).any(-1) & real
        differs = (sel.sort(-1).values != before.sort(-1).values).any(-1) & real
        onehot = torch.zeros(*sel.shape[:2], n_experts, dtype=torch.long, device=sel.device)
        onehot.scatter_(2, sel, 1)
        np.add.at(totals.routed_after, cells, in_after.sum(1).cpu().numpy())
        np.add.at(totals.changed, cells, differs.sum(1).cpu().numpy())
        np.add.at(totals.migration, cells, (onehot * in_before[..., None]).sum(1).cpu().numpy())

    def run(self, prompts: Sequence[Sequence[int]], cells: Sequence[Cell], clean: CleanRouting,
            progress: ProgressCallback | None = None, noun: str = "router edits") -> CellTotals:
        """Every (prompt, cell) as a row, in two steps.

        Routing: where the router can be re-run alone (it returns its top-k indices and weights),
        each row's edited routing at ℓ comes from the router on the clean inputs x of layer ℓ (the
        edit changes nothing before ℓ's router), with no forward pass. A row whose routing is the
        clean one at every position (the same experts in the same order, weights equal within
        rtol 1e-6, atol 1e-7: rounding) sends every token through the same experts with the same
        weights, so its next-token distribution is the clean one: JSD = KL = 0 without a pass.

        Predictions: the other rows go through the model in batches of many cells, prompts by
        length so that a batch pads little, each row with its own edited router row; routers that
        cannot be re-run alone get their routing from this pass too. A pass starts at the batch's
        first edited layer from the clean inputs of that decoder layer (the layers before it would
        compute exactly the clean states), where every earlier layer returns a plain tensor."""
        C, P = len(cells), len(prompts)
        n_experts = int(router_weight(self.arch.layers[cells[0].layer].router).shape[0]) if cells else 0
        totals = CellTotals(np.zeros(C, np.int64), np.zeros(C, np.int64), np.zeros(C), np.zeros(C), np.zeros((C, n_experts), np.int64))
        if not C:
            return totals
        dev = self.device
        layer_of = torch.tensor([c.layer for c in cells], device=dev)
        expert_of = torch.tensor([c.expert for c in cells], device=dev)
        rows_all = torch.stack([c.row.double() for c in cells]).to(dev)
        copy_of = torch.tensor([c.copy_of for c in cells], device=dev)
        width = clean.width
        order = sorted(range(P), key=lambda i: len(prompts[i]))
        # routing first, without forward passes, for the layers whose router runs alone
        fast = [c for c in range(C) if cells[c].layer in clean.inputs]
        slow = [c for c in range(C) if cells[c].layer not in clean.inputs]
        forward: list[tuple[int, int]] = [(p, c) for p in order for c in slow]
        step = max(1, min(8192, self.batch_rows(width) * 8))
        items = [(p, c) for c in fast for p in order]
        done = 0
        for start in range(0, len(items), step):
            part = items[start:start + step]
            p_idx = torch.tensor([p for p, _ in part], device=dev)
            c_idx = torch.tensor([c for _, c in part], device=dev)
            for L in torch.unique(layer_of[c_idx]).tolist():
                hit = (layer_of[c_idx] == L).nonzero().squeeze(1)
                ps, cs = p_idx[hit], c_idx[hit]
                edits = self._edits(layer_of[cs], expert_of[cs], rows_all[cs], copy_of[cs], width)
                sel, weights = self._route_alone(L, clean.inputs[L][ps], edits)
                real = clean.real[ps]
                self._routing(totals, sel, clean.topk[L][ps], expert_of[cs], real, cs.cpu().numpy())
                same_w = torch.isclose(weights.float(), clean.weights[L][ps].float(), rtol=1e-6, atol=1e-7).all(-1)
                moved = (((sel != clean.indices[L][ps]).any(-1) | ~same_w) & real).any(1)
                forward.extend(zip(ps[moved].tolist(), cs[moved].tolist()))
            done += len(part)
            report(progress, f"{noun}: routing", done, len(items))
        forward.sort(key=lambda pc: (len(prompts[pc[0]]), pc[0], pc[1]))
        step = self.batch_rows(width)
        parts = [forward[i:i + step] for i in range(0, len(forward), step)]
        calls, firsts = [], []
        done_rows = [0]

        def add(part: list[tuple[int, int]], p_idx: torch.Tensor, c_idx: torch.Tensor, w: int, rec: _Record):
            # one batch's sums, added as its logits come (in batch order, in memory or streamed)
            def then(logits: torch.Tensor, batch: Batch) -> None:
                R = len(part)
                q = torch.softmax(logits, -1)
                p_clean = clean.probs[p_idx]
                cells_np = c_idx.cpu().numpy()
                np.add.at(totals.jsd, cells_np, js_divergence(p_clean, q).cpu().numpy())
                np.add.at(totals.kl, cells_np, kl_bits(p_clean, q).cpu().numpy())
                real = batch.attention_mask.bool()
                for L in torch.unique(layer_of[c_idx]).tolist():
                    if L in clean.inputs:
                        continue  # counted from the router alone
                    hit = (layer_of[c_idx] == L).nonzero().squeeze(1)
                    sel = self._selection(L, R, w, rec)[hit]
                    self._routing(totals, sel, clean.topk[L][p_idx[hit], :w], expert_of[c_idx[hit]], real[hit], c_idx[hit].cpu().numpy())
                rec.seen, rec.router_out = {}, {}
                done_rows[0] += R
                if not self.streamed:
                    report(progress, f"{noun}: predictions", done_rows[0], len(forward))
            return then

        for part in parts:
            w = max(len(prompts[p]) for p, _ in part)
            p_idx = torch.tensor([p for p, _ in part], device=dev)
            c_idx = torch.tensor([c for _, c in part], device=dev)
            edits = self._edits(layer_of[c_idx], expert_of[c_idx], rows_all[c_idx], copy_of[c_idx], w)
            rec = _Record()
            calls.append(self._call([prompts[p] for p, _ in part], w, edits, rec, add(part, p_idx, c_idx, w, rec)))
            firsts.append((int(layer_of[c_idx].min()), p_idx, w))
        if self.streamed:
            # every batch in one pass, each layer read once; it starts at the edited layer when all
            # batches edit the same one and its clean inputs are kept
            layers = {f for f, _, _ in firsts}
            start = firsts[0][0] if len(layers) == 1 and firsts[0][0] in clean.layer_inputs else 0
            if start:
                for call, (first, p_idx, w) in zip(calls, firsts):
                    call.states = clean.layer_inputs[first][p_idx, :w]
            self._run(calls, progress, start=start, edited=True)
        else:
            for call, (first, p_idx, w) in zip(calls, firsts):
                start = self._start_at(first, clean.layer_inputs[first][p_idx, :w]) if first in clean.layer_inputs else contextlib.nullcontext()
                with start:
                    self._run([call], edited=True)
        self.hooks.edits = {}
        return totals


def shares(totals: CellTotals, clean: CleanRouting, layer: int, top_k: int, n_prompts: int) -> dict[str, np.ndarray]:
    """Per-cell measures from a layer's totals: shares of top-k slots and of positions, means over prompts."""
    n = clean.n_positions
    return {
        "routed_after": totals.routed_after / (n * top_k),
        "topk_changed": totals.changed / n,
        "jsd": totals.jsd / n_prompts,
        "kl": totals.kl / n_prompts,
    }


__all__ = ["Cell", "CellTotals", "CleanRouting", "RouterEditRunner", "kl_bits", "shares"]
