"""Expert distance per layer (docs/methods.md §2, seeds 000 and 001): rel_l2 and sv_align of pairs of experts.

Names are imported on first use (PEP 562, :mod:`moelens.lazy`): the configs (torch-free) without
the analyses that compute with them."""

from moelens.lazy import lazy_package

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("PAIRINGS", "ExpertDistanceConfig"), "moelens.analyses.expert_distance.config"),
    **dict.fromkeys(("ANALYSIS", "ExpertDistance", "expert_distance"), "moelens.analyses.expert_distance.analysis"),
}

__getattr__, __dir__ = lazy_package(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
