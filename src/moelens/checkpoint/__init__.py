"""Read every MoE checkpoint family as one view: ``MoEModel -> MoELayer -> ExpertWeights``."""

from moelens.checkpoint.model import ROLES, ExpertWeights, MoELayer, MoEModel, RouterWeights
from moelens.checkpoint.open import open_model
from moelens.checkpoint.registry import families, supported_architectures

__all__ = [
    "ROLES", "ExpertWeights", "MoELayer", "MoEModel", "RouterWeights", "open_model", "families",
    "supported_architectures",
]
