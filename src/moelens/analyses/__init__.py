"""One module per analysis: a frozen config dataclass in, tidy tables (a :class:`~moelens.results.Run`) out."""

from moelens.analyses.router_alignment import RouterAlignmentConfig, default_ks, router_alignment

__all__ = ["RouterAlignmentConfig", "default_ks", "router_alignment"]
