"""A slow, plain reference of layer-wise interventions (docs/methods.md §4 and §7), written apart from
moelens' code path.

One cell at a time, as ROME's causal tracing and TransformerLens's activation patching do it: for
each prompt, each layer and each site, ONE forward pass of batch size 1 (restore: one batch of the
10 noise samples of that one cell) with forward hooks doing that cell's intervention, removed in a
``finally`` after the pass. Probabilities are the float64 softmax of the float32 logits at the last
position; JSD is computed with numpy in float64, in bits:

    JSD(P, Q) = ½ Σ_i P_i log2(P_i / M_i) + ½ Σ_i Q_i log2(Q_i / M_i),   M = (P + Q) / 2.

How each intervention is done here:

- ``subj``/``last``: forward hook on the decoder layer; its output at the subject tokens (the last
  token) is replaced. ``attn``: forward hook on ``self_attn``, first element of its output tuple.
  ``moe``: forward hook on ``mlp`` (the MoE block), its output at the last token.
- ``router``: forward hook on ``mlp.gate``, which returns (logits, top-k weights, top-k indices)
  for every token; the last token's row of all three is replaced, the routing recomputed from the
  new logits with the family's rule written out below in plain loops (softmax, top-k with ties to
  the lower expert index, renormalised or not); on clean passes the rule is checked against the
  family's own router output for every token.
- restore: noise added to the embedding module's output at the subject tokens; the clean value of
  the restored site comes from the prompt's clean pass.
- other causal LMs (GPT-2, GPT-J, GPT-NeoX, Phi, Gemma, Falcon, OPT): the decoder layers, the
  attention module and the MLP are found by the names written in ``LAYOUT`` below (OPT has no MLP
  module: its ``fc2`` output, flattened to [B·T, d], is the MLP output).
- block: the model runs with eager attention, and a forward pre-hook hands ``self_attn`` of each
  layer in the window a hand-built additive 4-D mask (causal, plus the blocked key positions of the
  last query row at the dtype's minimum), so the softmax renormalises over the keys left.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

NOISE_SAMPLES = 10
NOISE_SCALE = 3.0
RESTORE_WINDOW = 10
BLOCK_WINDOW = 9
KNOCKOUT_SITES = ("subj", "attn", "last")
MOE_SITES = ("router", "moe")
RESTORE_SITES = ("restore_hidden", "restore_mlp", "restore_attn")
BLOCK_SITES = ("block_subj", "block_nonsubj", "block_last")
COLUMNS = (
    "prompt_id", "layer", "site", "mode", "position", "token_kind", "jsd", "target_id",
    "p_target_clean", "p_target", "p_target_corrupt", "indirect_effect",
)


# ----------------------------------------------------------------------------- plain measures

def js_divergence_bits(p: np.ndarray, q: np.ndarray) -> float:
    """JSD(p, q) in bits, float64, terms with a zero probability left out (0 · log 0 = 0)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    m = 0.5 * (p + q)
    kl_pm = float(np.sum(p[p > 0] * np.log2(p[p > 0] / m[p > 0])))
    kl_qm = float(np.sum(q[q > 0] * np.log2(q[q > 0] / m[q > 0])))
    return 0.5 * kl_pm + 0.5 * kl_qm


def softmax64(logits: torch.Tensor) -> np.ndarray:
    """Full-vocabulary next-token distribution(s) in float64 from logits [..., V]."""
    x = logits.detach().to(torch.float64).cpu().numpy()
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def window_layers(layer: int, width: int, n_layers: int) -> list[int]:
    """[ℓ − ⌊w/2⌋, ℓ − ⌊w/2⌋ + w − 1] clipped to the model's layers."""
    start = layer - width // 2
    return [j for j in range(start, start + width) if 0 <= j < n_layers]


def token_kind(position: int, subject: Sequence[int], n_tokens: int) -> str:
    """ROME's token groups; the last token is "last" whatever else it is, and a one-token subject
    is "last_subject"."""
    if position == n_tokens - 1:
        return "last"
    first, last_subject = subject[0], subject[-1]
    if position < first:
        return "before_subject"
    if position == last_subject:
        return "last_subject"
    if position == first:
        return "first_subject"
    if position < last_subject:
        return "middle_subject"
    if position == last_subject + 1:
        return "first_after"
    return "further"


# ----------------------------------------------------------------------------- prompts

