"""Usage-weighted merging of experts and router rows against plain loops and known cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moelens.checkpoint.weights import ExpertWeights
from moelens.errors import ConfigError
from moelens.merge import merge_cluster, merge_layer, merge_rows, usage_weights
from moelens.metrics.permutation import apply_permutation, cluster_anchors
from tests.merge.helpers import loop_merge
from tests.metrics.test_permutation import random_expert


def test_usage_weights():
    np.testing.assert_allclose(usage_weights([1.0, 3.0]), [0.25, 0.75])
    np.testing.assert_allclose(usage_weights([0.0, 0.0, 0.0]), [1 / 3] * 3)  # zero total: uniform
    with pytest.raises(ConfigError, match="≥ 0"):
        usage_weights([-1.0, 2.0])


@pytest.mark.parametrize("permute", [False, True])
def test_merge_cluster_matches_plain_loops(permute):
    experts = [random_expert(12, 6, seed=s) for s in range(3)]
    usage = [0.2, 0.5, 0.1]
    got = merge_cluster(experts, usage, permute=permute)  # anchor: the most used, member 1
    want = loop_merge(experts, [0, 1, 2], usage, anchor=1, permute=permute)
    for role in ("gate", "up", "down"):
        np.testing.assert_allclose(getattr(got, role).double().numpy(), want[role], rtol=0, atol=1e-6)
    assert got.up.dtype == torch.float32


def test_merge_cluster_biases_and_zero_usage():
    experts = [random_expert(8, 4, seed=s, biases=True) for s in range(2)]
    got = merge_cluster(experts, [0.0, 0.0], permute=False)
    for name in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias"):
        torch.testing.assert_close(getattr(got, name), (getattr(experts[0], name) + getattr(experts[1], name)) / 2)
    with pytest.raises(ConfigError, match="some members have a gate_bias"):
        merge_cluster([experts[0], random_expert(8, 4, seed=5)], [1.0, 1.0], permute=False)


def test_permuted_copies_merge_back_to_the_anchor():
    a = random_expert(16, 8, seed=1, biases=True)
    copies = [apply_permutation(a, torch.randperm(16, generator=torch.Generator().manual_seed(s))) for s in range(3)]
    merged = merge_cluster([copies[0], a, copies[1], copies[2]], [0.1, 0.4, 0.3, 0.2], anchor=1)
    for name in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias"):
        torch.testing.assert_close(getattr(merged, name), getattr(a, name), rtol=0, atol=1e-6)
    unaligned = merge_cluster([copies[0], a], [0.5, 0.5], anchor=1, permute=False)
    assert (unaligned.up - a.up).abs().max() > 0.1


def test_merge_layer_equals_merge_cluster():
    experts = [random_expert(12, 6, seed=10 + s) for s in range(6)]
    labels = np.array([0, 1, 0, 2, 1, 0])
    usage = np.array([0.1, 0.0, 0.3, 0.2, 0.0, 0.4])
    anchors = cluster_anchors(labels, usage)
    gate, up, down = (torch.stack([getattr(e, r) for e in experts]) for r in ("gate", "up", "down"))
    g, u, d = merge_layer(gate, up, down, labels, usage, anchors)
    assert g.shape == (3, 12, 6) and d.shape == (3, 6, 12)
    for c in range(3):
        members = np.flatnonzero(labels == c)
        want = merge_cluster([experts[m] for m in members], usage[members], anchor=int(np.flatnonzero(members == anchors[members[0]])[0]))
        torch.testing.assert_close(g[c], want.gate, rtol=0, atol=1e-6)
        torch.testing.assert_close(u[c], want.up, rtol=0, atol=1e-6)
        torch.testing.assert_close(d[c], want.down, rtol=0, atol=1e-6)


def test_merge_rows():
    rows = torch.arange(12.0).reshape(4, 3)
    got = merge_rows(rows, [0, 1, 0, 1], [1.0, 0.0, 3.0, 0.0])
    torch.testing.assert_close(got, torch.stack([0.25 * rows[0] + 0.75 * rows[2], (rows[1] + rows[3]) / 2]))
    torch.testing.assert_close(merge_rows(torch.tensor([1.0, 2.0, 4.0]), [0, 0, 1], [1.0, 1.0, 1.0]), torch.tensor([1.5, 4.0]))
    with pytest.raises(ConfigError, match="cluster 1 has no member"):
        merge_rows(rows, [0, 2, 0, 2], [1.0] * 4)


def test_expertweights_tuple_form():
    e = random_expert(8, 4, seed=3)
    got = merge_cluster([(e.gate, e.up, e.down), e], [1.0, 1.0])
    assert isinstance(got, ExpertWeights)
    torch.testing.assert_close(got.up, e.up, rtol=0, atol=1e-7)
