"""Expert distance (docs/methods.md §2, §7) through the analysis, on checkpoints of every family and layout.

- every row of ``expert_distance`` (per matrix and ``matrix = "expert"``, pools mean and ito)
  against a float64 reference written apart from moelens: ``torch.linalg.svd`` per matrix, the
  double sum R = (1/n) Σ_{i,j≤n} (u_iᴬ·u_jᴮ)(v_iᴬ·v_jᴮ) as an explicit loop, rel_l2 as the norm
  of a difference of normalised (concatenated) matrices;
- values known by construction (a model against itself, a negated or scaled copy, experts
  renumbered, neurons permuted, unrelated random experts);
- the summary table against pandas, the pair structure of each pairing;
- the trained small zoo: base→tuned pairs far closer than pairs within a layer;
- user errors through the API; a killed run resumes to the uninterrupted tables.

The matrices the reference reads come from ``MoELayer.expert_matrix`` (one expert, one role),
the analysis reads ``expert_stack``: two read paths of the same files.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import moelens as ml
from moelens.checkpoint.registry import families
from moelens.errors import ConfigError, IndexOutOfRangeError, MoelensError, NotMoEError, RunDirectoryError
from moelens.testing.tiny import TinySpec, build_tiny_checkpoint

from .synthetic import write_checkpoint

ROLES = ("gate", "up", "down")
TOL = 1e-5
CUT_TOLERANCE = 1e-6  # docs/methods.md §7: a σ within 1e-6·σ₁ of the cut counts as kept
AMBIGUOUS = 1e-5  # a float64 σ this close (× σ₁) to the cut may fall either side in float32: skip
SQRT2 = math.sqrt(2.0)


def _layouts() -> list[tuple[str, str]]:
    out = []
    for name, cls in families().items():
        if getattr(cls, "is_dense", False):
            continue
        for layout in dict.fromkeys((*cls.tiny_layouts, *getattr(cls, "tiny_custom_layouts", ()))):
            out.append((name, layout))
    return out


LAYOUTS = _layouts()
QUANTISED = {("gpt_oss", "mxfp4"), ("deepseek_v3", "fp8")}
CASES = [pytest.param(f, lay, "float32", id=f"{f}-{lay}") for f, lay in LAYOUTS] + [
    pytest.param("mixtral", "per_expert", "bfloat16", id="mixtral-per_expert-bf16"),
    pytest.param("qwen3_moe", "fused", "bfloat16", id="qwen3_moe-fused-bf16"),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- checkpoints ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint, tmp_path_factory) -> Callable[..., Path]:
    """``ckpt(family, layout, dtype="float32", seed=0)``: seed 0 is the session's fixture, other
    seeds are built here once per module."""
    root = tmp_path_factory.mktemp("distance-ckpt")
    built: dict[tuple, Path] = {}

    def make(family: str, layout: str = "per_expert", dtype: str = "float32", seed: int = 0) -> Path:
        if seed == 0:
            return tiny_checkpoint(family, layout, dtype)
        key = (family, layout, dtype, seed)
        if key not in built:
            built[key] = build_tiny_checkpoint(TinySpec(family, layout, dtype), root / f"{family}-{layout}-{dtype}-s{seed}", seed=seed)
        return built[key]

    return make


def rewrite(src: Path, dst: Path, change: Callable[[str, torch.Tensor], torch.Tensor], rename: Callable[[str], str] | None = None) -> Path:
    """A copy of the checkpoint ``src`` with every tensor passed through ``change(name, tensor)``
    (stored under ``rename(name)`` when given; other files copied as they are)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
            continue
        with safe_open(str(f), "pt") as handle:
            metadata = handle.metadata()
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        sources = {(rename(name) if rename else name): name for name in tensors}
        out = {new: change(old, tensors[old]).contiguous() for new, old in sources.items()}
        save_file(out, str(dst / f.name), metadata=metadata)
    return dst


def perturbed_copy(src: Path, dst: Path, eps: float = 0.05, seed: int = 1) -> Path:
    """``src`` with noise of ``eps`` × its own std added to every floating matrix (experts, fused
    or not, whatever their names): a 'fine-tune' of the same architecture."""
    g = torch.Generator().manual_seed(seed)

    def change(name: str, t: torch.Tensor) -> torch.Tensor:
        if t.ndim < 2 or not t.is_floating_point() or t.dtype.itemsize < 2:
            return t
        x = t.double()
        noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
        return (x + eps * x.std() * noise).to(t.dtype)

    return rewrite(src, dst, change)


