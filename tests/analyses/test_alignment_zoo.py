"""Router–expert alignment of the trained zoo models: the reference agrees on weights that
training shaped (not only Gaussian ones), and a run directory refuses another model's weights."""

from __future__ import annotations

import numpy as np
import pytest

import moelens as ml
from moelens.errors import RunDirectoryError

from . import slow_reference as ref


@pytest.mark.slow
def test_trained_zoo_models_match_the_reference_and_keep_runs_apart(small_zoo, tmp_path):
    base = ml.open_model(small_zoo.base)
    out = tmp_path / "base"
    run = ml.router_alignment(base, matrix="all", out=out, cache=False)
    ks = run.manifest["options"]["k"]
    t = run["alignment"]
    assert len(t) == len(base.moe_layers) * 3 * base.n_experts * len(ks)
    assert t["align"].between(0, 1).all()
    # align grows with k for every (layer, matrix, expert)
    grows = t.sort_values("k").groupby(["layer", "matrix", "expert"])["align"].apply(lambda s: bool((np.diff(s.to_numpy()) >= -1e-7).all()))
    assert grows.all()
    for L in base.moe_layers:
        layer = base.layer(L)
        routers = ref.normalized_routers(layer.router().weight)
        for role in ("gate", "down"):
            bases = [ref.input_singular_vectors(layer.expert_matrix(e, role), role) for e in range(layer.n_experts)]
            mine = t[(t.layer == L) & (t.matrix == role)].set_index(["expert", "k"])["align"]
            for e in range(layer.n_experts):
                for k in ks:
                    assert mine.loc[(e, k)] == pytest.approx(ref.energy(routers[e], bases[e], k), abs=1e-5)
    with pytest.raises(RunDirectoryError, match="other weight files"):
        ml.router_alignment(small_zoo.tuned, matrix="all", out=out, cache=False)
