"""The calibration pass's parts: calibration text, the early-stopped forward pass that records one
MoE layer's routing, every expert run on every token (HC-SMoE's features), and the per-layer
matrices of a run. The analysis that assembles them is :mod:`moelens.analyses.calibration`.
"""

from moelens.calibration.activation import ExpertActivation, expert_activation
from moelens.calibration.capture import LayerCapture, Routing
from moelens.calibration.features import ExpertFeatures
from moelens.calibration.layer import CalibrationSetup, LayerCalibration, calibrate_layer, usage_counts
from moelens.calibration.store import MatrixStore
from moelens.calibration.texts import CalibrationLines, CalibrationTokens, read_lines, tokenise

__all__ = [
    "CalibrationLines", "CalibrationSetup", "CalibrationTokens", "ExpertActivation", "ExpertFeatures", "LayerCalibration",
    "LayerCapture", "MatrixStore", "Routing", "calibrate_layer", "expert_activation", "read_lines", "tokenise", "usage_counts",
]
