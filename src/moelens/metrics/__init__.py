"""Pair and single-matrix measures as plain functions of tensors.

Expert distance (docs/methods.md §2): relative L2 and singular-vector alignment of pairs of experts, one
matrix role at a time, each expert decomposed once per role.

>>> from moelens.metrics import role_distances, expert_distances, within_pairs, same_index_pairs
>>> pairs = same_index_pairs(8)                                   # base→tuned: e with e
>>> per_role = {r: role_distances(base.expert_stack(r), tuned.expert_stack(r), pairs)
...             for r in ("gate", "up", "down")}
>>> row = expert_distances(per_role, pool="mean")                 # matrix = "expert"
>>> row.rel_l2, row.sv_align, row.n_sv                            # [P] each
"""

from moelens.metrics.expert_distance import (
    POOLS,
    RoleDistances,
    check_options,
    expert_distances,
    rel_l2_from,
    role_distances,
    sv_align_from,
)
from moelens.metrics.jsd import js_divergence
from moelens.metrics.module import (
    PAIR_METRICS,
    SINGLE_METRICS,
    PairAndSingleMetrics,
    Spectra,
    check_metric_names,
    metrics_from_spectra,
    pair_and_single_metrics,
    pair_metrics,
    single_metrics,
    spectra,
)
from moelens.metrics.pairs import check_pairs, same_index_pairs, within_pairs
from moelens.metrics.power_law import PowerLawFit, power_law_alpha, power_law_fit

__all__ = [
    "PAIR_METRICS", "SINGLE_METRICS", "PairAndSingleMetrics", "Spectra", "check_metric_names", "metrics_from_spectra",
    "pair_and_single_metrics", "pair_metrics", "single_metrics", "spectra", "PowerLawFit", "power_law_alpha", "power_law_fit",
    "POOLS", "RoleDistances", "check_options", "check_pairs", "expert_distances", "rel_l2_from",
    "role_distances", "same_index_pairs", "sv_align_from", "within_pairs", "js_divergence",
]
