"""Record WeightWatcher's α for the matrices of ``weightwatcher_matrices.py``.

Run in a scratch environment that holds WeightWatcher, never moelens's own (see README.md):

    python3 -m venv /tmp/wwvenv && /tmp/wwvenv/bin/pip install weightwatcher==0.7.7 torch==2.13.0
    CUDA_VISIBLE_DEVICES= PYTHONPATH=. /tmp/wwvenv/bin/python tests/metrics/data/record_weightwatcher.py

Each matrix becomes the weight of one ``torch.nn.Linear`` of a one-layer model, analysed with
``WeightWatcher().analyze()`` and default options; the row's ``alpha``, ``xmin``, ``D``,
``num_pl_spikes`` and ``num_evals`` are written to ``weightwatcher_alpha.json``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # WeightWatcher's CPU path: scipy float64 SVD
    import numpy as np
    import scipy
    import torch
    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    sys.path.insert(0, str(HERE.parents[2]))
    from tests.metrics.data.weightwatcher_matrices import RECIPES, build

    assert not torch.cuda.is_available(), "record without CUDA (WeightWatcher then uses float32 torch SVD)"
    rows = {}
    for name, (_, words) in RECIPES.items():
        w = build(name)
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(w))
        details = ww.WeightWatcher(model=torch.nn.Sequential(layer)).analyze()
        if len(details) == 0:
            rows[name] = {"construction": words, "shape": list(w.shape), "alpha": None, "note": "skipped by WeightWatcher"}
            continue
        r = details.iloc[0]
        rows[name] = {
            "construction": words, "shape": list(w.shape),
            "alpha": float(r["alpha"]), "xmin": float(r["xmin"]), "D": float(r["D"]),
            "num_pl_spikes": int(r["num_pl_spikes"]), "num_evals": int(r["num_evals"]),
        }
        print(f"{name:<55} alpha={rows[name]['alpha']:.6f} xmin={rows[name]['xmin']:.4g} "
              f"D={rows[name]['D']:.4f} spikes={rows[name]['num_pl_spikes']}", flush=True)
    out = {
        "weightwatcher": ww.__version__,
        "how": "WeightWatcher(model=torch.nn.Sequential(Linear with this weight)).analyze(), default options, no CUDA",
        "environment": {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
                        "torch": torch.__version__},
        "matrices": rows,
    }
    (HERE / "weightwatcher_alpha.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
