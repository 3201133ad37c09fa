"""Calibration pass (docs/methods.md §3): routing, usage and expert features of every MoE layer.

Names are imported on first use (PEP 562, :mod:`moelens.lazy`): the configs (torch-free) without
the analyses that compute with them."""

from moelens.lazy import lazy_package

_EXPORTS: dict[str, str] = {
    "CalibrationConfig": "moelens.analyses.calibration.config",
    **dict.fromkeys(("ANALYSIS", "Calibration", "CalibrationRun", "calibrate", "load_calibration"), "moelens.analyses.calibration.analysis"),
}

__getattr__, __dir__ = lazy_package(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
