"""Each family's expert nonlinearity, so that every expert can be run from its weights alone.

An expert computes f(x) = W_down h(x) + b_down with h(x) = act(W_gate x + b_gate) ⊙ (W_up x + b_up)
(SwiGLU when act = SiLU). The checkpoint reader gives W_gate, W_up, W_down (and biases) in one
orientation for every family; what differs is ``act`` and, for GPT-OSS, the gate itself:

| family | h(g, u) with g = W_gate x + b_gate, u = W_up x + b_up |
|---|---|
| GPT-OSS | clamp(g, max=ℓ) · σ(α · clamp(g, max=ℓ)) · (clamp(u, −ℓ, ℓ) + 1), α = ``swiglu_alpha`` (1.702), ℓ = ``swiglu_limit`` (7.0) |
| DBRX | act(g) · u, act = ``ffn_config.ffn_act_fn.name`` (silu) |
| JetMoE | act(g) · u, act = ``activation_function`` (silu) |
| every other family | act(g) · u, act = ``hidden_act`` (silu) |
| no gate matrix | act(u) |

``act`` is transformers' own ``ACT2FN`` entry, so "silu", "gelu", … mean exactly what they mean
in the modelling code. The tests check h against each family's transformers experts module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from moelens.errors import ConfigError


@dataclass(frozen=True)
class ExpertActivation:
    """h(g, u) of one family: ``name`` says which (recorded in the manifest)."""

    name: str
    act: Callable[[torch.Tensor], torch.Tensor]
    clamp_limit: Optional[float] = None
    alpha: Optional[float] = None

    def __call__(self, gate: Optional[torch.Tensor], up: torch.Tensor) -> torch.Tensor:
        if gate is None:
            return self.act(up)
        if self.clamp_limit is not None:  # GPT-OSS's clamped SwiGLU
            g = gate.clamp(max=self.clamp_limit)
            u = up.clamp(min=-self.clamp_limit, max=self.clamp_limit)
            return g * torch.sigmoid(g * self.alpha) * (u + 1)
        return self.act(gate) * up


def _act(name: str, family: str) -> Callable[[torch.Tensor], torch.Tensor]:
    from transformers.activations import ACT2FN

    try:
        return ACT2FN[name]
    except KeyError:
        raise ConfigError(f"the {family} config names activation {name!r}, which transformers does not know") from None


def expert_activation(family: str, config: dict[str, Any]) -> ExpertActivation:
    """The nonlinearity h(g, u) of ``family``'s routed experts, read from its ``config.json``."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    if family == "gpt_oss":
        alpha = float(text.get("swiglu_alpha", 1.702))
        limit = float(text.get("swiglu_limit", 7.0))
        return ExpertActivation(f"gpt-oss clamped swiglu (alpha={alpha:g}, limit={limit:g})", _act("sigmoid", family), limit, alpha)
    if family == "dbrx":
        ffn = text.get("ffn_config") or {}
        name = ((ffn.get("ffn_act_fn") or {}).get("name")) or "silu"
    elif family == "jetmoe":
        name = text.get("activation_function") or "silu"
    else:
        name = text.get("hidden_act") or "silu"
    return ExpertActivation(f"{name} glu", _act(str(name), family))


__all__ = ["ExpertActivation", "expert_activation"]
