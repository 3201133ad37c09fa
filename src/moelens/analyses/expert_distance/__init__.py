"""Expert distance per layer (docs/methods.md §2, seeds 000 and 001): rel_l2 and sv_align of pairs of experts."""

from moelens.analyses.expert_distance.analysis import (
    ANALYSIS,
    PAIRINGS,
    ExpertDistance,
    ExpertDistanceConfig,
    expert_distance,
)

__all__ = ["ANALYSIS", "PAIRINGS", "ExpertDistance", "ExpertDistanceConfig", "expert_distance"]
