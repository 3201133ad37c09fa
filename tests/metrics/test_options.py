"""Pair builders and option checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moelens.errors import ConfigError, IndexOutOfRangeError
from moelens.metrics import check_options, expert_distances, role_distances, same_index_pairs, within_pairs


def test_pair_builders():
    assert within_pairs(4).tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    assert same_index_pairs(3).tolist() == [[0, 0], [1, 1], [2, 2]]
    assert within_pairs(1).shape == (0, 2)


def test_empty_pairs_give_empty_arrays():
    got = role_distances(torch.randn(2, 8, 6), None, within_pairs(1), device="cpu")
    assert len(got) == 0 and got.rel_l2.shape == (0,) and got.sv_align.shape == (0,)


@pytest.mark.parametrize("gamma", [0.0, -0.1, 1.5, float("nan")])
def test_gamma_outside_unit_interval_is_a_config_error(gamma):
    with pytest.raises(ConfigError, match="gamma"):
        role_distances(torch.randn(2, 8, 6), None, [[0, 1]], gamma=gamma, device="cpu")


@pytest.mark.parametrize("top_sv", [0, -3, 2.5])
def test_top_sv_below_one_is_a_config_error(top_sv):
    with pytest.raises(ConfigError, match="top_sv"):
        check_options(0.3, top_sv)


def test_top_sv_above_min_dim_is_a_config_error():
    with pytest.raises(ConfigError, match=r"top_sv = 7 exceeds min\(rows, cols\) = 6"):
        role_distances(torch.randn(2, 8, 6), None, [[0, 1]], top_sv=7, device="cpu")
    role_distances(torch.randn(2, 8, 6), None, [[0, 1]], top_sv=6, device="cpu")  # the largest allowed


def test_shapes_and_indices_are_checked():
    with pytest.raises(ConfigError, match="different shapes"):
        role_distances(torch.randn(2, 8, 6), torch.randn(2, 6, 8), [[0, 0]], device="cpu")
    with pytest.raises(IndexOutOfRangeError):
        role_distances(torch.randn(2, 8, 6), None, [[0, 2]], device="cpu")
    with pytest.raises(ConfigError, match=r"\[P, 2\]"):
        role_distances(torch.randn(2, 8, 6), None, [[0, 1, 1]], device="cpu")


def test_pooling_checks():
    a = torch.randn(3, 8, 6)
    r1 = role_distances(a, None, within_pairs(3), device="cpu")
    r2 = role_distances(a, None, [[0, 1]], device="cpu")
    with pytest.raises(ConfigError, match="pool"):
        expert_distances({"gate": r1}, pool="max")
    with pytest.raises(ConfigError, match="different pairs"):
        expert_distances({"gate": r1, "up": r2})
    assert np.array_equal(expert_distances({"gate": r1}).sv_align, r1.sv_align)
