"""Weight-matching permutation (docs/methods.md §3): function preserved, the cost against plain loops, the
assignment against brute force, planted copies aligned back, the layer helper against the
per-member function."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from moelens.checkpoint.weights import ExpertWeights
from moelens.errors import ConfigError
from moelens.metrics.clustering import hc_smoe_clusters, most_used_members
from moelens.metrics.permutation import (
    apply_permutation,
    cluster_anchors,
    layer_permutations,
    permute_stacks,
    weight_matching_cost,
    weight_matching_permutation,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def random_expert(f: int, d: int, seed: int, biases: bool = False, gated: bool = True) -> ExpertWeights:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    return ExpertWeights(
        gate=rnd(f, d) if gated else None, up=rnd(f, d), down=rnd(d, f),
        gate_bias=rnd(f) if biases and gated else None, up_bias=rnd(f) if biases else None, down_bias=rnd(d) if biases else None,
    )


def expert_output(e: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
    """[N, d] SwiGLU expert output (ReLU up-projection when ungated)."""
    up = x @ e.up.T + (e.up_bias if e.up_bias is not None else 0)
    if e.gate is not None:
        hidden = torch.nn.functional.silu(x @ e.gate.T + (e.gate_bias if e.gate_bias is not None else 0)) * up
    else:
        hidden = torch.relu(up)
    return hidden @ e.down.T + (e.down_bias if e.down_bias is not None else 0)


def expert_features(e: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
    """HC-SMoE's feature: the mean output over all tokens."""
    return expert_output(e, x).mean(0)


def rel_l2(a: ExpertWeights, b: ExpertWeights) -> float:
    cat = lambda e: torch.cat([m.double().flatten() for m in (e.gate, e.up, e.down) if m is not None])  # noqa: E731
    x, y = cat(a), cat(b)
    return float((x / x.norm() - y / y.norm()).norm())


def loop_cost(a: ExpertWeights, b: ExpertWeights) -> np.ndarray:
    """C[p, q] by plain loops in float64."""
    f = a.up.shape[0]
    mats = [(m.double().numpy(), n.double().numpy()) for m, n in ((a.gate, b.gate), (a.up, b.up)) if m is not None]
    da, db = a.down.double().numpy(), b.down.double().numpy()
    c = np.zeros((f, f))
    for p in range(f):
        for q in range(f):
            c[p, q] = sum(float(((ma[p] - mb[q]) ** 2).sum()) for ma, mb in mats) + float(((da[:, p] - db[:, q]) ** 2).sum())
    return c


