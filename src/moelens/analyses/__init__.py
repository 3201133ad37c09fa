"""Analyses: each a sub-package with a frozen config in and tidy tables (a :class:`~moelens.results.Run`) out.

Every analysis has the shape of :class:`~moelens.analyses.base.Analysis` and runs through
:func:`~moelens.analyses.runner.run_analysis`; :data:`ANALYSES` lists them by name.

Names are imported on first use (PEP 562, :mod:`moelens.lazy`): a config (``<analysis>/config.py``,
torch-free) costs neither torch nor pandas, and the command line derives its options from the
configs without importing the analyses. Each analysis's sub-package is lazy the same way, its
names derived from its declaration (:meth:`~moelens.analyses.declaration.Declaration.exports`).
"""

from types import ModuleType

from moelens.lazy import lazy_package

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("Analysis", "Plan", "Unit", "UnitContext"), "moelens.analyses.base"),
    "option": "moelens.analyses.fields",
    **dict.fromkeys(("Command", "CommandFlag", "Declaration", "FigureSpec", "ModelInput"), "moelens.analyses.declaration"),
    **dict.fromkeys(("ANALYSES", "declarations", "get_analysis"), "moelens.analyses.registry"),
    "run_analysis": "moelens.analyses.runner",
    "Calibration": "moelens.analyses.calibration.analysis",
    "load_calibration": "moelens.analyses.calibration.analysis",
    "Clustering": "moelens.analyses.clustering.analysis",
    "MergeCost": "moelens.analyses.clustering.merge_cost",
    "merge_clusters": "moelens.analyses.clustering.merging",
    "ExpertDistance": "moelens.analyses.expert_distance.analysis",
    "Interventions": "moelens.analyses.interventions.analysis",
    "ModuleMetrics": "moelens.analyses.module_metrics.analysis",
    **dict.fromkeys(("RouterAlignment", "default_ks"), "moelens.analyses.router_alignment.analysis"),
    "RouterEdits": "moelens.analyses.router_edits.analysis",
}


def _declared() -> dict[str, str]:
    """Every registered analysis's function (``router_alignment``, ``trace``) and config class."""
    from moelens.analyses.registry import declarations

    names: dict[str, str] = {}
    for d in declarations().values():
        module, _, config = d.config.partition(":")
        names[d.function] = "moelens.analyses.api"
        names[config] = module
    return names


_EXPORTS.update(_declared())
__getattr__, __dir__ = lazy_package(__name__, _EXPORTS)
# Reading the declarations imported each analysis's sub-package, which bound it here as an
# attribute before the package became lazy; an exported name is the function, not the sub-package.
for _name in [n for n in _EXPORTS if isinstance(globals().get(n), ModuleType)]:
    del globals()[_name]

__all__ = sorted(_EXPORTS)
