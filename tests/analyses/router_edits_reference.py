"""An independent computation of the router-edits table, one cell and one prompt at a time.

For every cell a copy of the model has row e of layer ℓ's router weight overwritten by hand (the
edit written out here from a float64 SVD of the expert's matrix read from the transformers model's
own fused experts); each prompt runs alone, unpadded, through plain transformers; a forward
pre-hook records the router's input x at layer ℓ and the top-k set is recomputed from
x · Wᵀ (top-k of the logits, ties to the lower index: the softmax families' rule). JSD and KL are
computed in float64 numpy. Nothing of moelens' runtime is used; the random subspaces come from the
analysis's seeded draw, which defines them.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from moelens.analyses.router_edits.analysis import random_basis


def expert_matrix(model: Any, layer: int, expert: int, role: str) -> torch.Tensor:
    """X [F, d] float64 of one expert (transformers 5 fused layout: gate_up_proj [E, 2F, d], gate first)."""
    experts = model.model.layers[layer].mlp.experts
    gate_up = experts.gate_up_proj[expert].detach().double()
    f = gate_up.shape[0] // 2
    if role == "gate":
        return gate_up[:f]
    if role == "up":
        return gate_up[f:]
    return experts.down_proj[expert].detach().double().T


def new_row(model: Any, layer: int, expert: int, edit: str, k: int, sample: int, partner: int, role: str, seed: int) -> tuple[torch.Tensor, float]:
    w = model.model.layers[layer].mlp.gate.weight.detach().double()
    r = w[expert]
    if edit == "zero":
        return torch.zeros_like(r), float(r.norm())
    if edit == "transplant":
        return w[partner].clone(), float((r - w[partner]).norm())
    _, _, vh = torch.linalg.svd(expert_matrix(model, layer, expert, role), full_matrices=False)
    v = vh[:k].T
    pr = v @ (v.T @ r)
    if edit == "project_out":
        return r - pr, float(pr.norm())
    if edit == "keep_aligned":
        return pr, float((r - pr).norm())
    u = random_basis(r.shape[0], k, seed, layer, expert, sample)
    ur = u @ (u.T @ r)
    c = float(pr.norm()) / float(ur.norm())
    return r - c * ur, float((c * ur).norm())


def _softmax64(logits: torch.Tensor) -> np.ndarray:
    x = logits.double().numpy()
    x = x - x.max()
    e = np.exp(x)
    return e / e.sum()


def _jsd_kl(p: np.ndarray, q: np.ndarray) -> tuple[float, float]:
    m = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / b[nz])))

    return 0.5 * kl(p, m) + 0.5 * kl(q, m), kl(p, q)


def _stable_topk(input: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True, **_: Any) -> Any:
    values, indices = torch.sort(input, dim=dim, descending=largest, stable=True)
    return torch.return_types.topk((values.narrow(dim, 0, k), indices.narrow(dim, 0, k)))


def run_one(model: Any, ids: Sequence[int], layer: int, top_k: int) -> tuple[np.ndarray, torch.Tensor]:
    """(next-token distribution at the last position, top-k sets [T, k] at ``layer`` recomputed
    from the hooked router input)."""
    seen: dict[str, torch.Tensor] = {}
    gate = model.model.layers[layer].mlp.gate

    def hook(module, args):
        seen["x"] = args[0].detach().reshape(-1, args[0].shape[-1])

    h = gate.register_forward_pre_hook(hook)
    # a transplant makes two logits equal: the model's own top-k must break the tie to the lower
    # index too (torch.topk's choice among equal values is unspecified)
    saved = torch.topk, torch.Tensor.topk
    torch.topk = torch.Tensor.topk = _stable_topk
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([list(ids)]), use_cache=False)
    finally:
        torch.topk, torch.Tensor.topk = saved
        h.remove()
    logits = F.linear(seen["x"].float(), gate.weight.float())
    top = torch.sort(-logits, dim=-1, stable=True).indices[:, :top_k]
    return _softmax64(out.logits[0, -1]), top


def reference_table(model: Any, prompts: Sequence[Sequence[int]], layer: int, experts: Sequence[int], ks: Sequence[int],
                    samples: int, pairs: Sequence[tuple[int, int]], top_k: int, role: str = "gate", seed: int = 0) -> list[dict]:
    clean = [run_one(model, p, layer, top_k) for p in prompts]
    n_pos = sum(len(p) for p in prompts)
    cells = []
    for e in experts:
        for k in ks:
            cells += [(e, "project_out", k, 0, -1), (e, "keep_aligned", k, 0, -1)]
            cells += [(e, "random", k, s, -1) for s in range(samples)]
        cells.append((e, "zero", 0, 0, -1))
    cells += [(e, "transplant", 0, 0, p) for e, p in pairs]
    rows = []
    for e, edit, k, sample, partner in cells:
        row, removed = new_row(model, layer, e, edit, k, sample, partner, role, seed)
        edited = copy.deepcopy(model)
        with torch.no_grad():
            edited.model.layers[layer].mlp.gate.weight[e] = row.float()
        before = after = changed = 0
        jsd = kl = 0.0
        for ids, (p_clean, top_clean) in zip(prompts, clean):
            q, top = run_one(edited, ids, layer, top_k)
            before += int((top_clean == e).sum())
            after += int((top == e).sum())
            changed += int((top.sort(-1).values != top_clean.sort(-1).values).any(-1).sum())
            j, d = _jsd_kl(p_clean, q)
            jsd += j
            kl += d
        rows.append({"layer": layer, "expert": e, "partner": partner, "edit": edit, "k": k, "sample": sample,
                     "removed_norm": removed, "routed_before": before / (n_pos * top_k), "routed_after": after / (n_pos * top_k),
                     "topk_changed": changed / n_pos, "jsd": jsd / len(prompts), "kl": kl / len(prompts)})
        assert math.isfinite(jsd)
    return rows