@pytest.mark.parametrize("biases, gated", [(False, True), (True, True), (True, False)])
def test_permutation_preserves_function(biases, gated):
    e = random_expert(48, 32, seed=1, biases=biases, gated=gated)
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(2))
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    permuted = apply_permutation(e, perm)
    assert not torch.equal(permuted.up, e.up)
    torch.testing.assert_close(expert_output(permuted, x), expert_output(e, x), rtol=0, atol=1e-5)
    # and a random member aligned onto a random anchor computes what it computed before
    aligned = apply_permutation(e, weight_matching_permutation(random_expert(48, 32, seed=9, biases=biases, gated=gated), e))
    torch.testing.assert_close(expert_output(aligned, x), expert_output(e, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("gated", [True, False])
def test_cost_matches_plain_loops(gated):
    a, b = random_expert(10, 7, seed=4, gated=gated), random_expert(10, 7, seed=5, gated=gated)
    np.testing.assert_allclose(weight_matching_cost(a, b), loop_cost(a, b), rtol=0, atol=1e-12)
    np.testing.assert_allclose(weight_matching_cost((a.gate, a.up, a.down), (b.gate, b.up, b.down)), loop_cost(a, b), rtol=0, atol=1e-12)


def test_assignment_is_optimal_by_brute_force():
    for seed in range(3):
        a, b = random_expert(6, 5, seed=10 + seed), random_expert(6, 5, seed=20 + seed)
        c = loop_cost(a, b)
        totals = {perm: sum(c[p, q] for p, q in enumerate(perm)) for perm in itertools.permutations(range(6))}
        best = min(totals, key=totals.get)
        got = tuple(weight_matching_permutation(a, b).tolist())
        assert got == best
        assert sorted(totals.values())[1] > totals[best] + 1e-9  # the optimum is unique here


def test_planted_copy_is_aligned_back():
    a = random_expert(64, 24, seed=6, biases=True)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(7))
    copy = apply_permutation(a, perm)
    assert rel_l2(a, copy) > 1.0
    back = weight_matching_permutation(a, copy)
    aligned = apply_permutation(copy, back)
    assert rel_l2(a, aligned) < 1e-7
    torch.testing.assert_close(aligned.up_bias, a.up_bias, rtol=0, atol=0)
    # with small noise on the copy the same neurons are found
    noisy = ExpertWeights(gate=copy.gate + 1e-3 * torch.randn(copy.gate.shape, generator=torch.Generator().manual_seed(8)),
                          up=copy.up, down=copy.down)
    np.testing.assert_array_equal(weight_matching_permutation(a, noisy), back)


def test_planted_copies_cluster_together_and_align_in_a_layer():
    """The issue's test: an expert and its neuron-permuted copy land in one cluster (HC-SMoE on
    mean outputs) and the layer helper aligns the copy back to rel_l2 ≈ 0."""
    f, d, n = 32, 16, 8
    experts = [random_expert(f, d, seed=30 + e) for e in range(n)]
    experts[5] = apply_permutation(experts[1], torch.randperm(f, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(300, d, generator=torch.Generator().manual_seed(2))
    labels = hc_smoe_clusters(torch.stack([expert_features(e, x) for e in experts]), 4)
    assert labels[1] == labels[5]
    usage = np.array([0.1, 0.3, 0.1, 0.1, 0.1, 0.2, 0.05, 0.05])
    anchors = cluster_anchors(labels, usage, most_used_members(labels, usage))
    assert anchors[5] == 1
    gate, up, down = (torch.stack([getattr(e, r) for e in experts]) for r in ("gate", "up", "down"))
    perms = layer_permutations(gate, up, down, anchors)
    g2, u2, d2 = permute_stacks(gate, up, down, perms)
    assert rel_l2(experts[1], ExpertWeights(gate=g2[5], up=u2[5], down=d2[5])) < 1e-7
    for e in range(n):
        want = np.arange(f) if anchors[e] == e else weight_matching_permutation(experts[anchors[e]], experts[e])
        np.testing.assert_array_equal(perms[e], want)
        torch.testing.assert_close(expert_output(ExpertWeights(gate=g2[e], up=u2[e], down=d2[e]), x), expert_output(experts[e], x),
                                   rtol=0, atol=1e-5)


def test_layer_permutations_in_bf16_and_without_gate():
    experts = [random_expert(16, 8, seed=40 + e, gated=False) for e in range(4)]
    up = torch.stack([e.up for e in experts]).to(torch.bfloat16)
    down = torch.stack([e.down for e in experts]).to(torch.bfloat16)
    perms = layer_permutations(None, up, down, [0, 0, 2, 2])
    for e, a in ((1, 0), (3, 2)):
        want = weight_matching_permutation(ExpertWeights(gate=None, up=up[a], down=down[a]), ExpertWeights(gate=None, up=up[e], down=down[e]))
        np.testing.assert_array_equal(perms[e], want)


def test_cluster_anchors():
    labels = np.array([0, 0, 1, 1, 1])
    assert cluster_anchors(labels, [0.1, 0.2, 0.3, 0.3, 0.1]).tolist() == [1, 1, 2, 2, 2]
    assert cluster_anchors(labels, [0.1, 0.2, 0.3, 0.3, 0.1], [True, False, False, False, True]).tolist() == [0, 0, 4, 4, 4]
    assert cluster_anchors(labels).tolist() == [0, 0, 2, 2, 2]
    with pytest.raises(ConfigError, match="cluster 1 marks 2 dominant experts"):
        cluster_anchors(labels, None, [False, False, True, True, False])


def test_bad_input():
    a = random_expert(8, 4, seed=0)
    with pytest.raises(ConfigError, match="permutation of 0..7"):
        apply_permutation(a, [0, 0, 1, 2, 3, 4, 5, 6])
    with pytest.raises(ConfigError, match="share a shape"):
        weight_matching_permutation(a, random_expert(9, 4, seed=1))
    with pytest.raises(ConfigError, match="both have a gate"):
        weight_matching_permutation(a, random_expert(8, 4, seed=1, gated=False))
    with pytest.raises(ConfigError, match="anchors itself"):
        layer_permutations(a.gate[None].repeat(2, 1, 1), a.up[None].repeat(2, 1, 1), a.down[None].repeat(2, 1, 1), [1, 0])


@pytest.mark.gpu
@needs_cuda
def test_cuda_cost_matches_cpu():
    a, b = random_expert(64, 32, seed=1), random_expert(64, 32, seed=2)
    np.testing.assert_allclose(weight_matching_cost(a, b, device="cuda"), weight_matching_cost(a, b), rtol=0, atol=1e-10)
    np.testing.assert_array_equal(weight_matching_permutation(a, b, device="cuda"), weight_matching_permutation(a, b))
