"""rel_l2 and sv_align against a float64 per-pair SVD reference, within 1e-5."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moelens.metrics import expert_distances, role_distances, same_index_pairs, singular, within_pairs
from tests.metrics import reference as ref
from tests.metrics.helpers import TOL, assert_matches, decaying, gaussian, perturbed

SHAPES = [(40, 24), (24, 40), (32, 32)]  # F > d (gate/up), F < d (down), square


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("make", [gaussian, decaying])
@pytest.mark.parametrize("eps", [1e-4, 1e-2, 0.5])
def test_base_tuned_matches_reference(shape, make, eps):
    a = make(4, shape, seed=1)
    b = perturbed(a, eps, seed=2)
    pairs = same_index_pairs(4)
    assert_matches(role_distances(a, b, pairs, device="cpu"), ref.pair_table(a, b, pairs))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("make", [gaussian, decaying])
def test_within_matches_reference(shape, make):
    a = make(5, shape, seed=3)
    pairs = within_pairs(5)
    assert_matches(role_distances(a, None, pairs, device="cpu"), ref.pair_table(a, None, pairs))


def test_cluster_pairs_in_any_order_match_reference():
    a = decaying(6, (36, 20), seed=4)
    a[3] = perturbed(a[1:2], 1e-3, seed=5)[0]  # a near twin, so some n agree and some differ
    pairs = np.array([[0, 3], [3, 1], [5, 2], [2, 5], [4, 4], [1, 0]])
    got = role_distances(a, None, pairs, device="cpu")
    np.testing.assert_array_equal(got.pairs, pairs)
    assert_matches(got, ref.pair_table(a, None, pairs))


@pytest.mark.parametrize("gamma", [0.1, 0.5, 0.9, 1.0])
def test_gamma_variants_match_reference(gamma):
    a = decaying(4, (40, 24), seed=6, tau=10.0)
    b = perturbed(a, 0.05, seed=7)
    pairs = same_index_pairs(4)
    assert_matches(role_distances(a, b, pairs, gamma=gamma, device="cpu"), ref.pair_table(a, b, pairs, gamma=gamma))


@pytest.mark.parametrize("top_sv", [1, 5, 17, 24])
def test_top_sv_variants_match_reference(top_sv):
    # top_sv = 24 reaches σ ≈ 0.02·σ₁: the float32 Gram cannot resolve that, so those experts are
    # redone in float64 (and still agree to 1e-5)
    a = decaying(4, (40, 24), seed=8)
    b = perturbed(a, 0.01, seed=9)
    pairs = np.concatenate([same_index_pairs(4), within_pairs(4)])
    assert_matches(
        role_distances(a, b, pairs, top_sv=top_sv, device="cpu"),
        ref.pair_table(a, b, pairs, top_sv=top_sv),
    )


def test_small_gamma_is_redone_in_float64(monkeypatch):
    a = decaying(3, (40, 24), seed=10)
    seen = []
    original = singular._eigh_desc

    def spy(grams):
        seen.append(grams.dtype)
        return original(grams)

    monkeypatch.setattr(singular, "_eigh_desc", spy)
    pairs = within_pairs(3)
    got = role_distances(a, None, pairs, gamma=0.01, device="cpu")
    assert torch.float64 in seen
    assert_matches(got, ref.pair_table(a, None, pairs, gamma=0.01))


def test_float64_compute_matches_reference():
    a = gaussian(3, (30, 18), seed=11)
    b = perturbed(a, 0.1, seed=12)
    pairs = np.array([[0, 0], [0, 1], [2, 1]])
    assert_matches(role_distances(a, b, pairs, device="cpu", dtype="float64"), ref.pair_table(a, b, pairs), tol=1e-10)


def test_bfloat16_input_equals_its_float32_value():
    a = decaying(4, (40, 24), seed=13).to(torch.bfloat16)
    pairs = within_pairs(4)
    got = role_distances(a, None, pairs, device="cpu")
    assert_matches(got, ref.pair_table(a.float(), None, pairs))


def test_tiny_distances_keep_their_digits():
    # rel_l2 ≈ 1e-4 and below: 2 − 2cos would lose them in float32
    a = gaussian(3, (64, 48), seed=14)
    for eps in (1e-4, 1e-5, 1e-6):
        b = perturbed(a, eps, seed=15)
        got = role_distances(a, b, same_index_pairs(3), device="cpu")
        want = [ref.rel_l2(a[e], b[e]) for e in range(3)]
        np.testing.assert_allclose(got.rel_l2, want, rtol=0, atol=TOL)
        np.testing.assert_allclose(got.rel_l2, want, rtol=1e-2)  # and relatively, even at 1e-6


@pytest.mark.parametrize("chunk_bytes", [1, 4096])
def test_chunking_does_not_change_results(chunk_bytes):
    a = gaussian(5, (40, 24), seed=16)
    pairs = within_pairs(5)
    whole = role_distances(a, None, pairs, device="cpu")
    parts = role_distances(a, None, pairs, device="cpu", chunk_bytes=chunk_bytes)
    np.testing.assert_allclose(parts.rel_l2, whole.rel_l2, rtol=0, atol=1e-12)
    np.testing.assert_allclose(parts.sv_align, whole.sv_align, rtol=0, atol=1e-9)


def test_each_expert_is_decomposed_once(monkeypatch):
    calls = []
    original = singular.gram

    def spy(x):
        calls.append(tuple(x.shape))
        return original(x)

    monkeypatch.setattr(singular, "gram", spy)
    a = gaussian(6, (40, 24), seed=17)
    role_distances(a, None, within_pairs(6), device="cpu")
    assert len(calls) == 6
    calls.clear()
    role_distances(a, perturbed(a, 0.1, seed=18), same_index_pairs(6), device="cpu")
    assert len(calls) == 12


def _roles(n: int, d: int, f: int, seed: int) -> dict[str, torch.Tensor]:
    return {"gate": decaying(n, (f, d), seed), "up": gaussian(n, (f, d), seed + 1), "down": decaying(n, (d, f), seed + 2, tau=3.0)}


@pytest.mark.parametrize("pool", ["mean", "ito"])
def test_expert_row_matches_hand_pooled_reference(pool):
    base = _roles(4, 24, 40, seed=20)
    tuned = {r: perturbed(w, 0.05, seed=30 + i) for i, (r, w) in enumerate(base.items())}
    pairs = np.concatenate([same_index_pairs(4), [[0, 1], [3, 2]]])
    per_role = {r: role_distances(base[r], tuned[r], pairs, device="cpu") for r in base}
    row = expert_distances(per_role, pool=pool)
    for p, (i, j) in enumerate(pairs):
        cat_a = torch.cat([base[r][i].flatten() for r in base])
        cat_b = torch.cat([tuned[r][j].flatten() for r in base])
        assert abs(row.rel_l2[p] - ref.rel_l2(cat_a, cat_b)) <= TOL
        parts = [ref.overlap(base[r][i], tuned[r][j]) for r in base]  # (Σ_ij(…), n) per role
        if pool == "mean":
            want = np.mean([ov / n for ov, n in parts])
        else:
            want = sum(ov for ov, _ in parts) / sum(n for _, n in parts)
        assert abs(row.sv_align[p] - want) <= TOL
        assert row.n_sv[p] == sum(n for _, n in parts)


def test_ito_weights_roles_by_n():
    base = _roles(2, 24, 40, seed=40)
    tuned = {r: perturbed(w, 0.3, seed=50) for r, w in base.items()}
    per_role = {r: role_distances(base[r], tuned[r], same_index_pairs(2), device="cpu") for r in base}
    ito = expert_distances(per_role, pool="ito").sv_align
    mean = expert_distances(per_role, pool="mean").sv_align
    n = np.stack([per_role[r].n_sv for r in base])  # [3, P]
    s = np.stack([per_role[r].sv_align for r in base])
    np.testing.assert_allclose(ito, (n * s).sum(0) / n.sum(0), rtol=1e-12)
    np.testing.assert_allclose(mean, s.mean(0), rtol=1e-12)
    assert not np.allclose(ito, mean)  # the roles' n differ, so the two pools do


@pytest.mark.parametrize("top_sv", [None, 5])
def test_many_base_tuned_pairs_match_reference(top_sv):
    # 20 pairs at one level (top_sv) are too sparse for the block layout: the projector
    # overlaps go through gathered rows
    a = decaying(20, (24, 12), seed=60)
    b = perturbed(a, 0.05, seed=61)
    pairs = same_index_pairs(20)
    assert_matches(role_distances(a, b, pairs, top_sv=top_sv, device="cpu"), ref.pair_table(a, b, pairs, top_sv=top_sv))


def _overlaps(a, b, pairs, step_bytes, monkeypatch):
    """(overlap, n, slots) of projector_overlaps on a stack and its perturbed copy."""
    from moelens.metrics import sv_align
    from moelens.metrics.singular import decompose

    slots = []
    original = sv_align._schedule

    def spy(*args):
        out = original(*args)
        slots.append(out[-1])  # (step, last, slots)
        return out

    monkeypatch.setattr(sv_align, "_schedule", spy)
    matrices = list(a) + list(b)
    factors = decompose(matrices, 0.3, None, torch.device("cpu"), torch.float32)
    li, ri = torch.as_tensor(pairs[:, 0]), torch.as_tensor(pairs[:, 1])
    overlap, n = sv_align.projector_overlaps(matrices, factors, li, ri, torch.device("cpu"), torch.float32, step_bytes=step_bytes)
    return overlap.numpy(), n.numpy(), slots[-1]


@pytest.mark.parametrize("kind", ["base-tuned", "within"])
def test_steps_of_one_pair_hold_fewer_projectors_and_agree(kind, monkeypatch):
    a = gaussian(6, (40, 24), seed=70)  # random matrices: most pairs share one level
    b = perturbed(a, 0.05, seed=71)
    if kind == "base-tuned":
        pairs = np.stack([np.arange(6), np.arange(6) + 6], 1)
    else:
        pairs = within_pairs(6)
    whole, n_whole, slots_whole = _overlaps(a, b, pairs, 2**30, monkeypatch)
    steps, n_steps, slots_steps = _overlaps(a, b, pairs, 1, monkeypatch)
    np.testing.assert_allclose(steps, whole, rtol=1e-13, atol=0)  # float64 sums in another grouping
    np.testing.assert_array_equal(n_steps, n_whole)
    if kind == "base-tuned":
        assert slots_whole > 2 and slots_steps == 2  # one pair of projectors at a time
    else:
        assert slots_steps == slots_whole == 6  # every expert meets every other: whole levels
