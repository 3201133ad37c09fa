"""What a checkpoint read gives back: a layer's router and one expert's matrices, in torch
``Linear`` orientation [out, in]. The bottom of :mod:`moelens.checkpoint`: the family adapters
build these, and :mod:`moelens.checkpoint.model` hands them out, so neither imports the other
for them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from moelens.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where tensors are made, not when a family is listed
    import torch

ROLES = ("gate", "up", "down")


@dataclass(frozen=True)
class RouterWeights:
    """A layer's router. ``weight`` [E, d]; ``bias`` [E] is added to the logits (GPT-OSS);
    ``score_correction_bias`` [E] is added to the scores for top-k selection only
    (DeepSeek-V3, GLM4-MoE, Ernie4.5, MiniMax-M2)."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    score_correction_bias: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class ExpertWeights:
    """One expert's FFN, [out, in]: gate, up [F, d]; down [d, F]. Biases, where the family has
    them, are [F], [F], [d]. ``gate`` is None for a family without a gated FFN."""

    gate: Optional[torch.Tensor]
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: Optional[torch.Tensor] = None
    up_bias: Optional[torch.Tensor] = None
    down_bias: Optional[torch.Tensor] = None

    def matrix(self, role: str) -> torch.Tensor:
        check_role(role)
        m = getattr(self, role)
        if m is None:
            raise ConfigError(f"this expert has no {role!r} matrix (its FFN is not gated); use 'up' or 'down'")
        return m


def check_role(role: str) -> None:
    if role not in ROLES:
        raise ConfigError(f"unknown matrix role {role!r}; expected one of {', '.join(ROLES)}")


__all__ = ["ROLES", "ExpertWeights", "RouterWeights", "check_role"]
