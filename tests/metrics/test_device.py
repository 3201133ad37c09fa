"""The CUDA path agrees with the float64 reference as the CPU path does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moelens.metrics import role_distances, same_index_pairs, within_pairs
from tests.metrics import reference as ref
from tests.metrics.helpers import assert_matches, decaying, gaussian, perturbed

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
@pytest.mark.parametrize("top_sv", [None, 24])
def test_cuda_matches_reference(shape, top_sv):
    a = decaying(4, shape, seed=0)
    b = perturbed(a, 0.01, seed=1)
    pairs = np.concatenate([same_index_pairs(4), within_pairs(4)])
    assert_matches(role_distances(a, b, pairs, top_sv=top_sv, device="cuda"), ref.pair_table(a, b, pairs, top_sv=top_sv))
    w = gaussian(5, shape, seed=2).to(torch.bfloat16)
    assert_matches(role_distances(w, None, within_pairs(5), device="cuda"), ref.pair_table(w.float(), None, within_pairs(5)))
