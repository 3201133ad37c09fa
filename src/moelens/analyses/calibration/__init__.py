"""Calibration pass (docs/methods.md §3): routing, usage and expert features of every MoE layer."""

from moelens.analyses.calibration.analysis import (
    ANALYSIS,
    Calibration,
    CalibrationConfig,
    CalibrationRun,
    calibrate,
    load_calibration,
)

__all__ = ["ANALYSIS", "Calibration", "CalibrationConfig", "CalibrationRun", "calibrate", "load_calibration"]
