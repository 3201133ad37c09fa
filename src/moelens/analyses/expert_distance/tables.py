"""Tables of expert distance.

- ``expert_distance``: one row per (layer, pairing, expert_a, expert_b, matrix); ``matrix`` is
  gate, up, down, or ``expert`` (the three pooled); ``rel_l2``, ``sv_align`` and ``n_sv`` as in
  docs/methods.md §2.
- ``expert_distance_layers``: per (layer, pairing, matrix, measure) the spread over pairs: mean,
  std (ddof 0), min, q25, median, q75, max and n (pairs with a value; NaN ones are left out).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from moelens.metrics import RoleDistances
from moelens.results.schema import Bounds, TableSchema, within_model

PAIR_SCHEMA = TableSchema("expert_distance", (
    ("layer", "int"), ("pairing", "str"), ("expert_a", "int"), ("expert_b", "int"), ("matrix", "str"),
    ("rel_l2", "float"), ("sv_align", "float"), ("n_sv", "int"),
), bounds={"layer": Bounds(minimum=0), "expert_a": Bounds(minimum=0), "expert_b": Bounds(minimum=0),
           "rel_l2": Bounds(nullable=True, minimum=0.0), "n_sv": Bounds(minimum=0)},
   relations=(within_model(experts=("expert_a", "expert_b")),))
MEASURES = ("rel_l2", "sv_align")
STATISTICS = ("mean", "std", "min", "q25", "median", "q75", "max", "n")
LAYER_SCHEMA = TableSchema("expert_distance_layers", (
    ("layer", "int"), ("pairing", "str"), ("matrix", "str"), ("measure", "str"),
    *((s, "int" if s == "n" else "float") for s in STATISTICS),
))


def pair_rows(layer: int, pairing: str, matrix: str, d: RoleDistances) -> pd.DataFrame:
    """The rows of one (layer, pairing, matrix)."""
    n = len(d)
    return pd.DataFrame({
        "layer": np.full(n, layer, dtype=np.int64),
        "pairing": [pairing] * n,
        "expert_a": d.pairs[:, 0].astype(np.int64),
        "expert_b": d.pairs[:, 1].astype(np.int64),
        "matrix": [matrix] * n,
        "rel_l2": d.rel_l2.astype(np.float64),
        "sv_align": d.sv_align.astype(np.float64),
        "n_sv": d.n_sv.astype(np.int64),
    }, columns=PAIR_SCHEMA.column_names)


def layer_summary(pairs: pd.DataFrame) -> pd.DataFrame:
    """``expert_distance_layers`` from ``expert_distance`` rows."""
    rows = []
    for (layer, pairing, matrix), group in pairs.groupby(["layer", "pairing", "matrix"], sort=False):
        for measure in MEASURES:
            v = group[measure].to_numpy(np.float64)
            v = v[~np.isnan(v)]
            if len(v):
                q25, median, q75 = np.quantile(v, [0.25, 0.5, 0.75])
                stats = (v.mean(), v.std(ddof=0), v.min(), q25, median, q75, v.max())
            else:
                stats = (np.nan,) * 7
            rows.append((int(layer), str(pairing), str(matrix), measure, *map(float, stats), int(len(v))))
    return pd.DataFrame(rows, columns=LAYER_SCHEMA.column_names).astype({"layer": np.int64, "n": np.int64})