MIXTRAL_EXPERT = re.compile(r"layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
MIXTRAL_ROLE = {"w1": "gate", "w3": "up", "w2": "down"}


def mixtral_copy(src: Path, dst: Path, expert: Callable[[int, int, str, torch.Tensor], torch.Tensor], rename_expert: Callable[[int, int], int] | None = None) -> Path:
    """A copy of a per-expert Mixtral checkpoint whose expert matrices are ``expert(L, e, role, W)``
    ([out, in] as stored), optionally stored under expert ``rename_expert(L, e)``."""

    def change(name: str, t: torch.Tensor) -> torch.Tensor:
        m = MIXTRAL_EXPERT.search(name)
        if m is None:
            return t
        return expert(int(m[1]), int(m[2]), MIXTRAL_ROLE[m[3]], t)

    def rename(name: str) -> str:
        m = MIXTRAL_EXPERT.search(name)
        if m is None or rename_expert is None:
            return name
        new = rename_expert(int(m[1]), int(m[2]))
        return name.replace(f".experts.{m[2]}.", f".experts.{new}.")

    return rewrite(src, dst, change, rename if rename_expert else None)


# -- the float64 reference --------------------------------------------------------------------------

class Side:
    """float64 SVD of one matrix: U [out, r], V [in, r], n_X, and whether the count is ambiguous
    (a σ within AMBIGUOUS·σ₁ of the cut, where float32 may decide otherwise)."""

    def __init__(self, w: torch.Tensor, gamma: float, top_sv: int | None):
        w = w.double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        self.u, self.v = u.numpy(), vh.T.numpy()
        s1 = float(s[0])
        self.ambiguous = False
        if s1 == 0.0:
            self.n = 0
            return
        rank = int((s > max(w.shape) * torch.finfo(torch.float64).eps * s1).sum())
        if top_sv is not None:
            self.n = min(top_sv, rank)
        else:
            self.n = min(int((s >= (gamma - CUT_TOLERANCE) * s1).sum()), rank)
            self.ambiguous = bool(((s - gamma * s1).abs() <= AMBIGUOUS * s1).any())


def ref_overlap(a: Side, b: Side) -> tuple[float, int]:
    """(Σ_{i,j≤n} (u_iᴬ·u_jᴮ)(v_iᴬ·v_jᴮ), n) by an explicit double loop over i, j."""
    n = min(a.n, b.n)
    uu = (a.u[:, :n].T @ b.u[:, :n]).tolist()  # uu[i][j] = u_iᴬ·u_jᴮ
    vv = (a.v[:, :n].T @ b.v[:, :n]).tolist()  # vv[i][j] = v_iᴬ·v_jᴮ
    total = 0.0
    for i in range(n):
        for j in range(n):
            total += uu[i][j] * vv[i][j]
    return total, n


def ref_rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return math.nan
    return float(np.linalg.norm(a / na - b / nb))


class Reference:
    """Reads matrices expert by expert and caches their float64 SVDs."""

    def __init__(self, gamma: float = 0.3, top_sv: int | None = None):
        self.gamma, self.top_sv = gamma, top_sv
        self._w: dict = {}
        self._svd: dict = {}

    def matrix(self, model, L: int, e: int, role: str) -> torch.Tensor:
        key = (id(model), L, e, role)
        if key not in self._w:
            self._w[key] = model.layer(L).expert_matrix(e, role).double()
        return self._w[key]

    def side(self, model, L: int, e: int, role: str) -> Side:
        key = (id(model), L, e, role)
        if key not in self._svd:
            self._svd[key] = Side(self.matrix(model, L, e, role), self.gamma, self.top_sv)
        return self._svd[key]

    def pair(self, ma, mb, L: int, i: int, j: int, matrices, pool: str) -> dict[str, dict]:
        """Expected rows {matrix: {rel_l2, sv_align, n_sv, ambiguous}} of one pair."""
        rows = {}
        for role in matrices:
            a, b = self.side(ma, L, i, role), self.side(mb, L, j, role)
            ov, n = ref_overlap(a, b)
            rows[role] = {
                "rel_l2": ref_rel_l2(self.matrix(ma, L, i, role).numpy(), self.matrix(mb, L, j, role).numpy()),
                "sv_align": ov / n if n else math.nan, "overlap": ov, "n_sv": n, "ambiguous": a.ambiguous or b.ambiguous,
            }
        cat_a = np.concatenate([self.matrix(ma, L, i, r).numpy().ravel() for r in matrices])
        cat_b = np.concatenate([self.matrix(mb, L, j, r).numpy().ravel() for r in matrices])
        parts = [rows[r] for r in matrices]
        n_total = sum(p["n_sv"] for p in parts)
        if pool == "mean":
            sv = float(np.mean([p["sv_align"] for p in parts]))
        else:  # Ito: Σ_m n_m R_m / Σ_m n_m
            sv = sum(p["overlap"] for p in parts) / n_total if n_total else math.nan
        rows["expert"] = {"rel_l2": ref_rel_l2(cat_a, cat_b), "sv_align": sv, "n_sv": n_total, "ambiguous": any(p["ambiguous"] for p in parts)}
        return rows


def check_against_reference(run: ml.Run, ref: Reference, ma, mb, pool: str, matrices=ROLES) -> tuple[int, int]:
    """Every row of ``run`` against the reference; returns (rows checked, rows whose sv_align and
    n_sv were skipped for an ambiguous count)."""
    t = run["expert_distance"]
    pairing = run.manifest["options"]["pairing"]
    mb = ma if mb is None else mb
    expected_keys = set()
    rows = {}
    for r in t.itertuples(index=False):
        rows.setdefault((r.layer, r.expert_a, r.expert_b, r.matrix), []).append(r)
    checked = skipped = 0
    bad: list[str] = []
    for L in run.manifest["options"]["layers"]:
        E = ma.layer(L).n_experts
        pairs = [(e, e) for e in range(E)] if pairing == "base-tuned" else [(i, j) for i in range(E) for j in range(i + 1, E)]
        for i, j in pairs:
            exp = ref.pair(ma, mb, L, i, j, matrices, pool)
            for m, want in exp.items():
                expected_keys.add((L, i, j, m))
                got = rows.get((L, i, j, m), [])
                assert len(got) == 1, f"layer {L} pair ({i}, {j}) {m}: {len(got)} rows"
                g = got[0]
                checked += 1
                if not abs(g.rel_l2 - want["rel_l2"]) <= TOL:
                    bad.append(f"L{L} ({i},{j}) {m} rel_l2 {g.rel_l2!r} != {want['rel_l2']!r}")
                if want["ambiguous"]:
                    skipped += 1
                    continue
                if int(g.n_sv) != want["n_sv"]:
                    bad.append(f"L{L} ({i},{j}) {m} n_sv {g.n_sv} != {want['n_sv']}")
                if not abs(g.sv_align - want["sv_align"]) <= TOL:
                    bad.append(f"L{L} ({i},{j}) {m} sv_align {g.sv_align!r} != {want['sv_align']!r}")
    got_keys = set(zip(t.layer, t.expert_a, t.expert_b, t.matrix))
    assert got_keys == expected_keys, f"rows not expected: {sorted(got_keys - expected_keys)[:5]}, missing: {sorted(expected_keys - got_keys)[:5]}"
    assert len(t) == len(expected_keys)
    assert (t.pairing == pairing).all()
    assert not bad, f"{len(bad)} of {checked} rows differ from the float64 reference:\n" + "\n".join(bad[:20])
    return checked, skipped


def _distance(a, b=None, **kw) -> ml.Run:
    kw.setdefault("device", "cpu")
    return ml.expert_distance(a, b, **kw)


# -- 1. the float64 reference on every family and layout --------------------------------------------

@pytest.mark.parametrize("family,layout,dtype", CASES)
def test_every_row_matches_the_float64_reference(ckpt, tmp_path, family, layout, dtype):
    path = ckpt(family, layout, dtype)
    if (family, layout) in QUANTISED:
        partner = ckpt(family, layout, dtype, seed=1)  # quantised bytes are not perturbed; another seed
    else:
        partner = perturbed_copy(path, tmp_path / "tuned", eps=0.05)
    a, b = ml.open_model(path), ml.open_model(partner)
    ref = Reference()
    total = skipped = 0
    for pool in ("mean", "ito"):
        within = _distance(a, pool=pool)
        assert within.manifest["options"]["pairing"] == "within"
        c, s = check_against_reference(within, ref, a, None, pool)
        total, skipped = total + c, skipped + s
        tuned = _distance(a, b, pool=pool)
        assert tuned.manifest["options"]["pairing"] == "base-tuned"
        c, s = check_against_reference(tuned, ref, a, b, pool)
        total, skipped = total + c, skipped + s
        if (family, layout) not in QUANTISED:
            # the copy really differs, and only a little: a fine-tune, not another model
            r = tuned["expert_distance"]["rel_l2"]
            assert (r > 1e-3).all() and (r < 0.2).all(), r.describe()
    assert skipped <= total // 10, f"{skipped} of {total} rows skipped for an ambiguous count"


@pytest.mark.parametrize("options", [
    {"dtype": "float64"},
    {"gamma": 0.01},  # keeps σ far below 0.05·σ₁ on square matrices: the float64 refinement path
    {"top_sv": 32},  # every direction of a 32 × 32 matrix
    {"top_sv": 3, "matrices": ("down", "gate")},
    {"gamma": 1.0},  # n = 1 (or the few σ within 1e-6·σ₁ of σ₁)
], ids=["float64", "gamma0.01", "top_sv32", "top_sv3-down-gate", "gamma1"])
def test_options_match_the_float64_reference(ckpt, tmp_path, options):
    path = ckpt("deepseek_v3", "per_expert")  # F = d = 32: square experts, σ down to ~0
    a, b = ml.open_model(path), ml.open_model(perturbed_copy(path, tmp_path / "tuned", eps=0.05))
    matrices = options.get("matrices", ROLES)
    ref = Reference(options.get("gamma", 0.3), options.get("top_sv"))
    for pool in ("mean", "ito"):
        for other in (None, b):
            run = _distance(a, other, pool=pool, **options)
            assert run.manifest["options"]["matrices"] == list(matrices)
            check_against_reference(run, ref, a, other, pool, matrices)
    if "top_sv" in options:
        assert (run["expert_distance"].query("matrix != 'expert'").n_sv == options["top_sv"]).all()


# -- 2. known by construction ---------------------------------------------------------------------

def test_a_model_against_itself_is_at_distance_zero(ckpt):
    for family, layout in (("mixtral", "per_expert"), ("gpt_oss", "fused"), ("qwen3_moe", "fused")):
        path = ckpt(family, layout)
        for pool in ("mean", "ito"):
            t = _distance(path, path, pool=pool)["expert_distance"]
            assert t.rel_l2.abs().max() <= TOL, (family, layout, t.rel_l2.max())
            assert (t.sv_align - 1).abs().max() <= TOL, (family, layout, t.sv_align.min())
            assert (t.n_sv > 0).all()


def test_negated_and_scaled_copies(ckpt, tmp_path):
    """B = 4·A: rel_l2 0, R 1 (both measures ignore scale). B = (−gate, up, down): the gate row has
    rel_l2 = 2 and R = −1 (−W = (−U) Σ Vᵀ), the whole expert rel_l2 = 2‖gate‖/‖A‖, sv_align
    (−1 + 1 + 1)/3 with pool mean and (n_up + n_down − n_gate)/(n_gate + n_up + n_down) with ito."""
    path = ckpt("mixtral", "per_expert")
    a = ml.open_model(path)
    scaled = mixtral_copy(path, tmp_path / "scaled", lambda L, e, role, w: w * 4.0)
    negated = mixtral_copy(path, tmp_path / "negated", lambda L, e, role, w: -w if role == "gate" else w)
    t = _distance(a, scaled)["expert_distance"]
    assert t.rel_l2.abs().max() <= TOL and (t.sv_align - 1).abs().max() <= TOL
    for pool in ("mean", "ito"):
        t = _distance(a, negated, pool=pool)["expert_distance"]
        rows = {m: t[t.matrix == m].set_index(["layer", "expert_a"]) for m in (*ROLES, "expert")}
        np.testing.assert_allclose(rows["gate"].rel_l2, 2.0, atol=TOL)
        np.testing.assert_allclose(rows["gate"].sv_align, -1.0, atol=TOL)
        for m in ("up", "down"):
            np.testing.assert_allclose(rows[m].rel_l2, 0.0, atol=TOL)
            np.testing.assert_allclose(rows[m].sv_align, 1.0, atol=TOL)
        for (L, e), row in rows["expert"].iterrows():
            norms = {r: float(a.layer(L).expert_matrix(e, r).double().norm()) ** 2 for r in ROLES}
            assert row.rel_l2 == pytest.approx(2 * math.sqrt(norms["gate"] / sum(norms.values())), abs=TOL)
            n = {r: int(rows[r].loc[(L, e)].n_sv) for r in ROLES}
            assert row.n_sv == sum(n.values())
            want = 1 / 3 if pool == "mean" else (n["up"] + n["down"] - n["gate"]) / sum(n.values())
            assert row.sv_align == pytest.approx(want, abs=TOL)
        # −W has the σ of W: the pair (e, e) keeps A's own n_X
        ref = Reference()
        for r in t[t.matrix != "expert"].itertuples():
            side = ref.side(a, r.layer, r.expert_a, r.matrix)
            assert side.ambiguous or r.n_sv == side.n


def test_renumbered_experts_give_the_within_pairs(ckpt, tmp_path):
    """B's expert e is A's expert π(e): base→tuned row (e, e) is the within row of A's pair
    {e, π(e)}, both measures being symmetric."""
    path = ckpt("mixtral", "per_expert")
    perm = {0: [1, 2, 3, 0], 1: [2, 3, 1, 0]}  # π per layer; derangements

    def rename(L: int, e: int) -> int:  # A's expert π(e') is stored as B's expert e'
        return perm[L].index(e)

    renumbered = mixtral_copy(path, tmp_path / "renumbered", lambda L, e, role, w: w, rename)
    within = _distance(path)["expert_distance"].set_index(["layer", "expert_a", "expert_b", "matrix"])
    tuned = _distance(path, renumbered)["expert_distance"]
    assert len(tuned) == 2 * 4 * 4
    for r in tuned.itertuples():
        i, j = sorted((r.expert_a, perm[r.layer][r.expert_a]))
        w = within.loc[(r.layer, i, j, r.matrix)]
        assert r.rel_l2 == pytest.approx(w.rel_l2, abs=1e-6)
        assert r.sv_align == pytest.approx(w.sv_align, abs=1e-6)
        assert r.n_sv == w.n_sv


def test_neuron_permuted_copy_is_far_in_weights(ckpt, tmp_path):
    """Permuting the hidden neurons of an expert (rows of gate and up, columns of down) leaves its
    function unchanged but not its weights: the two measures see random-looking matrices, which
    is why weight matching (Ito et al.) aligns permutations first. P·W has U → PU and the same V,
    so R = (1/n) Σ_i u_iᵀ P u_i ≈ (fixed points of P)/F ≈ 0 and rel_l2 ≈ √(2 − 2·fixed/F) ≈ √2.
    Observed on tiny Mixtral (F = 48, d = 32, n 23–26), every row: rel_l2 1.339–1.431 (mean 1.397),
    sv_align −0.012…+0.094 (mean +0.030: the fixed points of P, ~1/F, push it above 0)."""
    path = ckpt("mixtral", "per_expert")
    g = torch.Generator().manual_seed(3)
    perms = {(L, e): torch.randperm(48, generator=g) for L in range(2) for e in range(4)}
    assert all(not torch.equal(p, torch.arange(48)) for p in perms.values())

    def permute(L: int, e: int, role: str, w: torch.Tensor) -> torch.Tensor:
        p = perms[(L, e)]
        return w[:, p] if role == "down" else w[p]

    permuted = mixtral_copy(path, tmp_path / "permuted", permute)
    # the copy computes the same function: y = W_down (silu(W_gate x) ⊙ W_up x)
    a, b = ml.open_model(path), ml.open_model(permuted)
    x = torch.randn(32, 5, generator=g, dtype=torch.float64)
    for L in range(2):
        for e in range(4):
            ea, eb = a.layer(L).expert(e), b.layer(L).expert(e)
            ya = ea.down.double() @ (torch.nn.functional.silu(ea.gate.double() @ x) * (ea.up.double() @ x))
            yb = eb.down.double() @ (torch.nn.functional.silu(eb.gate.double() @ x) * (eb.up.double() @ x))
            torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
    for pool in ("mean", "ito"):
        t = _distance(a, b, pool=pool)["expert_distance"]
        assert t.rel_l2.between(SQRT2 - 0.1, SQRT2 + 0.1).all(), t.rel_l2.describe()
        assert t.sv_align.abs().max() < 0.15, t.sv_align.describe()
        assert abs(t.sv_align.mean()) < 0.05
    # the same copy with the identity permutation is the model itself
    same = mixtral_copy(path, tmp_path / "identity", lambda L, e, role, w: w[:, torch.arange(48)] if role == "down" else w[torch.arange(48)])
    t = _distance(a, same)["expert_distance"]
    assert t.rel_l2.abs().max() <= TOL and (t.sv_align - 1).abs().max() <= TOL


@pytest.mark.parametrize("family,layout", [("mixtral", "per_expert"), ("qwen3_moe", "fused"), ("deepseek_v3", "per_expert"), ("gpt_oss", "fused")],
                         ids=["48x32", "24x32", "32x32", "32x64"])
def test_unrelated_random_experts(ckpt, family, layout):
    """Seed 0 against seed 1, and pairs within one random model: rel_l2 ≈ √2 and R ≈ 0.
    For i.i.d. matrices E⟨A, B⟩ = 0 with spread ~1/√(F·d) in the cosine, so rel_l2 stays within
    ~0.05 of √2 on these shapes; R has mean 0 and spread ~1/√(F·d) ≈ 0.03. Observed (all four
    shapes, both pairings, every row): rel_l2 in [1.356, 1.484], means 1.397–1.429; sv_align in
    [−0.109, +0.066], means −0.025…+0.017."""
    a = ckpt(family, layout)
    b = ckpt(family, layout, seed=1)
    for run in (_distance(a, b), _distance(a, b, pool="ito"), _distance(a)):
        t = run["expert_distance"]
        assert t.rel_l2.between(SQRT2 - 0.1, SQRT2 + 0.1).all(), t.rel_l2.describe()
        assert t.sv_align.abs().max() < 0.2, t.sv_align.describe()
        assert abs(t.rel_l2.mean() - SQRT2) < 0.03
        assert abs(t.sv_align.mean()) < 0.05
        assert (t.n_sv > 0).all()


def test_pools_from_the_per_matrix_rows_of_the_same_table(ckpt, tmp_path):
    """matrix = expert: sv_align = mean_m R_m (pool mean) or Σ n_m R_m / Σ n_m (pool ito), n_sv
    = Σ n_m, over the matrices asked for only; rel_l2 of the concatenation is not a mean."""
    path = ckpt("qwen2_moe", "fused")
    tuned = perturbed_copy(path, tmp_path / "tuned", eps=0.2)
    for other in (None, tuned):
        for matrices in (ROLES, ("down", "gate"), ("up",)):
            tables = {}
            for pool in ("mean", "ito"):
                t = _distance(path, other, pool=pool, matrices=matrices)["expert_distance"]
                assert set(t.matrix) == {*matrices, "expert"}
                keys = ["layer", "expert_a", "expert_b"]
                per = t[t.matrix != "expert"]
                whole = t[t.matrix == "expert"].set_index(keys).sort_index()
                n = per.groupby(keys).n_sv.sum().sort_index()
                weighted = (per.sv_align * per.n_sv).groupby([per[k] for k in keys]).sum().sort_index()
                mean = per.groupby(keys).sv_align.mean().sort_index()
                np.testing.assert_array_equal(whole.n_sv.to_numpy(), n.to_numpy())
                want = mean if pool == "mean" else weighted / n
                np.testing.assert_allclose(whole.sv_align.to_numpy(), want.to_numpy(), rtol=0, atol=1e-12)
                tables[pool] = t
            # the pool changes nothing but the expert row's sv_align
            a, b = tables["mean"], tables["ito"]
            pd.testing.assert_frame_equal(a.drop(columns="sv_align"), b.drop(columns="sv_align"))
            pd.testing.assert_series_equal(a[a.matrix != "expert"].sv_align, b[b.matrix != "expert"].sv_align)
            if len(matrices) == 1:
                pd.testing.assert_series_equal(a.sv_align, b.sv_align)


def _pandas_summary(pairs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (layer, pairing, matrix), g in pairs.groupby(["layer", "pairing", "matrix"]):
        for measure in ("rel_l2", "sv_align"):
            v = g[measure].dropna()
            q = np.quantile(v.to_numpy(), [0.25, 0.5, 0.75], method="linear") if len(v) else [np.nan] * 3
            rows.append({
                "layer": layer, "pairing": pairing, "matrix": matrix, "measure": measure,
                "mean": v.mean(), "std": v.std(ddof=0), "min": v.min(), "q25": q[0], "median": v.median(),
                "q75": q[2], "max": v.max(), "n": len(v),
            })
    return pd.DataFrame(rows)


def _assert_summary(run: ml.Run) -> None:
    got = run["expert_distance_layers"]
    assert list(got.columns) == ["layer", "pairing", "matrix", "measure", "mean", "std", "min", "q25", "median", "q75", "max", "n"]
    want = _pandas_summary(run["expert_distance"])
    keys = ["layer", "pairing", "matrix", "measure"]
    assert not got.duplicated(keys).any()
    g = got.set_index(keys).sort_index()
    w = want.set_index(keys).sort_index()
    assert list(g.index) == list(w.index)
    for col in ("mean", "std", "min", "q25", "median", "q75", "max"):
        np.testing.assert_allclose(g[col].to_numpy(), w[col].to_numpy(), rtol=1e-12, atol=1e-12, err_msg=col)
    np.testing.assert_array_equal(g["n"].to_numpy(), w["n"].to_numpy())


def test_layers_table_is_the_pandas_summary_of_the_pairs(ckpt, tmp_path):
    path = ckpt("qwen2_moe", "per_expert")  # MoE layers 0, 1, 3
    tuned = perturbed_copy(path, tmp_path / "tuned", eps=0.1)
    for run in (_distance(path), _distance(path, tuned, pool="ito"), _distance(path, layers=[3, 0], matrices=("up",))):
        _assert_summary(run)
        s = run["expert_distance_layers"]
        n_pairs = 6 if run.manifest["options"]["pairing"] == "within" else 4
        assert (s.n == n_pairs).all()
        assert (s.q25 <= s["median"]).all() and (s["median"] <= s.q75).all() and (s["min"] <= s.q25).all() and (s.q75 <= s["max"]).all()


def test_pair_structure_of_each_pairing(ckpt, tmp_path):
    path = ckpt("qwen3_next", "fused")  # MoE layers 0, 2, 3; E = 4
    model = ml.open_model(path)
    E = model.n_experts
    within = _distance(model)["expert_distance"]
    assert sorted(set(within.layer)) == model.moe_layers == [0, 2, 3]
    for _, g in within.groupby(["layer", "matrix"]):
        assert len(g) == E * (E - 1) // 2
        assert (g.expert_a < g.expert_b).all()
        assert sorted(zip(g.expert_a, g.expert_b)) == [(i, j) for i in range(E) for j in range(i + 1, E)]
    assert set(within.matrix) == {*ROLES, "expert"}
    tuned = _distance(model, ckpt("qwen3_next", "fused", seed=1), layers="2-3")["expert_distance"]
    assert sorted(set(tuned.layer)) == [2, 3]
    for _, g in tuned.groupby(["layer", "matrix"]):
        assert len(g) == E and (g.expert_a == g.expert_b).all() and sorted(g.expert_a) == list(range(E))
    for t in (within, tuned):
        assert list(t.columns) == ["layer", "pairing", "expert_a", "expert_b", "matrix", "rel_l2", "sv_align", "n_sv"]
        assert t.rel_l2.between(0, 2).all() and t.sv_align.between(-1, 1).all()


def test_a_zero_matrix_gives_nan_and_a_warning(ckpt, tmp_path):
    """docs/methods.md §7: a zero matrix has no sv_align (NaN, warning in the run's log); its rel_l2 is
    undefined too; Ito's pool leaves it out, the mean pool cannot."""
    path = ckpt("mixtral", "per_expert")
    zeroed = mixtral_copy(path, tmp_path / "zeroed", lambda L, e, role, w: torch.zeros_like(w) if (L, e, role) == (0, 1, "gate") else w)
    runs = {pool: _distance(zeroed, pool=pool) for pool in ("mean", "ito")}
    t = runs["mean"]["expert_distance"]
    hit = (t.layer == 0) & ((t.expert_a == 1) | (t.expert_b == 1))
    gate = t[hit & (t.matrix == "gate")]
    assert len(gate) == 3 and gate.rel_l2.isna().all() and gate.sv_align.isna().all() and (gate.n_sv == 0).all()
    assert t[~hit | (t.matrix != "gate")].drop(columns="sv_align").notna().all().all()
    assert t[hit & (t.matrix == "expert")].sv_align.isna().all()
    assert t[~(hit & t.matrix.isin(["gate", "expert"]))].sv_align.notna().all()
    ito = runs["ito"]["expert_distance"]
    expert = ito[hit & (ito.matrix == "expert")]
    assert expert.sv_align.notna().all() and expert.rel_l2.notna().all()
    warnings = json.dumps(runs["mean"].manifest["warnings"])
    assert "layer 0" in warnings and "gate" in warnings and "zero" in warnings
    s = runs["mean"]["expert_distance_layers"].set_index(["layer", "matrix", "measure"])
    assert s.loc[(0, "gate", "sv_align"), "n"] == 3 and s.loc[(0, "gate", "rel_l2"), "n"] == 3
    assert s.loc[(1, "gate", "sv_align"), "n"] == 6
    _assert_summary(runs["mean"])
    ref = Reference()
    for pool, run in runs.items():
        model = ml.open_model(zeroed)
        tt = run["expert_distance"]
        for r in tt[tt.layer == 0].itertuples():
            want = ref.pair(model, model, 0, r.expert_a, r.expert_b, ROLES, pool)[r.matrix]
            for k in ("rel_l2", "sv_align"):
                assert (math.isnan(want[k]) and math.isnan(getattr(r, k))) or getattr(r, k) == pytest.approx(want[k], abs=TOL), (pool, r, want)


# -- 3. the trained small zoo ------------------------------------------------------------------------

@pytest.mark.slow
def test_zoo_base_to_tuned_is_far_closer_than_pairs_within_a_layer(small_zoo):
    base, tuned = ml.open_model(small_zoo.base), ml.open_model(small_zoo.tuned)
    bt = _distance(base, tuned)
    wi = _distance(base)
    _assert_summary(bt)
    _assert_summary(wi)
    figures = []
    ok = True
    for L in base.moe_layers:
        x = bt["expert_distance"].query("layer == @L and matrix == 'expert'")
        y = wi["expert_distance"].query("layer == @L and matrix == 'expert'")
        fig = (L, x.rel_l2.mean(), y.rel_l2.mean(), x.sv_align.mean(), y.sv_align.mean())
        figures.append("layer %d: rel_l2 base-tuned %.4f vs within %.4f; sv_align base-tuned %.4f vs within %.4f" % fig)
        ok &= fig[1] < fig[2] and fig[3] > fig[4]
    report = "\n".join(figures)
    print(report)
    assert ok, report
    # far closer, not merely closer: every base→tuned pair beats every within pair
    for L in base.moe_layers:
        x, y = (r["expert_distance"] for r in (bt, wi))
        x, y = x[(x.layer == L) & (x.matrix == "expert")], y[(y.layer == L) & (y.matrix == "expert")]
        assert x.rel_l2.max() < y.rel_l2.min() and x.sv_align.min() > y.sv_align.max(), report
    ref = Reference()
    check_against_reference(bt, ref, base, tuned, "mean")
    check_against_reference(wi, ref, base, None, "mean")


# -- 4. bad input through the API -----------------------------------------------------------------

@pytest.fixture(scope="module")
def other_shapes(tmp_path_factory) -> dict[str, Path]:
    """Mixtral-layout checkpoints that differ from each other in one way each."""
    root = tmp_path_factory.mktemp("shapes")
    g = torch.Generator().manual_seed(0)

    def write(name: str, n_layers: int = 2, n_experts: int = 4, d: int = 32, f: int = 48) -> Path:
        return write_checkpoint(
            root / name, "mixtral", n_layers, n_experts, d, f,
            router=lambda L: torch.randn(n_experts, d, generator=g),
            expert=lambda L, e, role: torch.randn((d, f) if role == "down" else (f, d), generator=g),
        )

    return {
        "base": write("base"), "experts5": write("experts5", n_experts=5), "ffn40": write("ffn40", f=40),
        "layers3": write("layers3", n_layers=3),
    }


def _api_error(out: Path, a, b=None, **kw) -> MoelensError:
    with pytest.raises(MoelensError) as info:
        _distance(a, b, out=out, **kw)
    assert not out.exists() or not any(out.iterdir()), "a refused run left files behind"
    return info.value


@pytest.mark.parametrize("case,kind,message", [
    ("families", ConfigError, r"is a mixtral model and .* a qwen3_moe model"),
    ("experts", ConfigError, r"n_experts = 4 and .* n_experts = 5"),
    ("ffn", ConfigError, r"expert_ffn = 48 and .* expert_ffn = 40"),
    ("layers", ConfigError, r"MoE layers 0-1 and .* 0-2"),
    ("dense_a", NotMoEError, r"dense llama model"),
    ("dense_b", MoelensError, r"llama"),
    ("gamma0", ConfigError, r"gamma must lie in \(0, 1\], got 0"),
    ("gamma1.5", ConfigError, r"gamma must lie in \(0, 1\], got 1\.5"),
    ("top_sv", ConfigError, r"top_sv = 33 exceeds min\(rows, cols\) = 32"),
    ("top_sv0", ConfigError, r"top_sv must be an integer ≥ 1"),
    ("within_two", ConfigError, r"run each model alone"),
    ("base_tuned_one", ConfigError, r"needs two models"),
    ("matrices", ConfigError, r"unknown matrix 'foo'"),
    ("matrices_twice", ConfigError, r"name a matrix twice"),
    ("pool", ConfigError, r"unknown pool 'max'"),
    ("pairing", ConfigError, r"unknown pairing 'cluster'"),
    ("layer_range", IndexOutOfRangeError, r"layer 7 is out of range"),
    ("dense_layer", NotMoEError, r"layer 0 .* is dense"),
    ("layers_empty", ConfigError, r"layer list is empty"),
    ("layers_twice", ConfigError, r"name a layer twice"),
    ("dtype", ConfigError, r"unknown compute dtype 'bfloat16'"),
    ("device", ConfigError, r"unknown device 'tpu'"),
])
def test_bad_input_through_the_api(ckpt, other_shapes, tmp_path, case, kind, message):
    mixtral, qwen, llama = ckpt("mixtral"), ckpt("qwen3_moe"), ckpt("llama")
    calls = {
        "families": lambda: (mixtral, qwen, {}),
        "experts": lambda: (other_shapes["base"], other_shapes["experts5"], {}),
        "ffn": lambda: (other_shapes["base"], other_shapes["ffn40"], {}),
        "layers": lambda: (other_shapes["base"], other_shapes["layers3"], {}),
        "dense_a": lambda: (llama, None, {}),
        "dense_b": lambda: (mixtral, llama, {}),
        "gamma0": lambda: (mixtral, None, {"gamma": 0}),
        "gamma1.5": lambda: (mixtral, None, {"gamma": 1.5}),
        "top_sv": lambda: (mixtral, None, {"top_sv": 33}),  # F = 48, d = 32
        "top_sv0": lambda: (mixtral, None, {"top_sv": 0}),
        "within_two": lambda: (mixtral, ckpt("mixtral", seed=1), {"pairing": "within"}),
        "base_tuned_one": lambda: (mixtral, None, {"pairing": "base-tuned"}),
        "matrices": lambda: (mixtral, None, {"matrices": ("gate", "foo")}),
        "matrices_twice": lambda: (mixtral, None, {"matrices": ("up", "up")}),
        "pool": lambda: (mixtral, None, {"pool": "max"}),
        "pairing": lambda: (mixtral, None, {"pairing": "cluster"}),
        "layer_range": lambda: (mixtral, None, {"layers": [0, 7]}),
        "dense_layer": lambda: (ckpt("qwen3_moe"), None, {"layers": [0]}),  # MoE layers 1, 3
        "layers_empty": lambda: (mixtral, None, {"layers": []}),
        "layers_twice": lambda: (mixtral, None, {"layers": [1, 1]}),
        "dtype": lambda: (mixtral, None, {"dtype": "bfloat16"}),
        "device": lambda: (mixtral, None, {"device": "tpu"}),
    }
    a, b, kw = calls[case]()
    err = _api_error(tmp_path / "run", a, b, **kw)
    assert isinstance(err, kind), repr(err)
    assert re.search(message, str(err)), str(err)
    assert "\n" not in str(err)


def test_top_sv_at_the_limit_is_accepted(ckpt):
    t = _distance(ckpt("mixtral"), top_sv=32, layers=[0], matrices=("down",))["expert_distance"]
    assert (t.query("matrix == 'down'").n_sv == 32).all()


# -- 5. resume -------------------------------------------------------------------------------------

class Killed(Exception):
    """Stands for the process dying at a chosen moment."""


def _kill_when(task: str, done: int):
    def callback(event):
        if event.task == task and event.done == done:
            raise Killed(f"{task} {done}")
    return callback


@pytest.mark.parametrize("pairing", ["within", "base-tuned"])
def test_killed_after_the_first_layer_resumes_to_the_uninterrupted_tables(ckpt, tmp_path, pairing):
    path = ckpt("qwen2_moe", "fused")  # MoE layers 0, 1, 3
    other = ckpt("qwen2_moe", "fused", seed=1) if pairing == "base-tuned" else None
    opts = {"pool": "ito", "gamma": 0.25}
    full = _distance(path, other, out=tmp_path / "full", **opts)
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        _distance(path, other, out=out, progress=_kill_when("layers", 1), **opts)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running"
    assert manifest["completed_units"] == ["L00000"]
    assert not list(out.glob("*.parquet"))
    seen = []
    resumed = _distance(path, other, out=out, progress=lambda ev: seen.append((ev.task, ev.done, ev.message)), **opts)
    assert not any(task == "matrices" and "layer 0 " in msg + " " for task, _, msg in seen), "layer 0 was computed again"
    assert set(full.tables) == set(resumed.tables) == {"expert_distance", "expert_distance_layers"}
    for name in full.tables:
        pd.testing.assert_frame_equal(full[name], resumed[name])
    assert resumed.manifest["status"] == "complete" and resumed.manifest["completed_units"] == ["L00000", "L00001", "L00003"]
    assert not resumed["expert_distance"].duplicated(["layer", "expert_a", "expert_b", "matrix"]).any()
    loaded = ml.load_run(out)
    for name in full.tables:
        pd.testing.assert_frame_equal(full[name], loaded[name])
    # another pool is another run: refused, not mixed
    with pytest.raises(RunDirectoryError):
        _distance(path, other, out=out, pool="mean", gamma=0.25)
