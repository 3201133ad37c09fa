"""Jinja2 rendering of the report templates (in ``report/templates/``), autoescaped."""

from __future__ import annotations

from functools import lru_cache

from jinja2 import Environment, PackageLoader, StrictUndefined

#: Figure function → heading of its explanation (figure captions point back to it).
EXPLANATION_TITLES = {
    "comparison_panels": "Comparison plots",
    "cos_squared_per_expert": "cos²θ expert comparison",
    "shuffle_statistics": "Shuffle statistics",
    "z_decomposition": "z-score decomposition",
    "null_distribution": "Distribution comparison",
    "layer_permutation_test": "Layer permutation test",
    "per_expert_breakdown": "Per-expert breakdown",
    "complete_analysis": "Complete analysis",
    "layer_k_heatmap": "Layers × k heat maps",
    "expert_distance": "Expert distance per layer",
    "expert_distance_heatmap": "Experts × experts heat maps",
    "module_heatmap": "Layer × module heat maps",
    "module_lines": "Module lines",
    "trace_heatmap": "Intervention heat maps",
    "trace_knockout": "Knockout heat maps",
    "trace_restore": "Restoration heat maps",
    "trace_indirect_effect": "Indirect effect (causal tracing)",
    "route_routed_share": "Routed share after the edit",
    "route_jsd_heatmap": "JSD of project_out by layer and k",
    "route_migration": "Transplant migration matrix",
    "cluster_map": "Cluster map",
    "cluster_usage": "Usage by cluster",
    "expert_usage": "Expert usage frequency",
}


@lru_cache(maxsize=1)
def environment() -> Environment:
    """Every value is HTML-escaped (labels and titles are user text); a missing variable is an error."""
    env = Environment(
        loader=PackageLoader("moelens.report", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["explain_title"] = EXPLANATION_TITLES.__getitem__
    return env


def render(template: str, **context: object) -> str:
    return environment().get_template(template).render(**context)