@dataclass
class Prompt:
    """One prompt as the model sees it. ``subject``: token positions of the subject;
    ``target_id``: the target's first token, or None until the clean top-1 fills it in."""

    prompt_id: int
    text: str
    ids: list[int]
    subject: list[int]
    target_id: int | None

    @property
    def last(self) -> int:
        return len(self.ids) - 1


def subject_positions(offsets: Sequence[tuple[int, int]], start: int, end: int) -> list[int]:
    """Tokens whose character span [s, e) overlaps [start, end); special tokens have empty spans."""
    return [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]


def target_token(tokenizer: Any, prompt: str, target: str) -> int:
    """The first token of ``target`` as it follows the prompt: tokenise prompt + " " + target and
    take the first token whose characters start after the prompt."""
    enc = tokenizer(prompt + " " + target, return_offsets_mapping=True)
    for tok, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]):
        if e > s and s >= len(prompt):
            return int(tok)
    raise ValueError(f"target {target!r} gives no token after the prompt {prompt!r}")


def prepare_prompts(tokenizer: Any, records: Sequence[dict[str, str]]) -> list[Prompt]:
    out = []
    for i, record in enumerate(records):
        text, subject = record["prompt"], record["subject"]
        start = text.find(subject)
        if start < 0:
            raise ValueError(f"subject {subject!r} does not occur in prompt {text!r}")
        enc = tokenizer(text, return_offsets_mapping=True)
        positions = subject_positions(enc["offset_mapping"], start, start + len(subject))
        if not positions:
            raise ValueError(f"subject {subject!r} covers no token of prompt {text!r}")
        target = record.get("target")
        target_id = target_token(tokenizer, text, target) if target else None
        out.append(Prompt(i, text, list(enc["input_ids"]), positions, target_id))
    return out


def read_records(prompts: str | Path | Sequence[dict[str, str]]) -> list[dict[str, str]]:
    if isinstance(prompts, (str, Path)):
        return [json.loads(line) for line in Path(prompts).read_text().splitlines() if line.strip()]
    return list(prompts)


# ----------------------------------------------------------------------------- model layouts

#: model_type -> (path of the decoder layer list, attention module name, MLP module name); written
#: here from the transformers sources, apart from moelens' own search by name.
LAYOUT = {
    "gpt2": ("transformer.h", "attn", "mlp"),
    "gptj": ("transformer.h", "attn", "mlp"),
    "gpt_neox": ("gpt_neox.layers", "attention", "mlp"),
    "phi": ("model.layers", "self_attn", "mlp"),
    "gemma": ("model.layers", "self_attn", "mlp"),
    "falcon": ("transformer.h", "self_attention", "mlp"),
    "opt": ("model.decoder.layers", "self_attn", "fc2"),
}
DEFAULT_LAYOUT = ("model.layers", "self_attn", "mlp")


def decoder_layout(model: Any) -> tuple[list[torch.nn.Module], str, str]:
    path, attn, mlp = LAYOUT.get(model.config.model_type, DEFAULT_LAYOUT)
    module = model
    for part in path.split("."):
        module = getattr(module, part)
    return list(module), attn, mlp


# ----------------------------------------------------------------------------- hooks

def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_first(output: Any, value: torch.Tensor) -> Any:
    return (value, *output[1:]) if isinstance(output, tuple) else value


def replace_positions(positions: Sequence[int], values: torch.Tensor, n_tokens: int | None = None) -> Callable:
    """Forward hook: the module's output (first element of a tuple) at ``positions`` becomes
    ``values`` ([len(positions), d], or [d] for all of them), in every row of the batch. An output
    flattened to [B·T, d] (OPT's fc2) is viewed as [B, T, d] with ``n_tokens`` = T."""
    index = torch.tensor(list(positions), dtype=torch.long)

    def hook(module: torch.nn.Module, inputs: Any, output: Any) -> Any:
        h = _first(output).clone()  # [B, T, d]
        flat = h.dim() == 2
        if flat:
            h = h.view(-1, n_tokens, h.shape[-1])
        h[:, index] = values.to(h.dtype)
        return _with_first(output, h.view(-1, h.shape[-1]) if flat else h)

    return hook


def add_at_positions(positions: Sequence[int], noise: torch.Tensor) -> Callable:
    """Forward hook on the embedding module: output[b, positions] += noise[b] ([B, n, d])."""
    index = torch.tensor(list(positions), dtype=torch.long)

    def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        h = output.clone()
        h[:, index] = h[:, index] + noise.to(h.dtype)
        return h

    return hook


