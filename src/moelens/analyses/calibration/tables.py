"""Tables of a calibration (also written by a clustering run that calibrates itself).

- ``calibration_usage``: one row per (layer, expert): ``count`` of top-k selections, ``frequency``
  f_e = count / (N·k) (Σ_e f_e = 1 in a layer), ``feature_norm`` ‖feature_e‖ (the L2 norm of the
  expert's mean output, HC-SMoE's feature), ``logit_mean`` and ``logit_std`` (ddof 0) of the
  expert's router logit over the N tokens;
- ``calibration_layers``: one row per layer: ``n_tokens`` N, ``top_k`` k, ``n_experts`` E,
  ``used_experts`` (count > 0), ``max_frequency``, ``min_frequency``, ``usage_entropy``
  H = −Σ f_e log₂ f_e in bits (log₂ E when every expert is used equally), and ``routing``: where
  the top-k came from (``experts``: the indices the block gave its experts; ``router``: the
  router's output; ``logits``: top-k of the logits);
- ``calibration_tokens``: one row per calibration token: ``token`` (its row in the matrices),
  ``sequence``, ``line`` (1-based line of the text file), ``position`` in its sequence,
  ``token_id``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from moelens.calibration.layer import LayerCalibration
from moelens.calibration.texts import CalibrationTokens
from moelens.results.schema import Bounds, TableSchema, within_model

USAGE_SCHEMA = TableSchema("calibration_usage", (
    ("layer", "int"), ("expert", "int"), ("count", "int"), ("frequency", "float"), ("feature_norm", "float"),
    ("logit_mean", "float"), ("logit_std", "float"),
), bounds={"layer": Bounds(minimum=0), "expert": Bounds(minimum=0), "count": Bounds(minimum=0),
           "frequency": Bounds(minimum=0.0, maximum=1.0)},
   relations=(within_model(),))
LAYERS_SCHEMA = TableSchema("calibration_layers", (
    ("layer", "int"), ("n_tokens", "int"), ("top_k", "int"), ("n_experts", "int"), ("used_experts", "int"),
    ("max_frequency", "float"), ("min_frequency", "float"), ("usage_entropy", "float"), ("routing", "str"),
), bounds={"layer": Bounds(minimum=0), "n_tokens": Bounds(minimum=0), "top_k": Bounds(minimum=1), "n_experts": Bounds(minimum=1),
           "used_experts": Bounds(minimum=0), "max_frequency": Bounds(minimum=0.0, maximum=1.0),
           "min_frequency": Bounds(minimum=0.0, maximum=1.0)},
   relations=(within_model(experts=()),))
TOKENS_SCHEMA = TableSchema("calibration_tokens", (
    ("token", "int"), ("sequence", "int"), ("line", "int"), ("position", "int"), ("token_id", "int"),
))


def usage_entropy(frequency: np.ndarray) -> float:
    """H = −Σ f log₂ f over the experts with f > 0, in bits."""
    f = np.asarray(frequency, dtype=np.float64)
    f = f[f > 0]
    return float(-(f * np.log2(f)).sum()) if f.size else 0.0


def usage_rows(cal: LayerCalibration) -> pd.DataFrame:
    """``calibration_usage`` rows of one layer."""
    e = cal.counts.size
    logits = np.asarray(cal.router_logits, dtype=np.float64)
    return pd.DataFrame({
        "layer": np.full(e, cal.layer, dtype=np.int64),
        "expert": np.arange(e, dtype=np.int64),
        "count": cal.counts.astype(np.int64),
        "frequency": cal.frequency.astype(np.float64),
        "feature_norm": np.linalg.norm(cal.features, axis=1),
        "logit_mean": logits.mean(0),
        "logit_std": logits.std(0),
    }, columns=USAGE_SCHEMA.column_names)


def layer_row(cal: LayerCalibration) -> pd.DataFrame:
    """The ``calibration_layers`` row of one layer."""
    f = cal.frequency
    return pd.DataFrame([{
        "layer": int(cal.layer), "n_tokens": int(cal.topk.shape[0]), "top_k": int(cal.topk.shape[1]),
        "n_experts": int(f.size), "used_experts": int((cal.counts > 0).sum()), "max_frequency": float(f.max()),
        "min_frequency": float(f.min()), "usage_entropy": usage_entropy(f), "routing": cal.routing,
    }], columns=LAYERS_SCHEMA.column_names)


def token_rows(tokens: CalibrationTokens) -> pd.DataFrame:
    """``calibration_tokens``: where each row of the matrices comes from."""
    return pd.DataFrame(tokens.token_table(), columns=TOKENS_SCHEMA.column_names)


__all__ = ["LAYERS_SCHEMA", "TOKENS_SCHEMA", "USAGE_SCHEMA", "layer_row", "token_rows", "usage_entropy", "usage_rows"]
