"""Layer-wise interventions on a set of prompts: knockout, restore (causal tracing) and attention
blocking, many cells per forward pass (docs/methods.md §4 and §7).

A cell is (prompt, layer, site[, position]). Its value is JSD(p_clean, p_intervened) at the
prompt's last position, in bits on the full vocabulary, and the target token's probability before
and after. Cells are laid out as rows of batches (restore: one row per noise sample), every row
right-padded to the unit's longest prompt; :func:`edits_for` turns a batch's row arrays into
masked edits with tensor operations only (a loop over layers and sites, never over cells).

Sites (docs/methods.md §4):
- knockout: ``subj`` and ``last`` (the decoder layer's output at the subject tokens / the last
  token), ``attn`` (the self-attention output at the last token), ``moe`` (the MLP/MoE block
  output at the last token), ``router`` (the router logits at the last token, routing recomputed),
  replaced by zero or by their mean over the prompt set;
- restore: subject embeddings + N(0, s²) noise, then one clean state restored: ``restore_hidden``
  (layer ℓ's output at token t), ``restore_mlp`` / ``restore_attn`` (the MLP / attention output at
  token t in every layer of the window centred on ℓ); p_restored is the mean of the samples'
  next-token distributions, the indirect effect p_restored(target) − p_corrupted(target);
- block: in every layer of the window centred on ℓ, the last position may not attend to the
  subject positions (``block_subj``), to the other non-subject positions (``block_nonsubj``) or
  to itself (``block_last``).

Restore on a model loaded whole skips work that cannot change a value: cells before the subject,
repeated windows, and the token and layer prefixes a cell shares with the corrupted run
(:meth:`Tracer._restore_in_memory`, docs/methods.md §4 "Batching").

Restore's noise, against ROME's causal tracing (kmeng01/rome, ``experiments/causal_trace.py``):

- its std s (``noise_scale``): ``embedding`` (the default) s = 3σ, σ = std of all entries of the
  input embedding matrix (ddof 0); ``subject`` s = 3σ, σ = std of the embedding module's outputs at
  the subject tokens of every prompt of the set (every occurrence counted, ddof 0), as ROME's
  ``collect_embedding_std`` times the 3 of its experiments (ROME embeds each subject alone and takes
  torch's ddof-1 std, a factor √(N/(N−1)) apart over N entries); a number: s itself;
- its draw (``noise_draw``): ``per-prompt`` (the default) draws ``randn(samples, n_subject_tokens, d)``
  from a generator seeded with seed + prompt_id; ``shared`` draws it from a generator seeded with
  seed alone, so every prompt of the same subject length gets the same noise, as ROME's
  ``trace_with_patch`` does with its ``numpy.random.RandomState(1)`` re-created on every call (the
  same numbers come from the same seed, not ROME's numpy stream);
- ROME skips a prompt whose clean top-1 is not the expected answer (``calculate_hidden_flow``);
  moelens does so with ``correct_only`` (:mod:`moelens.analyses.interventions`), and otherwise keeps
  every prompt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from moelens.choices import (
    ABLATIONS,
    BLOCK_SITES,
    DEFAULT_SITES,
    DEFAULT_WINDOW,
    KNOCKOUT_SITES,
    MODES,
    NOISE_DRAWS,
    NOISE_SAMPLES,
    NOISE_SCALES,
    RESTORE_SITES,
    SITES,
)
from moelens.metrics.jsd import js_divergence
from moelens.progress import ProgressCallback, report
from moelens.runtime.architecture import Architecture
from moelens.runtime.checks import check_logits
from moelens.runtime.forward import Forward, InMemoryForward
from moelens.runtime.interventions import Edit, InterventionHooks, batch_for_hooks, lower_index_ties
from moelens.runtime.prefix_cache import (
    cache_keyword,
    cache_row_bytes,
    cache_tensors,
    concat_tensors,
    layers_from,
    new_cache,
    prefix,
    prefix_cache_supported,
)
from moelens.runtime.prompts import TokenisedPrompt
from moelens.runtime.stream import Call

# One batch of a pass: the call, and how to read each row's last-position logits from its output.
Spec = tuple[Call, Callable[[Any], torch.Tensor]]

NOISE_SCALE = 3.0  # s = 3σ for the noise scales "embedding" and "subject"
# The module each site needs in a layer.
SITE_MODULE = {
    "subj": "layer", "last": "layer", "attn": "attention", "moe": "mlp", "router": "router",
    "restore_hidden": "layer", "restore_mlp": "mlp", "restore_attn": "attention",
    "block_subj": "attention", "block_nonsubj": "attention", "block_last": "attention",
}
# The hook point whose output each site edits (block sites edit the attention mask).
SITE_POINT = {"subj": "layer", "last": "layer", "attn": "attn", "moe": "mlp", "router": "router",
              "restore_hidden": "layer", "restore_mlp": "mlp", "restore_attn": "attn"}
CORRUPT = "corrupt"  # restore's baseline cell: noise, nothing restored
# Rows after which a restore batch on a cache stops taking cells that start at a lower layer
# (fewer, larger batches below it; less work above it).
BUSY_ROWS = 256


def halved_after_oom(per_batch: int) -> int:
    """Cells per batch after CUDA ran out of memory on a batch of ``per_batch``: half as many, the
    same cells retried (with the device's cache emptied); a batch of one cell re-raises the error.
    Called from the ``except`` clause that caught it."""
    if per_batch == 1:
        raise  # the OutOfMemoryError being handled
    torch.cuda.empty_cache()
    return max(1, per_batch // 2)


def window(layer: int, width: int, n_layers: int) -> tuple[int, int]:
    """[ℓ − ⌊w/2⌋, ℓ − ⌊w/2⌋ + w − 1] clipped to the model (inclusive bounds)."""
    lo = layer - width // 2
    return max(lo, 0), min(lo + width - 1, n_layers - 1)


def site_available(arch: Architecture, layer: int, site: str) -> bool:
    return getattr(arch.layers[layer], SITE_MODULE[site]) is not None


@dataclass(frozen=True)
class TraceSettings:
    """What to intervene on and how (validated by the analysis before any forward pass)."""

    mode: str = "knockout"
    sites: tuple[str, ...] = DEFAULT_SITES["knockout"]
    ablation: str = "mean"
    layers: tuple[int, ...] = ()
    window: int = 1
    noise_samples: int = NOISE_SAMPLES
    seed: int = 0
    rows_per_batch: int | None = None
    noise_std: float | None = None  # restore's s; None: 3 × std of the embedding matrix's entries
    noise_draw: str = "per-prompt"


def noise_std(embedding: Any, scale: str | float, prompts: Sequence[TokenisedPrompt] = ()) -> float:
    """Restore's noise std s for a ``noise_scale``: ``"embedding"`` 3 × the std (ddof 0) of every
    entry of the embedding matrix; ``"subject"`` 3 × the std (ddof 0) of every entry of the
    embedding module's outputs at the subject tokens of ``prompts`` (each occurrence counted); a
    number: itself."""
    if scale == "embedding":
        return NOISE_SCALE * float(embedding.weight.detach().double().std(correction=0))
    if scale == "subject":
        ids = [p.input_ids[t] for p in prompts for t in p.subject_positions]
        device = embedding.weight.device
        with torch.no_grad():
            rows = embedding(torch.tensor([ids], dtype=torch.long, device=device))
        return NOISE_SCALE * float(rows.double().std(correction=0))
    return float(scale)

@dataclass
class CellResults:
    """One entry per cell: the columns of the interventions table (without mode)."""

    prompt_id: list[int] = field(default_factory=list)
    layer: list[int] = field(default_factory=list)
    site: list[str] = field(default_factory=list)
    position: list[int] = field(default_factory=list)
    token_kind: list[str] = field(default_factory=list)
    jsd: list[float] = field(default_factory=list)
    target_id: list[int] = field(default_factory=list)
    p_target_clean: list[float] = field(default_factory=list)
    p_target: list[float] = field(default_factory=list)
    p_target_corrupt: list[float] = field(default_factory=list)
    indirect_effect: list[float] = field(default_factory=list)

    def columns(self) -> dict[str, list[Any]]:
        return dict(self.__dict__)


def _config_size(config: Any, *names: str, default: int = 0) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for n in names:
        v = getattr(text, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


def row_bytes(model: Any, width: int, restore: bool) -> int:
    """A generous estimate of the peak bytes one batch row needs in a forward pass without grad:
    a layer's activations (attention scores, the experts' intermediate states for the top-k),
    the last-position logits and, for restore, its noise and the gathered clean states."""
    c = model.config
    d = _config_size(c, "hidden_size", "d_model", default=4096)
    heads = _config_size(c, "num_attention_heads", "n_heads", default=32)
    ffn = _config_size(c, "moe_intermediate_size", "intermediate_size", "ffn_hidden_size", default=4 * d)
    top_k = _config_size(c, "num_experts_per_tok", "moe_top_k", "top_k", default=1)
    vocab = _config_size(c, "vocab_size", default=32000)
    elem = next(model.parameters()).element_size()
    activations = width * (16 * d + 4 * top_k * ffn) * elem + 2 * heads * width * width * 4
    extra = (3 * width * d * 4) if restore else 0
    return int(activations + 4 * vocab * 4 + extra)


def memory_budget(device: torch.device) -> int:
    """Bytes a batch may use: half the free GPU memory, or on the CPU a quarter of the available
    memory capped at 4 GiB (an out-of-memory there kills the process, so it is not probed)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 8 << 30
    return int(min(available // 4, 4 << 30))


class Tracer:
    """Runs one mode's cells for groups of prompts on a model, in memory or layer-streamed
    (``forward``, :func:`moelens.runtime.forward.open_forward`; default: ``model`` as loaded).

    Every pass is a list of batches handed to the runtime at once, so a streamed model reads each
    layer once for all of them; the hooks are the same either way."""

    def __init__(self, model: Any, arch: Architecture, settings: TraceSettings, pad_id: int = 0, forward: Forward | None = None,
                 shortcuts: bool = True):
        self.forward = forward if forward is not None else InMemoryForward(model)
        self.model = self.forward.model
        self.arch = arch
        self.s = settings
        self.pad_id = pad_id
        self.device = self.forward.device
        self.hooks = InterventionHooks(self.model, arch)
        self._routers_ready = False
        # restore's exact savings in memory (:meth:`_restore_in_memory`); off: every cell runs the whole prompt
        self.shortcuts = shortcuts

    # -- forward passes ------------------------------------------------------------------------
    def _spec(self, rows: Sequence[Sequence[int]], width: int, edits: dict[tuple[int, str], list[Edit]],
              captured: dict[tuple[int, str], torch.Tensor] | None = None) -> Spec:
        """One batch: ``rows`` padded to ``width``, the ``edits`` its pass makes, where its captures go."""
        _, kwargs, pick, point = batch_for_hooks(self.hooks, rows, self.pad_id, self.device, width, edits)

        def enter() -> None:
            point()
            if captured is not None:
                self.hooks.captured = captured

        return Call(kwargs, enter), pick

    def _forward_many(self, specs: Sequence[Spec], progress: ProgressCallback | None = None) -> list[torch.Tensor]:
        """Logits [R, V] (float32) at each row's last position, per batch."""
        # Recomputed routing breaks ties toward the lower expert (docs/methods.md §7); only router edits
        # create ties, so other runs keep the family's own top-k untouched.
        routed = False
        for call, _ in specs:
            call.begin()
            routed = routed or any(key[1] == "router" for key in self.hooks.edits)
        ties = lower_index_ties() if routed else contextlib.nullcontext()
        with torch.no_grad(), ties:
            outputs = self.forward.run([c for c, _ in specs], progress)
            logits = [pick(out).float() for (_, pick), out in zip(specs, outputs)]
            for (call, _), lg in zip(specs, logits):
                if self.forward.streamed:
                    check_logits(lg, None, "forward pass")
                else:
                    call.begin()
                    check_logits(lg, self.model, "forward pass", **call.kwargs)
        return logits

    def _forward(self, rows: Sequence[Sequence[int]], width: int) -> torch.Tensor:
        """Logits [R, V] at each row's last position, every row padded to ``width``, with the
        hooks' current edits."""
        return self._forward_many([self._spec(rows, width, self.hooks.edits)])[0]

    def _ensure_routers(self, prompt: TokenisedPrompt) -> None:
        """Learn how each router's logits are replaced (one forward pass), when a site edits them."""
        if not self._routers_ready and "router" in self.s.sites:
            ids = torch.tensor([prompt.input_ids], device=self.device)
            self.hooks.edits = {}
            self.hooks.prepare_routers({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                       run=lambda kwargs: self.forward.run([Call({**kwargs, "use_cache": False})]))
            self._routers_ready = True

    def check_routers(self, prompt: TokenisedPrompt) -> None:
        """Prepare the router hooks with one short pass: a router whose logits cannot be replaced
        is found before any run is written."""
        with self.hooks.installed():
            self._ensure_routers(prompt)

    def check_block(self, prompt: TokenisedPrompt) -> None:
        """One forward pass that bars nothing in every layer that blocking may touch: a layer whose
        attention cannot take a blocked mask is found before any run is written."""
        empty = torch.zeros(1, prompt.length, dtype=torch.bool, device=self.device)
        with self.hooks.installed():
            edits = {(p.index, "block"): [Edit(empty)] for p in self.arch.layers if p.attention is not None}
            try:
                self._forward_many([self._spec([prompt.input_ids], prompt.length, edits)])
            finally:
                self.hooks.edits = {}

    def rows_per_batch(self, width: int) -> int:
        if self.s.rows_per_batch is not None:
            return self.s.rows_per_batch
        per_row = row_bytes(self.model, width, self.s.mode == "restore")
        return int(max(1, min(2048, memory_budget(self.device) // max(per_row, 1))))

    def _rows_within(self, per_row: int) -> int:
        """Rows per batch when each needs ``per_row`` bytes (the setting, where one is given)."""
        if self.s.rows_per_batch is not None:
            return self.s.rows_per_batch
        return int(max(1, min(2048, memory_budget(self.device) // max(per_row, 1))))

    def clean(self, prompts: Sequence[TokenisedPrompt], capture: set[tuple[int, str]] | None = None) -> tuple[torch.Tensor, dict[tuple[int, str], torch.Tensor]]:
        """Clean next-token distributions [P, V] (float32) and, for ``capture`` keys, the outputs
        [P, T, ·] of those hook points, every prompt padded to the longest."""
        return self.clean_groups([prompts], capture)[0]

    def clean_groups(self, groups: Sequence[Sequence[TokenisedPrompt]], capture: set[tuple[int, str]] | None = None,
                     progress: ProgressCallback | None = None) -> list[tuple[torch.Tensor, dict[tuple[int, str], torch.Tensor]]]:
        """:meth:`clean` of every group (each padded to its own longest prompt) in one pass."""
        self.hooks.capture = set(capture or ())
        specs, parts = self._clean_specs(groups)
        try:
            logits = iter(self._forward_many(specs, progress))
        finally:
            self.hooks.capture = set()
            self.hooks.captured = {}
            self.hooks.edits = {}
        return self._clean_results(logits, parts, capture)

    def _clean_specs(self, groups: Sequence[Sequence[TokenisedPrompt]]) -> tuple[list[Spec], list[list[dict[tuple[int, str], torch.Tensor]]]]:
        """The clean batches of every group, and where each batch's captures go."""
        specs: list[Spec] = []
        parts: list[list[dict[tuple[int, str], torch.Tensor]]] = []
        for prompts in groups:
            width = max(p.length for p in prompts)
            step = self.rows_per_batch(width)
            parts.append([])
            for start in range(0, len(prompts), step):
                cap: dict[tuple[int, str], torch.Tensor] = {}
                parts[-1].append(cap)
                specs.append(self._spec([p.input_ids for p in prompts[start:start + step]], width, {}, cap))
        return specs, parts

    @staticmethod
    def _clean_results(logits: Iterator[torch.Tensor], parts: list[list[dict[tuple[int, str], torch.Tensor]]],
                       capture: set[tuple[int, str]] | None) -> list[tuple[torch.Tensor, dict[tuple[int, str], torch.Tensor]]]:
        out = []
        for caps in parts:
            probs = torch.cat([torch.softmax(next(logits), -1) for _ in caps])
            out.append((probs, {k: torch.cat([c[k] for c in caps]) for k in (capture or ())}))
        return out

    # -- the prompt set's means (knockout, ablation mean) -----------------------------------------
    def means(self, prompts: Sequence[TokenisedPrompt], progress: ProgressCallback | None = None) -> dict[tuple[int, str], torch.Tensor]:
        """Per (layer, site): the clean site's mean over the prompt set (docs/methods.md §4): ``subj`` over
        every subject token of every prompt, the others over every prompt's last token."""
        keys = {(layer, SITE_POINT[site]) for layer in self.s.layers for site in self.s.sites
                if site_available(self.arch, layer, site)}
        sums: dict[tuple[int, str], torch.Tensor] = {}
        counts = {"subj": 0, "last": 0}
        order = sorted(prompts, key=lambda p: p.length)
        step = max(1, min(256, self.rows_per_batch(max(p.length for p in prompts))))
        chunks = [order[start:start + step] for start in range(0, len(order), step)]
        with self.hooks.installed():
            self._ensure_routers(order[0])
            # a streamed model runs every chunk in one pass (each layer read once); in memory, a
            # chunk at a time, so only one chunk's captures are held
            together = self.clean_groups(chunks, keys) if self.forward.streamed else None
            for c, chunk in enumerate(chunks):
                start = c * step
                _, cap = together[c] if together is not None else self.clean(chunk, keys)
                width = max(p.length for p in chunk)
                subj = torch.zeros(len(chunk), width, dtype=torch.bool, device=self.device)
                for i, p in enumerate(chunk):
                    subj[i, list(p.subject_positions)] = True
                last = torch.tensor([p.last for p in chunk], device=self.device)
                rows = torch.arange(len(chunk), device=self.device)
                for layer in self.s.layers:
                    for site in self.s.sites:
                        key = (layer, SITE_POINT[site])
                        if key not in cap:
                            continue
                        t = cap[key].double()  # [P, T, ·]
                        v = t[subj].sum(0) if site == "subj" else t[rows, last].sum(0)
                        sums[(layer, site)] = sums.get((layer, site), 0) + v
                counts["subj"] += int(sum(len(p.subject_positions) for p in chunk))
                counts["last"] += len(chunk)
                report(progress, "mean of each site over the prompts", min(start + step, len(order)), len(order))
        return {k: (v / counts["subj" if k[1] == "subj" else "last"]) for k, v in sums.items()}

    # -- cells ----------------------------------------------------------------------------------
    def cells(self, prompts: Sequence[TokenisedPrompt]) -> list[tuple[int, int, str, int]]:
        """(prompt index, layer, site, position) of every cell, prompt-major; restore adds one
        baseline cell per prompt (site ``corrupt``) and one cell per token position."""
        out = []
        for i, p in enumerate(prompts):
            if self.s.mode == "restore":
                out.append((i, -1, CORRUPT, -1))
            for layer in self.s.layers:
                for site in self.s.sites:
                    if not site_available(self.arch, layer, site):
                        continue
                    if self.s.mode == "restore":
                        out.extend((i, layer, site, t) for t in range(p.length))
                    else:
                        out.append((i, layer, site, -1))
        return out

    def run(self, prompts: Sequence[TokenisedPrompt], means: dict[tuple[int, str], torch.Tensor] | None = None,
            progress: ProgressCallback | None = None, noun: str = "cells", seed: int | None = None) -> CellResults:
        """Every cell of ``prompts``: their JSDs and target probabilities. Restore's noise is
        drawn from ``seed`` (a unit's; the settings' by default) as the module docstring says."""
        s = self.s
        n_layers = self.arch.n_layers
        width = max(p.length for p in prompts)
        with self.hooks.installed():
            self._ensure_routers(prompts[0])
            capture = None
            if s.mode == "restore":
                capture = {(L, pt) for L in range(n_layers) for pt, mod in (("layer", "layer"), ("attn", "attention"), ("mlp", "mlp"))
                           if getattr(self.arch.layers[L], mod) is not None}
            unit_seed = s.seed if seed is None else int(seed)
            cells = self.cells(prompts)
            samples = s.noise_samples if s.mode == "restore" else 1
            if self.forward.streamed and s.mode != "restore":
                # knockout and block edit nothing clean: the clean batches ride in the cells' pass
                clean_specs, parts = self._clean_specs([prompts])
                ctx = _UnitContext.build(self, prompts, width, None, {}, means, unit_seed)
                jsd, probs_target, ctx = self._run_cells(ctx, cells, samples, width, progress, noun, clean=(clean_specs, parts))
            else:  # restore's cells edit in the clean states: its clean pass comes first
                p_clean, clean_states = self.clean(prompts, capture)
                ctx = _UnitContext.build(self, prompts, width, p_clean, clean_states, means, unit_seed)
                if s.mode == "restore" and not self.forward.streamed:
                    jsd, probs_target = self._restore_in_memory(ctx, cells, samples, width, progress, noun)
                else:
                    jsd, probs_target, _ = self._run_cells(ctx, cells, samples, width, progress, noun)
            self.hooks.edits = {}
        return _collect(prompts, cells, jsd, probs_target, ctx, s.mode)

    def _run_cells(self, ctx: "_UnitContext", cells: Sequence[tuple[int, int, str, int]], samples: int, width: int,
                   progress: ProgressCallback | None = None, noun: str = "cells", done: int = 0,
                   total: int | None = None, clean: tuple[list[Spec], list[list[dict[tuple[int, str], torch.Tensor]]]] | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, "_UnitContext"]:
        """Every cell as rows of batches padded to ``width`` (``samples`` rows per cell), the whole
        prompt each time; progress counts from ``done`` of ``total``. ``clean``: the clean batches
        (:meth:`_clean_specs`) to run in the same streamed pass, first; the context returned then
        holds their distributions (:meth:`_UnitContext.with_clean`)."""
        total = len(cells) if total is None else total
        per_batch = max(1, self.rows_per_batch(width) // samples)
        probs_target = np.zeros(len(cells))
        jsd = np.zeros(len(cells))
        start = 0
        if self.forward.streamed:  # every batch in one pass: each layer read once for all cells
            starts = list(range(0, len(cells), per_batch))
            clean_specs, parts = clean if clean is not None else ([], [])
            specs = [self._batch_spec(ctx, cells[a:a + per_batch], samples, width) for a in starts]
            logits = self._forward_many(clean_specs + specs, progress)
            if clean_specs:
                ctx = ctx.with_clean(self._clean_results(iter(logits[:len(clean_specs)]), parts, None)[0][0])
                logits = logits[len(clean_specs):]
            for a, lg in zip(starts, logits):
                chunk = cells[a:a + per_batch]
                jsd[a:a + len(chunk)], probs_target[a:a + len(chunk)] = self._batch_result(ctx, chunk, samples, lg)
            report(progress, noun, done + len(cells), total)
            start = len(cells)
        while start < len(cells):
            chunk = cells[start:start + per_batch]
            try:
                j, pt = self._run_batch(ctx, chunk, samples, width)
            except torch.cuda.OutOfMemoryError:
                per_batch = halved_after_oom(per_batch)
                continue
            jsd[start:start + len(chunk)] = j
            probs_target[start:start + len(chunk)] = pt
            start += len(chunk)
            report(progress, noun, done + start, total)
        return jsd, probs_target, ctx

    # -- restore, in memory: exact savings ------------------------------------------------------
    def _restore_in_memory(self, ctx: "_UnitContext", cells: Sequence[tuple[int, int, str, int]], samples: int, width: int,
                           progress: ProgressCallback | None = None, noun: str = "cells") -> tuple[np.ndarray, np.ndarray]:
        """Restore's cells on a model loaded whole, with savings that leave every value as the full
        pass computes it (up to float rounding):

        1. a cell at a position t before the prompt's first subject token restores a state that is
           already clean in the corrupted run (the noise enters later, and the model is causal), so
           its p_restored is the corrupted baseline's: the baseline cell's values are copied; and
           window cells of one site whose windows clip to the same layers are computed once;
        2. where the model's cache allows it (:func:`moelens.runtime.prefix_cache.prefix_cache_supported`),
           the corrupted run of each prompt is made once per noise sample with a key/value cache,
           and a cell at t runs only the suffix ``input_ids[t:]`` on that cache cropped to t, from
           the first layer it changes (:meth:`_forward_suffix`); the rows of one batch share
           (prompt, t), so they have one length and need no padding.

        Elsewhere (``shortcuts`` off, or a cache that does not qualify) the remaining cells run the
        whole prompt as :meth:`_run_cells` does."""
        n = len(cells)
        jsd = np.zeros(n)
        pt = np.zeros(n)
        if not self.shortcuts:
            return self._run_cells(ctx, cells, samples, width, progress, noun)[:2]
        first = [min(p.subject_positions, default=p.length) for p in ctx.prompts]
        baseline = {c[0]: k for k, c in enumerate(cells) if c[2] == CORRUPT}
        early = [k for k, c in enumerate(cells) if c[2] != CORRUPT and c[3] < first[c[0]]]
        skipped = set(early)
        # restore_mlp / restore_attn cells whose windows clip to the same layers make the same edits
        # (a model shallower than the window: all of them): one of them runs, the others copy it
        same: dict[tuple[Any, ...], int] = {}
        copies: list[tuple[int, int]] = []
        for k, c in enumerate(cells):
            if k in skipped or c[2] == CORRUPT:
                continue
            span = (c[1], c[1]) if c[2] == "restore_hidden" else window(c[1], self.s.window, self.arch.n_layers)
            key = (c[0], c[2], span, c[3])
            if key in same:
                copies.append((k, same[key]))
                skipped.add(k)
            else:
                same[key] = k
        rest = [k for k in range(n) if k not in skipped]
        if prefix_cache_supported(self.model, self.arch.n_layers) and self._store_fits(ctx, samples):
            done = len(skipped)
            for i in range(len(ctx.prompts)):
                mine = [k for k in rest if cells[k][0] == i]
                done = self._restore_prompt(ctx, i, [cells[k] for k in mine], mine, samples, jsd, pt, progress, noun, done, n)
        else:
            j, p, _ = self._run_cells(ctx, [cells[k] for k in rest], samples, width, progress, noun, len(skipped), n)
            jsd[rest], pt[rest] = j, p
        for k in early:
            b = baseline[cells[k][0]]
            jsd[k], pt[k] = jsd[b], pt[b]
        for k, b in copies:
            jsd[k], pt[k] = jsd[b], pt[b]
        return jsd, pt

    def _restore_prompt(self, ctx: "_UnitContext", i: int, cells: Sequence[tuple[int, int, str, int]], index: Sequence[int],
                        samples: int, jsd: np.ndarray, pt: np.ndarray, progress: ProgressCallback | None, noun: str,
                        done: int, total: int) -> int:
        """Prompt ``i``'s cells (its baseline among them) written at ``index`` of ``jsd`` / ``pt``:
        the corrupted run once with a cache, then the cells of each position t on its suffix."""
        p = ctx.prompts[i]
        kv, states, probs = self._corrupted_cache(ctx, i, samples)
        by_t: dict[int, list[int]] = {}
        for c, k in zip(cells, index):
            if c[2] == CORRUPT:
                jsd[k] = float(js_divergence(ctx.p_clean[i:i + 1], probs[None])[0])
                pt[k] = float(probs[ctx.target[i]].double())
                done += 1
            else:
                by_t.setdefault(c[3], []).append(k)
        all_cells = {k: c for c, k in zip(cells, index)}
        for t in sorted(by_t):
            # cells that leave more layers as the corrupted run left them first, so a batch's cells
            # start at nearby layers
            ks = sorted(by_t[t], key=lambda k: -self._first_changed(all_cells[k]))
            length = p.length - t
            per_batch = max(1, self._rows_within(row_bytes(self.model, length, True) + cache_row_bytes(self.model, p.length)) // samples)
            start = 0
            while start < len(ks):
                chunk = ks[start:start + per_batch]
                # a batch runs from its lowest first-changed layer: cells of a lower one wait for
                # the next batch once this one has rows enough to keep the device busy
                firsts = [self._first_changed(all_cells[k]) for k in chunk]
                cut = next((m for m in range(1, len(chunk)) if firsts[m] != firsts[m - 1] and m * samples >= BUSY_ROWS), len(chunk))
                chunk = chunk[:cut]
                try:
                    lg = self._forward_suffix(ctx, i, t, [all_cells[k] for k in chunk], samples, kv, states)
                except torch.cuda.OutOfMemoryError:
                    per_batch = halved_after_oom(per_batch)
                    continue
                j, q = self._batch_result(ctx, [all_cells[k] for k in chunk], samples, lg)
                jsd[chunk], pt[chunk] = j, q
                start += len(chunk)
                done += len(chunk)
                report(progress, noun, done, total)
        return done

    def _corrupted_cache(self, ctx: "_UnitContext", i: int, samples: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor], torch.Tensor]:
        """Prompt ``i`` with each noise sample (one row each, chunked by the memory bound): its
        key/value cache (rows = samples), every decoder layer's output [S, T, d], and the mean over
        samples of the last position's next-token distribution [V]."""
        p = ctx.prompts[i]
        n_layers = self.arch.n_layers
        step = self._rows_within(row_bytes(self.model, p.length, True) + cache_row_bytes(self.model, p.length)
                                 + n_layers * p.length * self.arch.embedding.weight.shape[1] * self.arch.embedding.weight.element_size())
        parts = []
        captured: list[dict[tuple[int, str], torch.Tensor]] = []
        total = None
        keyword = cache_keyword(self.model)
        for a in range(0, samples, step):
            sample = torch.arange(a, min(samples, a + step), device=self.device)
            r = len(sample)
            prompt = torch.full((r,), i, device=self.device)
            edits = edits_for(self, ctx, prompt, np.full(r, -1), np.full(r, CORRUPT), torch.full((r,), -1, device=self.device),
                              sample, p.length)
            cache = new_cache(self.model)
            ids = torch.tensor([p.input_ids], device=self.device).expand(r, -1)
            kwargs = {"input_ids": ids, keyword: cache, "use_cache": True, "logits_to_keep": 1}
            self.hooks.capture = {(L, "layer") for L in range(n_layers)}
            try:
                lg = self._forward_rows(kwargs, edits, r, p.length, check_kwargs={"input_ids": ids, "use_cache": False})
                captured.append(self.hooks.captured)
            finally:
                self.hooks.capture = set()
                self.hooks.captured = {}
            parts.append(cache_tensors(cache))
            probs = torch.softmax(lg, -1).sum(0)
            total = probs if total is None else total + probs
        states = [torch.cat([c[(L, "layer")] for c in captured]) if len(captured) > 1 else captured[0][(L, "layer")]
                  for L in range(n_layers)]
        return concat_tensors(parts), states, total / samples

    def _store_fits(self, ctx: "_UnitContext", samples: int) -> bool:
        """Whether one prompt's corrupted run, kept for its cells (the key/value cache and every
        layer's output of ``samples`` rows), fits the memory a batch may use; if not, the cells run
        the whole prompt."""
        if self.s.rows_per_batch is not None:  # a batch size given: the memory is the caller's to bound
            return True
        length = max(p.length for p in ctx.prompts)
        weight = self.arch.embedding.weight
        per_row = cache_row_bytes(self.model, length) // 2 + self.arch.n_layers * length * weight.shape[1] * weight.element_size()
        return samples * per_row <= memory_budget(self.device)

    def _first_changed(self, cell: tuple[int, int, str, int]) -> int:
        """The first decoder layer whose output a restore cell changes: restore_hidden at ℓ changes
        the input of layer ℓ + 1; restore_mlp / restore_attn the first layer of their window.
        Every earlier layer computes what the corrupted run computed."""
        _, layer, site, _ = cell
        if site == "restore_hidden":
            return layer + 1
        return window(layer, self.s.window, self.arch.n_layers)[0]

    def _forward_suffix(self, ctx: "_UnitContext", i: int, t: int, cells: Sequence[tuple[int, int, str, int]], samples: int,
                        kv: list[tuple[torch.Tensor, torch.Tensor]], states: list[torch.Tensor]) -> torch.Tensor:
        """Logits [R, V] at the last position of ``cells`` (all of prompt ``i`` at position t,
        ``samples`` rows each) run on the positions t, t + 1, ... after the corrupted cache of
        positions < t, from the first layer k that one of them changes: the input of layer k is the
        corrupted run's output of layer k − 1 (with the clean state at t for a restore_hidden cell
        at k − 1), and layers < k do not run (k = 0: the tokens, noise added to their embeddings)."""
        p = ctx.prompts[i]
        dev = self.device
        n = len(cells)
        r = n * samples
        length = p.length - t
        prompt = torch.full((r,), i, device=dev)
        layer = np.repeat([c[1] for c in cells], samples)
        site = np.repeat([c[2] for c in cells], samples)
        position = torch.full((r,), t, device=dev)
        sample = torch.arange(samples, device=dev).repeat(n)
        edits = edits_for(self, ctx, prompt, layer, site, position, sample, length, start=t)
        first = min(self._first_changed(c) for c in cells)
        kwargs: dict[str, Any] = {"logits_to_keep": 1}
        if first == 0:
            kwargs["input_ids"] = torch.tensor([p.input_ids[t:]], device=dev).expand(r, -1)
        else:
            x = states[first - 1][sample, t:]  # [R, T − t, d]
            hidden = torch.as_tensor((layer == first - 1) & (site == "restore_hidden"), device=dev)
            clean = ctx.clean_states[(first - 1, "layer")][i, t]
            x[:, 0] = torch.where(hidden[:, None], clean.to(x.dtype), x[:, 0])
            kwargs["inputs_embeds"] = x
        if t > 0:  # rows are cell-major, sample-minor: row k continues sample k mod S's cache
            kwargs.update({cache_keyword(self.model): prefix(self.model, kv, t, n, first), "use_cache": True})
        else:
            kwargs["use_cache"] = False
        with layers_from(self.model, self.arch.layers[0].layer, first):
            return self._forward_rows(kwargs, edits, r, length)

    def _forward_rows(self, kwargs: dict[str, Any], edits: dict[tuple[int, str], list[Edit]], rows: int, length: int,
                      check_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        """Logits [R, V] (float32) at the last position of one unpadded batch, with ``edits``.
        Non-finite logits are explained by re-running ``check_kwargs`` (a cache is spent by its
        pass, so without them no layer is named)."""
        self.hooks.attention_mask = torch.ones(rows, length, dtype=torch.long, device=self.device)
        self.hooks.last = torch.full((rows,), length - 1, device=self.device)
        self.hooks.edits = edits
        with torch.no_grad():
            out = self.model(**kwargs)
        lg = out.logits[:, -1].float()
        if not bool(torch.isfinite(lg).all()):
            check_logits(lg, self.model if check_kwargs is not None else None, "forward pass", **(check_kwargs or {}))
        return lg

    def _run_batch(self, ctx: "_UnitContext", cells: Sequence[tuple[int, int, str, int]], samples: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        logits = self._forward_many([self._batch_spec(ctx, cells, samples, width)])[0]
        return self._batch_result(ctx, cells, samples, logits)

    def _batch_spec(self, ctx: "_UnitContext", cells: Sequence[tuple[int, int, str, int]], samples: int, width: int) -> Spec:
        dev = self.device
        n = len(cells)
        prompt = torch.tensor([c[0] for c in cells], device=dev).repeat_interleave(samples)
        layer = np.repeat([c[1] for c in cells], samples)
        site = np.repeat([c[2] for c in cells], samples)
        position = torch.tensor([c[3] for c in cells], device=dev).repeat_interleave(samples)
        sample = torch.arange(samples, device=dev).repeat(n)
        edits = edits_for(self, ctx, prompt, layer, site, position, sample, width)
        rows = [ctx.prompts[c[0]].input_ids for c in cells for _ in range(samples)]
        return self._spec(rows, width, edits)

    def _batch_result(self, ctx: "_UnitContext", cells: Sequence[tuple[int, int, str, int]], samples: int,
                      logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        dev = self.device
        n = len(cells)
        probs = torch.softmax(logits, -1)  # [R, V]
        probs = probs.view(n, samples, -1).mean(1)  # restore: the mean over noise samples
        cell_prompt = torch.tensor([c[0] for c in cells], device=dev)
        j = js_divergence(ctx.p_clean[cell_prompt], probs)
        pt = probs[torch.arange(n, device=dev), ctx.target[cell_prompt]]
        return j.cpu().numpy(), pt.double().cpu().numpy()


@dataclass
class _UnitContext:
    """Device tensors of one group of prompts that every batch's edits index."""

    prompts: Sequence[TokenisedPrompt]
    p_clean: torch.Tensor  # [P, V]
    target: torch.Tensor  # [P]
    subject: torch.Tensor  # [P, T] bool
    last: torch.Tensor  # [P]
    real: torch.Tensor  # [P, T] bool: not padding
    clean_states: dict[tuple[int, str], torch.Tensor]  # (layer, point) -> [P, T, d]
    means: dict[tuple[int, str], torch.Tensor] | None
    noise: torch.Tensor | None  # [P, S, T, d]

    @staticmethod
    def build(tracer: Tracer, prompts: Sequence[TokenisedPrompt], width: int, p_clean: torch.Tensor | None,
              clean_states: dict[tuple[int, str], torch.Tensor], means: dict[tuple[int, str], torch.Tensor] | None,
              seed: int | None = None) -> "_UnitContext":
        """The context of ``prompts``; ``p_clean`` None when the clean pass runs beside the cells'
        (knockout and block, streamed), given after it by :meth:`with_clean`."""
        dev = tracer.device
        P = len(prompts)
        subject = torch.zeros(P, width, dtype=torch.bool)
        real = torch.zeros(P, width, dtype=torch.bool)
        for i, p in enumerate(prompts):
            subject[i, list(p.subject_positions)] = True
            real[i, :p.length] = True
        target = _targets(prompts, p_clean)
        p_clean = p_clean if p_clean is not None else torch.empty(P, 0)
        noise = None
        if tracer.s.mode == "restore":
            sigma = tracer.s.noise_std
            if sigma is None:
                with tracer.forward.materialised(tracer.arch.embedding) as embedding:
                    sigma = noise_std(embedding, "embedding")
            d = tracer.arch.embedding.weight.shape[1]
            noise = torch.zeros(P, tracer.s.noise_samples, width, d)
            for i, p in enumerate(prompts):
                shared = tracer.s.noise_draw == "shared"  # one draw for every prompt (per subject length)
                base = tracer.s.seed if seed is None else int(seed)  # the unit's seed (the settings' by default)
                g = torch.Generator().manual_seed(base if shared else base + p.prompt_id)
                draw = torch.randn(tracer.s.noise_samples, len(p.subject_positions), d, generator=g) * sigma
                noise[i][:, list(p.subject_positions)] = draw
            noise = noise.to(dev)
        return _UnitContext(prompts, p_clean, target.to(dev), subject.to(dev),
                            torch.tensor([p.last for p in prompts], device=dev), real.to(dev), clean_states, means, noise)

    def with_clean(self, p_clean: torch.Tensor) -> "_UnitContext":
        """This context with the clean distributions [P, V] and the targets they decide."""
        return dataclasses.replace(self, p_clean=p_clean, target=_targets(self.prompts, p_clean).to(self.target.device))


def _targets(prompts: Sequence[TokenisedPrompt], p_clean: torch.Tensor | None) -> torch.Tensor:
    """Each prompt's target token: its own, else the clean argmax (-1 until the clean pass is known)."""
    argmax = p_clean.argmax(-1).cpu() if p_clean is not None else None
    return torch.tensor([p.target_id if p.target_id is not None else (int(argmax[i]) if argmax is not None else -1)
                         for i, p in enumerate(prompts)])


def edits_for(tracer: Tracer, ctx: _UnitContext, prompt: torch.Tensor, layer: np.ndarray, site: np.ndarray,
              position: torch.Tensor, sample: torch.Tensor, width: int, start: int = 0) -> dict[tuple[int, str], list[Edit]]:
    """The edits of one batch whose row r carries (prompt[r], layer[r], site[r], position[r],
    sample[r]); built with tensor operations, looping over layers and sites only. The batch holds
    the token positions [start, start + width) (``start`` > 0: a suffix run after a cache)."""
    s = tracer.s
    dev = tracer.device
    n_layers = tracer.arch.n_layers
    edits: dict[tuple[int, str], list[Edit]] = {}
    arange = torch.arange(start, start + width, device=dev)
    subject = ctx.subject[prompt][:, start:start + width]  # [R, T]
    last = (arange[None, :] == ctx.last[prompt][:, None])  # [R, T]

    def rows_of(name: str, at: int) -> torch.Tensor | None:
        hit = (layer == at) & (site == name)
        if not hit.any():  # host arrays: no device sync
            return None
        return torch.as_tensor(hit, device=dev)

    if s.mode == "knockout":
        for L in s.layers:
            for name in s.sites:
                rows = rows_of(name, L)
                if rows is None:
                    continue
                where = subject if name == "subj" else last
                value = None if s.ablation == "zero" else ctx.means[(L, name)]
                edits.setdefault((L, SITE_POINT[name]), []).append(Edit(rows[:, None] & where, value))
        return edits

    lo_h = np.maximum(layer - s.window // 2, 0)
    hi_h = np.minimum(layer - s.window // 2 + s.window - 1, n_layers - 1)

    if s.mode == "restore":
        noise = ctx.noise
        edits[(-1, "embed")] = [Edit(subject, lambda: noise[:, :, start:start + width][prompt, sample], add=True)]
        at_position = arange[None, :] == position[:, None]  # [R, T]
        # each row restores one position, so its clean state there is its value: [R, 1, d]
        clean_at = position.clamp(min=0)  # baseline rows (position −1) restore nothing
        for L in range(n_layers):
            hidden = rows_of("restore_hidden", L)
            if hidden is not None:
                states = ctx.clean_states[(L, "layer")]
                edits.setdefault((L, "layer"), []).append(Edit(hidden[:, None] & at_position, lambda st=states: st[prompt, clean_at][:, None]))
            for name, point in (("restore_mlp", "mlp"), ("restore_attn", "attn")):
                hit = (site == name) & (lo_h <= L) & (L <= hi_h)
                if not hit.any() or (L, point) not in ctx.clean_states:
                    continue
                rows = torch.as_tensor(hit, device=dev)
                states = ctx.clean_states[(L, point)]
                edits.setdefault((L, point), []).append(Edit(rows[:, None] & at_position, lambda st=states: st[prompt, clean_at][:, None]))
        return edits

    # block: the keys each row's last position may not attend to
    real = ctx.real[prompt][:, start:start + width]
    keys_of = {"block_subj": subject, "block_nonsubj": real & ~subject & ~last, "block_last": last}
    for L in range(n_layers):
        if tracer.arch.layers[L].attention is None:
            continue
        for name in s.sites:
            hit = (site == name) & (lo_h <= L) & (L <= hi_h)
            if not hit.any():
                continue
            rows = torch.as_tensor(hit, device=dev)
            edits.setdefault((L, "block"), []).append(Edit(rows[:, None] & keys_of[name]))
    return edits


def _collect(prompts: Sequence[TokenisedPrompt], cells: Sequence[tuple[int, int, str, int]], jsd: np.ndarray,
             p_target: np.ndarray, ctx: _UnitContext, mode: str) -> CellResults:
    out = CellResults()
    p_clean_t = ctx.p_clean[torch.arange(len(prompts), device=ctx.p_clean.device), ctx.target].double().cpu().numpy()
    target = ctx.target.cpu().numpy()
    corrupt = {c[0]: p_target[k] for k, c in enumerate(cells) if c[2] == CORRUPT}
    for k, (i, layer, site, position) in enumerate(cells):
        if site == CORRUPT:
            continue
        p = prompts[i]
        out.prompt_id.append(p.prompt_id)
        out.layer.append(layer)
        out.site.append(site)
        out.position.append(position)
        out.token_kind.append(p.token_kind(position) if mode == "restore" else "")
        out.jsd.append(float(jsd[k]))
        out.target_id.append(int(target[i]))
        out.p_target_clean.append(float(p_clean_t[i]))
        out.p_target.append(float(p_target[k]))
        pc = corrupt.get(i, math.nan)
        out.p_target_corrupt.append(float(pc))
        out.indirect_effect.append(float(p_target[k] - pc) if mode == "restore" else math.nan)
    return out


__all__ = [
    "ABLATIONS", "BLOCK_SITES", "CellResults", "DEFAULT_SITES", "DEFAULT_WINDOW", "KNOCKOUT_SITES", "MODES",
    "NOISE_DRAWS", "NOISE_SCALES", "RESTORE_SITES", "noise_std", "SITES", "SITE_MODULE", "TraceSettings", "Tracer", "edits_for", "row_bytes", "site_available", "window",
]
