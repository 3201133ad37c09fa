"""Tiny checkpoints with more experts than the families' own tiny configs, and a plain-loop
reference merge (costs by loops, averages by loops, float64)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from moelens.checkpoint.weights import ExpertWeights
from moelens.merge.families import LAYOUTS


def build_checkpoint(family: str, out: Path, n_experts: int = 8, seed: int = 0, edit: Optional[Callable[[Any], None]] = None,
                     **overrides: Any) -> Path:
    """A family's tiny config with ``n_experts`` routed experts (and ``overrides``), random
    weights (every parameter perturbed, as in moelens.testing.tiny), optionally ``edit``-ed in
    place, saved in the published per-expert layout."""
    from transformers import AutoModelForCausalLM

    from moelens.checkpoint.registry import families

    config = families()[family].tiny_config()
    setattr(config, LAYOUTS[family].experts_key, n_experts)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        if edit is not None:
            edit(model)
    model.save_pretrained(out)
    return out


def moe_blocks(model: Any, family: str) -> dict[int, Any]:
    """{layer: MoE block} of a transformers model in memory."""
    layout = LAYOUTS[family]
    out = {}
    for i, layer in enumerate(model.model.layers):
        block = getattr(layer, layout.block, None)
        if getattr(getattr(block, "experts", None), "gate_up_proj", None) is not None:
            out[i] = block
    return out


def logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def loop_permutation(anchor: ExpertWeights, member: ExpertWeights) -> np.ndarray:
    """perm from docs/methods.md §3's cost computed by plain loops, solved by SciPy."""
    mats = [(getattr(anchor, r).double().numpy(), getattr(member, r).double().numpy()) for r in ("gate", "up")]
    da, db = anchor.down.double().numpy(), member.down.double().numpy()
    f = da.shape[1]
    cost = np.zeros((f, f))
    for p in range(f):  # one anchor neuron at a time, against every member neuron: plain differences
        cost[p] = sum(((a[p][None, :] - b) ** 2).sum(1) for a, b in mats) + ((da[:, p][:, None] - db) ** 2).sum(0)
    rows, cols = linear_sum_assignment(cost)
    return cols[np.argsort(rows)]


def loop_merge(experts: list[ExpertWeights], members: list[int], usage: list[float], anchor: int, permute: bool) -> dict[str, np.ndarray]:
    """The merged gate, up, down of one cluster by loops in float64."""
    total = sum(usage[m] for m in members)
    weights = {m: (usage[m] / total if total > 0 else 1.0 / len(members)) for m in members}
    out = {}
    for role in ("gate", "up", "down"):
        acc = None
        for m in members:
            perm = loop_permutation(experts[anchor], experts[m]) if permute and m != anchor else np.arange(experts[m].up.shape[0])
            w = getattr(experts[m], role).double().numpy()
            w = w[:, perm] if role == "down" else w[perm]
            acc = weights[m] * w if acc is None else acc + weights[m] * w
        out[role] = acc
    return out
