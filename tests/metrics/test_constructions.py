"""Values known by construction: identity, sign flips, scaling, permuted neurons, unrelated
experts, zero matrices, rotations inside a degenerate subspace."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moelens.metrics import expert_distances, role_distances, same_index_pairs, within_pairs
from tests.metrics import reference as ref
from tests.metrics.helpers import TOL, decaying, gaussian


def _orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    return q


def test_identical_experts():
    a = decaying(3, (40, 24), seed=0)
    got = role_distances(a, a.clone(), same_index_pairs(3), device="cpu")
    np.testing.assert_allclose(got.rel_l2, 0.0, atol=TOL)
    np.testing.assert_allclose(got.sv_align, 1.0, atol=TOL)


def test_sign_flips_of_singular_vectors_leave_sv_align_at_one():
    g = torch.Generator().manual_seed(1)
    u, s, vh = torch.linalg.svd(decaying(1, (40, 24), seed=1)[0].double(), full_matrices=False)
    signs = torch.where(torch.rand(s.numel(), generator=g) < 0.5, -1.0, 1.0).double()
    # flipping u_i and v_i together leaves B = A, but the decomposition sees other signs
    b = (u * signs) @ torch.diag(s) @ (vh.T * signs).T
    a = (u @ torch.diag(s) @ vh)
    got = role_distances(a[None].float(), b[None].float(), [[0, 0]], device="cpu")
    assert abs(got.sv_align[0] - 1.0) <= TOL
    assert got.rel_l2[0] <= TOL
    # and R against an unrelated matrix does not change under the flips either
    c = decaying(1, (40, 24), seed=2)
    r1 = role_distances(a[None].float(), c, [[0, 0]], device="cpu").sv_align[0]
    r2 = role_distances(b[None].float(), c, [[0, 0]], device="cpu").sv_align[0]
    assert abs(r1 - r2) <= TOL


@pytest.mark.parametrize("c", [1e-3, 0.5, 7.0, 1e4])
def test_scaling_changes_nothing(c):
    a = decaying(3, (40, 24), seed=3)
    b = gaussian(3, (40, 24), seed=4)
    pairs = [[0, 0], [1, 2], [2, 1]]
    base = role_distances(a, b, pairs, device="cpu")
    scaled = role_distances(a * c, b, pairs, device="cpu")
    np.testing.assert_allclose(scaled.rel_l2, base.rel_l2, atol=TOL)
    np.testing.assert_allclose(scaled.sv_align, base.sv_align, atol=TOL)
    np.testing.assert_array_equal(scaled.n_sv, base.n_sv)


def test_neuron_permuted_copy_looks_unrelated():
    """Rows of gate/up and columns of down permuted: the same function, but a different matrix.

    Observed (F = 512, d = 128, decaying spectra, n = 8 per matrix): sv_align −0.003, −0.002,
    −0.010 for gate, up, down (the permuted singular vectors Π u_i are nearly orthogonal to
    every u_j), rel_l2 1.407, 1.417, 1.418 (√2 = 1.414): a permuted copy looks unrelated."""
    d, f = 128, 512
    gate, up, down = decaying(1, (f, d), 5)[0], decaying(1, (f, d), 6)[0], decaying(1, (d, f), 7)[0]
    perm = torch.randperm(f, generator=torch.Generator().manual_seed(8))
    base = {"gate": gate[None], "up": up[None], "down": down[None]}
    moved = {"gate": gate[perm][None], "up": up[perm][None], "down": down[:, perm][None]}
    per_role = {r: role_distances(base[r], moved[r], [[0, 0]], device="cpu") for r in base}
    for r, got in per_role.items():
        assert abs(got.sv_align[0]) < 0.05, (r, got.sv_align)
        assert abs(got.rel_l2[0] - math.sqrt(2)) < 0.05, (r, got.rel_l2)
    row = expert_distances(per_role)
    assert abs(row.sv_align[0]) < 0.05 and abs(row.rel_l2[0] - math.sqrt(2)) < 0.05


def test_unrelated_experts():
    a = gaussian(6, (384, 128), seed=9)
    got = role_distances(a, None, within_pairs(6), device="cpu")
    np.testing.assert_allclose(got.rel_l2, math.sqrt(2), atol=0.05)
    assert np.abs(got.sv_align).max() < 0.05


def test_zero_matrix_gives_nan_without_raising():
    a = decaying(3, (40, 24), seed=10)
    a[1] = 0.0
    got = role_distances(a, None, within_pairs(3), device="cpu")  # (0,1) (0,2) (1,2)
    assert got.undefined.tolist() == [True, False, True]
    assert got.n_sv.tolist()[0] == 0 and got.n_sv.tolist()[2] == 0
    assert np.isnan(got.rel_l2[0]) and np.isnan(got.rel_l2[2])
    assert abs(got.sv_align[1] - ref.sv_align(a[0], a[2])) <= TOL
    # pooled: the mean is undefined, Ito's ratio still counts the other roles
    other = role_distances(decaying(3, (40, 24), seed=11), None, within_pairs(3), device="cpu")
    mean = expert_distances({"gate": got, "up": other}, pool="mean")
    ito = expert_distances({"gate": got, "up": other}, pool="ito")
    assert np.isnan(mean.sv_align[0]) and not np.isnan(ito.sv_align[0])
    assert abs(ito.sv_align[0] - other.sv_align[0]) <= 1e-12  # the zero matrix adds n = 0
    assert not np.isnan(mean.rel_l2[0])  # the concatenation is not zero


def test_rotation_inside_a_degenerate_top_subspace():
    """B's top 4 σ are equal: any rotation of that block is an SVD of B, and R must not depend
    on which one the solver returns. The reference is evaluated with a rotated basis."""
    g = torch.Generator().manual_seed(12)
    m, n, k = 40, 24, 4
    u, v = _orthonormal(m, n, g), _orthonormal(n, n, g)
    s = torch.cat([torch.full((k,), 3.0), torch.linspace(0.8, 0.1, n - k)]).double()
    b = (u * s) @ v.T  # n_B = 4 at γ = 0.3
    a = b + 0.3 * torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    got = role_distances(a[None].float(), b[None].float(), [[0, 0]], device="cpu")
    ua, va, na = ref.kept(a.float())
    assert na >= k and got.n_sv[0] == k
    for seed in range(3):
        q = _orthonormal(k, k, torch.Generator().manual_seed(100 + seed))
        ub, vb = u[:, :k] @ q, v[:, :k] @ q  # another SVD of B's top block
        total = sum(float(ua[:, i] @ ub[:, j]) * float(va[:, i] @ vb[:, j]) for i in range(k) for j in range(k))
        assert abs(got.sv_align[0] - total / k) <= TOL


def test_top_sv_beyond_the_rank_keeps_the_rank():
    """A rank-3 matrix has no 4th singular direction: top_sv = 12 keeps 3 (docs/methods.md §2: n_X is capped
    at the numerical rank, so the undetermined directions of σ = 0 never enter R)."""
    g = torch.Generator().manual_seed(13)
    a = (torch.randn(2, 20, 3, generator=g, dtype=torch.float64) @ torch.randn(2, 3, 12, generator=g, dtype=torch.float64)).float()
    got = role_distances(a, a.clone(), same_index_pairs(2), top_sv=12, device="cpu")
    assert got.n_sv.tolist() == [3, 3]
    np.testing.assert_allclose(got.sv_align, 1.0, atol=TOL)
    cross = role_distances(a, None, [[0, 1]], top_sv=12, device="cpu")
    assert cross.n_sv[0] == 3 and abs(cross.sv_align[0] - ref.sv_align(a[0], a[1], top_sv=12)) <= TOL
