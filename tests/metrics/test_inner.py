"""float64 pair inner products in every layout (block grid, gathered rows, subsets, chunks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moelens.metrics import same_index_pairs, within_pairs
from moelens.metrics.inner import pair_dots, squared_norms

CPU = torch.device("cpu")


def _plain(left: torch.Tensor, right: torch.Tensor, pairs) -> list[float]:
    return [float((left[i].double() * right[j].double()).sum()) for i, j in pairs]


PATTERNS = {
    "within": within_pairs(7),                       # block grid over every matrix
    "same-index-many": same_index_pairs(40),         # gathered rows (E > BLOCK_WASTE)
    "subset": np.array([[1, 38], [5, 2], [5, 9]]),   # a few matrices of a large stack
    "one-vs-rest": np.array([[3, j] for j in range(40) if j != 3]),
}


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("chunk_bytes", [1, 2048, 2**24])
@pytest.mark.parametrize("shared", [True, False])
def test_pair_dots_match_a_plain_loop(pattern, chunk_bytes, shared):
    g = torch.Generator().manual_seed(0)
    left = torch.randn(40, 12, 5, generator=g).to(torch.bfloat16)
    right = left if shared else torch.randn(40, 12, 5, generator=g)
    pairs = PATTERNS[pattern]
    got = pair_dots(left, right, torch.as_tensor(pairs[:, 0]), torch.as_tensor(pairs[:, 1]), CPU, chunk_bytes)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), _plain(left, right, pairs), rtol=1e-12, atol=1e-12)


def test_squared_norms_each_once():
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    idx = torch.tensor([4, 1, 4, 0])
    np.testing.assert_allclose(squared_norms(x, idx, CPU).numpy(), [float(x[i].pow(2).sum()) for i in idx.tolist()], rtol=1e-14)