def record_output(store: dict, key: Any) -> Callable:
    def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        value = output[0] if isinstance(output, tuple) else output
        store[key] = value.detach().clone()

    return hook


@contextmanager
def hooked(registrations: Sequence[tuple[torch.nn.Module, Callable]], pre_kwargs: Sequence[tuple[torch.nn.Module, Callable]] = ()) -> Iterator[None]:
    """Forward hooks (and forward pre-hooks with kwargs) for one pass, removed however it ends."""
    handles = []
    try:
        for module, fn in registrations:
            handles.append(module.register_forward_hook(fn))
        for module, fn in pre_kwargs:
            handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------- routing

def renormalises_top_k(config: Any) -> bool:
    """Whether the family divides its top-k softmax weights by their sum (its own rule)."""
    family = config.model_type
    if family == "mixtral":
        return True
    if family in ("qwen3_moe", "olmoe"):
        return bool(config.norm_topk_prob)
    raise NotImplementedError(f"no routing rule written for family {family!r}")


def route(logits: torch.Tensor, top_k: int, renormalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One token's routing from its router logits [E]: softmax in float32, the k largest
    probabilities with ties to the lower expert index (a plain sort on (−p, e)), divided by their
    sum when the family renormalises. Returns (weights [k] float32, indices [k] int64)."""
    probs = torch.softmax(logits.float(), dim=-1)
    values = [float(v) for v in probs]
    order = sorted(range(len(values)), key=lambda e: (-values[e], e))[:top_k]
    indices = torch.tensor(order, dtype=torch.long)
    weights = probs[indices]
    if renormalise:
        weights = weights / weights.sum()
    return weights, indices


def check_routing(top_k: int, renormalise: bool) -> Callable:
    """Forward hook on a router: the rule above must give the family's own output on every token
    (weights to 1e-6, the same expert set), or this reference's ``router`` cells mean something
    else than the model's routing."""
    def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        logits, weights, indices = output
        for t in range(logits.shape[0]):
            w, i = route(logits[t], top_k, renormalise)
            own = sorted(zip(indices[t].tolist(), weights[t].tolist()))
            mine = sorted(zip(i.tolist(), w.tolist()))
            assert [e for e, _ in own] == [e for e, _ in mine], (own, mine)
            assert np.allclose([x for _, x in own], [x for _, x in mine], rtol=0, atol=1e-6), (own, mine)

    return hook


def replace_last_router_logits(value: torch.Tensor, top_k: int, renormalise: bool) -> Callable:
    """Forward hook on a router returning (logits [N, E], weights [N, k], indices [N, k]) for the
    N = T tokens of a batch of one: the last token's logits become ``value`` and its weights and
    indices are recomputed from them."""
    def hook(module: torch.nn.Module, inputs: Any, output: Any) -> Any:
        logits, weights, indices = (x.clone() for x in output)
        last = logits.shape[0] - 1
        w, i = route(value, top_k, renormalise)
        logits[last] = value.to(logits.dtype)
        weights[last] = w.to(weights.dtype)
        indices[last] = i.to(indices.dtype)
        return logits, weights, indices

    return hook


# ----------------------------------------------------------------------------- attention blocking

def blocking_mask(n_tokens: int, blocked: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [1, 1, T, T]: 0 where query i may see key j (j ≤ i), the dtype's minimum
    elsewhere, and the minimum at (last query, each blocked key)."""
    lowest = torch.finfo(dtype).min
    mask = torch.full((n_tokens, n_tokens), lowest, dtype=dtype)
    for i in range(n_tokens):
        for j in range(i + 1):
            mask[i, j] = 0.0
    for j in blocked:
        mask[n_tokens - 1, j] = lowest
    if bool((mask[n_tokens - 1] == lowest).all()):
        raise ValueError("blocking every key of the last position leaves it nothing to attend to")
    return mask[None, None]


def use_mask(mask: torch.Tensor) -> Callable:
    """Forward pre-hook (with kwargs) on ``self_attn``: attend under ``mask`` instead."""
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        assert "attention_mask" in kwargs, "the decoder layer no longer passes attention_mask by name"
        return args, {**kwargs, "attention_mask": mask}

    return hook


# ----------------------------------------------------------------------------- the reference

@dataclass
class Clean:
    """A prompt's clean pass: p [V] float64 and the float32 site values per layer:
    hidden/attn/mlp [T, d], router [T, E] (MoE layers only)."""

    p: np.ndarray
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    attn: dict[int, torch.Tensor] = field(default_factory=dict)
    mlp: dict[int, torch.Tensor] = field(default_factory=dict)
    router: dict[int, torch.Tensor] = field(default_factory=dict)


class Reference:
    """The one-cell-at-a-time loop over a model held in memory (float32, eager attention)."""

    def __init__(self, model: Any, tokenizer: Any, records: Sequence[dict[str, str]], seed: int = 0,
                 noise_std: float | None = None, shared_noise: bool = False):
        self.model = model.eval()
        self.config = model.config
        self.tokenizer = tokenizer
        self.seed = seed
        self.noise_std = noise_std  # None: 3 × the std of the embedding matrix
        self.shared_noise = shared_noise  # ROME: one draw (seed alone) for every prompt
        self.layers, self._attn_name, self._mlp_name = decoder_layout(model)
        self.prompts = prepare_prompts(tokenizer, records)
        self.clean: dict[int, Clean] = {}
        for prompt in self.prompts:
            self.clean[prompt.prompt_id] = self._clean_pass(prompt)
            if prompt.target_id is None:
                # ties go to the lower token id (np.argmax's first maximum)
                prompt.target_id = int(np.argmax(self.clean[prompt.prompt_id].p))

    # -- model structure
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def attn(self, layer: int) -> torch.nn.Module:
        return getattr(self.layers[layer], self._attn_name)

    def mlp(self, layer: int) -> torch.nn.Module:
        return getattr(self.layers[layer], self._mlp_name)

    def is_moe(self, layer: int) -> bool:
        mlp = self.mlp(layer)
        return hasattr(mlp, "gate") and hasattr(mlp, "experts")

    def router(self, layer: int) -> torch.nn.Module:
        return self.mlp(layer).gate

    @property
    def top_k(self) -> int:
        return int(self.config.num_experts_per_tok)

    # -- passes
    @torch.no_grad()
    def _last_logits(self, ids: list[int], batch: int = 1) -> torch.Tensor:
        input_ids = torch.tensor([ids] * batch, dtype=torch.long)
        return self.model(input_ids=input_ids).logits[:, -1].float()  # [B, V]

    def _clean_pass(self, prompt: Prompt) -> Clean:
        store: dict = {}
        hooks = []
        for j, layer in enumerate(self.layers):
            hooks += [(layer, record_output(store, ("hidden", j))), (self.attn(j), record_output(store, ("attn", j))),
                      (self.mlp(j), record_output(store, ("mlp", j)))]
            if self.is_moe(j):
                hooks += [(self.router(j), record_output(store, ("router", j))),
                          (self.router(j), check_routing(self.top_k, renormalises_top_k(self.config)))]
        with hooked(hooks):
            logits = self._last_logits(prompt.ids)
        clean = Clean(softmax64(logits[0]))
        for (kind, j), value in store.items():
            # decoder/attn/mlp outputs are [1, T, d]; router logits are [T, E]
            getattr(clean, kind)[j] = value if kind == "router" else (value[0] if value.dim() == 3 else value.view(len(prompt.ids), -1))
        return clean

    def _row(self, prompt: Prompt, layer: int, site: str, mode: str, p: np.ndarray, position: int = -1,
             p_corrupt: np.ndarray | None = None) -> dict[str, Any]:
        clean = self.clean[prompt.prompt_id].p
        t = prompt.target_id
        row = {
            "prompt_id": prompt.prompt_id, "layer": layer, "site": site, "mode": mode, "position": position,
            "token_kind": token_kind(position, prompt.subject, len(prompt.ids)) if position >= 0 else "",
            "jsd": js_divergence_bits(clean, p), "target_id": t, "p_target_clean": float(clean[t]),
            "p_target": float(p[t]), "p_target_corrupt": float("nan"), "indirect_effect": float("nan"),
        }
        if p_corrupt is not None:
            row["p_target_corrupt"] = float(p_corrupt[t])
            row["indirect_effect"] = float(p[t]) - float(p_corrupt[t])
        return row

    # -- knockout
    def mean_values(self) -> dict[tuple[str, int], torch.Tensor]:
        """Mean of each site over the prompt set (float64 sums, float32 result): ``subj`` over
        every subject token of every prompt, the other sites over the last token of every prompt."""
        out = {}
        for j in range(self.n_layers):
            subj = [self.clean[p.prompt_id].hidden[j][t].double() for p in self.prompts for t in p.subject]
            out[("subj", j)] = torch.stack(subj).mean(0).float()
            for site, kind in (("last", "hidden"), ("attn", "attn"), ("moe", "mlp"), ("router", "router")):
                if site == "router" and not self.is_moe(j):  # a dense MLP is site moe too
                    continue
                vals = [getattr(self.clean[p.prompt_id], kind)[j][p.last].double() for p in self.prompts]
                out[(site, j)] = torch.stack(vals).mean(0).float()
        return out

    def site_value(self, site: str, layer: int, ablation: str, means: dict | None = None) -> torch.Tensor:
        if ablation == "mean":
            return means[(site, layer)]
        if ablation == "zero":
            if site == "router":
                return torch.zeros(self.router(layer).weight.shape[0])  # [E]
            return torch.zeros(self.config.hidden_size)
        raise ValueError(f"unknown ablation {ablation!r}")

    def knockout_distribution(self, prompt: Prompt, layer: int, site: str, value: torch.Tensor) -> np.ndarray:
        """p at the last position with ``site`` of ``layer`` replaced by ``value`` ([d] or [E];
        [n_subject, d] also accepted for ``subj``)."""
        block = self.layers[layer]
        if site == "subj":
            hook = (block, replace_positions(prompt.subject, value))
        elif site == "last":
            hook = (block, replace_positions([prompt.last], value))
        elif site == "attn":
            hook = (self.attn(layer), replace_positions([prompt.last], value))
        elif site == "moe":
            hook = (self.mlp(layer), replace_positions([prompt.last], value, len(prompt.ids)))
        elif site == "router":
            hook = (self.router(layer), replace_last_router_logits(value, self.top_k, renormalises_top_k(self.config)))
        else:
            raise ValueError(f"unknown knockout site {site!r}")
        with hooked([hook]):
            return softmax64(self._last_logits(prompt.ids)[0])

    def knockout(self, sites: Sequence[str], ablation: str = "mean", layers: Sequence[int] | None = None) -> pd.DataFrame:
        means = self.mean_values() if ablation == "mean" else None
        rows = []
        for prompt in self.prompts:
            for layer in (layers if layers is not None else range(self.n_layers)):
                for site in sites:
                    if site == "router" and not self.is_moe(layer):
                        continue
                    value = self.site_value(site, layer, ablation, means)
                    p = self.knockout_distribution(prompt, layer, site, value)
                    rows.append(self._row(prompt, layer, site, "knockout", p))
        return frame(rows)

    # -- restore
    def embedding_std(self) -> float:
        """Std of all entries of the input embedding matrix, taken as the whole population (ddof 0,
        the house's std everywhere; on a 26 × 32 test embedding the Bessel-corrected std is 6e-4
        larger, which moves restore cells by ~7e-5, beyond the 1e-5 tolerance)."""
        return float(self.model.get_input_embeddings().weight.detach().double().std(correction=0))

    def noise(self, prompt: Prompt) -> torch.Tensor:
        """[10, n_subject, d] float32: one draw from a CPU generator seeded with seed + prompt_id
        (with ``shared_noise``: seed), times ``noise_std`` (default 3 × the embedding std)."""
        g = torch.Generator().manual_seed(self.seed if self.shared_noise else self.seed + prompt.prompt_id)
        d = self.config.hidden_size
        std = NOISE_SCALE * self.embedding_std() if self.noise_std is None else self.noise_std
        return torch.randn(NOISE_SAMPLES, len(prompt.subject), d, generator=g) * std

    def corrupted_distribution(self, prompt: Prompt, restore: Sequence[tuple[torch.nn.Module, Callable]] = ()) -> np.ndarray:
        """Mean over the 10 noise samples of p at the last position (one batch, the samples as
        its rows), with the restore hooks ``restore`` in place."""
        embed = (self.model.get_input_embeddings(), add_at_positions(prompt.subject, self.noise(prompt)))
        with hooked([embed, *restore]):
            logits = self._last_logits(prompt.ids, batch=NOISE_SAMPLES)
        return softmax64(logits).mean(axis=0)

    def restore_hooks(self, prompt: Prompt, layer: int, site: str, position: int, width: int) -> list:
        clean = self.clean[prompt.prompt_id]
        if site == "restore_hidden":
            return [(self.layers[layer], replace_positions([position], clean.hidden[layer][position]))]
        if site == "restore_mlp":
            return [(self.mlp(j), replace_positions([position], clean.mlp[j][position], len(prompt.ids)))
                    for j in window_layers(layer, width, self.n_layers)]
        if site == "restore_attn":
            return [(self.attn(j), replace_positions([position], clean.attn[j][position]))
                    for j in window_layers(layer, width, self.n_layers)]
        raise ValueError(f"unknown restore site {site!r}")

    def restore(self, sites: Sequence[str] = RESTORE_SITES, layers: Sequence[int] | None = None, window: int | None = None) -> pd.DataFrame:
        width = RESTORE_WINDOW if window is None else window
        rows = []
        for prompt in self.prompts:
            p_corrupt = self.corrupted_distribution(prompt)
            for layer in (layers if layers is not None else range(self.n_layers)):
                for site in sites:
                    for position in range(len(prompt.ids)):
                        p = self.corrupted_distribution(prompt, self.restore_hooks(prompt, layer, site, position, width))
                        rows.append(self._row(prompt, layer, site, "restore", p, position, p_corrupt))
        return frame(rows)

    # -- block
    def blocked_positions(self, prompt: Prompt, site: str) -> list[int]:
        if site == "block_subj":
            return list(prompt.subject)
        if site == "block_nonsubj":
            return [t for t in range(prompt.last) if t not in prompt.subject]
        if site == "block_last":
            return [prompt.last]
        raise ValueError(f"unknown block site {site!r}")

    def blocked_distribution(self, prompt: Prompt, layers: Sequence[int], blocked: Sequence[int]) -> np.ndarray:
        mask = blocking_mask(len(prompt.ids), blocked, torch.float32)
        with hooked([], pre_kwargs=[(self.attn(j), use_mask(mask)) for j in layers]):
            return softmax64(self._last_logits(prompt.ids)[0])

    def block(self, sites: Sequence[str] = BLOCK_SITES, layers: Sequence[int] | None = None, window: int | None = None) -> pd.DataFrame:
        width = BLOCK_WINDOW if window is None else window
        rows = []
        for prompt in self.prompts:
            for layer in (layers if layers is not None else range(self.n_layers)):
                for site in sites:
                    p = self.blocked_distribution(prompt, window_layers(layer, width, self.n_layers), self.blocked_positions(prompt, site))
                    rows.append(self._row(prompt, layer, site, "block", p))
        return frame(rows)

    def table(self, mode: str = "knockout", sites: Sequence[str] | None = None, ablation: str = "mean",
              layers: Sequence[int] | None = None, window: int | None = None) -> pd.DataFrame:
        """The ``interventions`` table of one mode, sites defaulting as the schema says."""
        if mode == "knockout":
            if sites is None:
                sites = KNOCKOUT_SITES + (MOE_SITES if any(self.is_moe(j) for j in range(self.n_layers)) else ())
            return self.knockout(sites, ablation, layers)
        if mode == "restore":
            return self.restore(sites or RESTORE_SITES, layers, window)
        if mode == "block":
            return self.block(sites or BLOCK_SITES, layers, window)
        raise ValueError(f"unknown mode {mode!r}")


def frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    return df.sort_values(["prompt_id", "layer", "site", "position"], kind="stable").reset_index(drop=True)


def load_reference(model_path: str | Path, prompts: str | Path | Sequence[dict[str, str]], seed: int = 0,
                   noise_std: float | None = None, shared_noise: bool = False) -> Reference:
    """Load a checkpoint (float32, eager attention, CPU) and its tokenizer, and run the clean passes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32, attn_implementation="eager", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
    return Reference(model, tokenizer, read_records(prompts), seed=seed, noise_std=noise_std, shared_noise=shared_noise)


def reference_table(model_path: str | Path, prompts: str | Path | Sequence[dict[str, str]], mode: str = "knockout",
                    sites: Sequence[str] | None = None, ablation: str = "mean", layers: Sequence[int] | None = None,
                    window: int | None = None, seed: int = 0) -> pd.DataFrame:
    """``moelens.trace(...)["interventions"]`` as this reference computes it."""
    return load_reference(model_path, prompts, seed).table(mode, sites, ablation, layers, window)
