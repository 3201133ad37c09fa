"""Module metrics (docs/methods.md §5, §7) through the analysis, on checkpoints of every family and layout.

- every row of ``module_metrics`` and ``module_metrics_experts`` against a float64 numpy
  reference written apart from moelens (``np.corrcoef``, the cosine, rel_l2 as the norm of a
  difference of normalised matrices, CKA in its out×out form ‖YᵀX‖²/(‖XᵀX‖ ‖YᵀY‖) with X = Aᵀ,
  Y = Bᵀ column-centred, changed_frac with std ddof 0; ``np.linalg.svd`` for the norms and ranks,
  the rank cut σ_i > max(rows, cols)·ε₃₂·σ₁ that :mod:`moelens.metrics.module` documents; α is
  :func:`moelens.metrics.power_law.power_law_alpha` of the float64 σ² — only the spectrum pipeline
  is checked here, the fit itself has its own tests), for A and B, A vs B (``pair``) and the
  deltas from a third model (``pair_delta``);
- which modules each layer has (attention parts per family, dense MLP or routed experts, shared
  experts, router), each once per (metric, model), ``mlp.*`` of an MoE layer the mean of its
  experts' rows;
- values known by construction (identical, negated, scaled, row-permuted copies; a rank-r matrix;
  a zero matrix);
- user errors through the API; a killed run resumes to the uninterrupted tables.

Tolerance: a value agrees with the reference when |got − want| ≤ 1e-5 + 1e-5·|want| (1e-5
absolute and relative); NaN agrees only with NaN.

The reference reads each matrix through the model's public view (``model.attention``,
``model.dense_mlp``, ``MoELayer.expert_matrix``, ``shared_experts``, ``router``), and for DBRX,
GPT-OSS, Llama and Mixtral also straight from the safetensors files.
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
from moelens.errors import ConfigError, IndexOutOfRangeError, MoelensError, RunDirectoryError
from moelens.metrics.power_law import power_law_alpha
from moelens.testing.tiny import TinySpec, build_tiny_checkpoint

from .synthetic import write_checkpoint

TOL = 1e-5
PAIR = ("corr", "cos", "rel_l2", "cka", "changed_frac")
SINGLE = ("fro_norm", "spectral_norm", "stable_rank", "effective_rank", "alpha")
ROLES = ("gate", "up", "down")
EPS32 = 2.0 ** -23  # the ε of the rank cut, as moelens.metrics.module documents (float32's, whatever the dtype)
MIN_EVALS = 8  # α is NaN below min(out, in) = 8 (WeightWatcher skips such matrices)
# attention parts of model.attention(L), named as in docs/methods.md §5 (written here, not imported)
ATTN = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "o": "attn.o",
        "q_a": "attn.q_a", "q_b": "attn.q_b", "kv_a": "attn.kv_a", "kv_b": "attn.kv_b"}


def _layouts() -> list[tuple[str, str]]:
    out = []
    for name, cls in families().items():
        for layout in dict.fromkeys((*cls.tiny_layouts, *getattr(cls, "tiny_custom_layouts", ()))):
            out.append((name, layout))
    return out


LAYOUTS = _layouts()
QUANTISED = {("gpt_oss", "mxfp4"), ("deepseek_v3", "fp8")}
CASES = [pytest.param(f, lay, "float32", id=f"{f}-{lay}") for f, lay in LAYOUTS] + [
    pytest.param("mixtral", "per_expert", "bfloat16", id="mixtral-per_expert-bf16"),
    pytest.param("qwen3_moe", "fused", "bfloat16", id="qwen3_moe-fused-bf16"),
    pytest.param("llama", "per_expert", "bfloat16", id="llama-bf16"),
]

# the largest disagreement seen per metric (absolute, relative), printed at the module's end with -s
WORST: dict[str, list[float]] = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Torch on one thread for the module (two shared cores). At the end, prints (with -s) the
    largest disagreement with the reference seen per metric."""
    yield
    for metric, (abs_err, rel_err) in sorted(WORST.items()):
        print(f"\n{metric:28s} max |Δ| {abs_err:.3e}  max rel {rel_err:.3e}", end="")


# -- checkpoints ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint, tmp_path_factory) -> Callable[..., Path]:
    """``ckpt(family, layout, dtype="float32", seed=0)``: seed 0 is the session's fixture."""
    root = tmp_path_factory.mktemp("modules-ckpt")
    built: dict[tuple, Path] = {}

    def make(family: str, layout: str = "per_expert", dtype: str = "float32", seed: int = 0) -> Path:
        if seed == 0:
            return tiny_checkpoint(family, layout, dtype)
        key = (family, layout, dtype, seed)
        if key not in built:
            built[key] = build_tiny_checkpoint(TinySpec(family, layout, dtype), root / f"{family}-{layout}-{dtype}-s{seed}", seed=seed)
        return built[key]

    return make


def rewrite(src: Path, dst: Path, change: Callable[[str, torch.Tensor], torch.Tensor], config: dict | None = None) -> Path:
    """A copy of the checkpoint ``src`` with every tensor passed through ``change(name, tensor)``
    and ``config`` merged into its config.json (other files copied as they are)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
            continue
        with safe_open(str(f), "pt") as handle:
            metadata = handle.metadata()
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        save_file({name: change(name, t).contiguous() for name, t in tensors.items()}, str(dst / f.name), metadata=metadata)
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def perturbed_copy(src: Path, dst: Path, eps: float = 0.05, seed: int = 1) -> Path:
    """``src`` with noise of ``eps`` × its own std added to every floating tensor."""
    g = torch.Generator().manual_seed(seed)

    def change(name: str, t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point() or t.dtype.itemsize < 2 or t.numel() < 2:
            return t
        x = t.double()
        noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
        return (x + eps * x.std() * noise).to(t.dtype)

    return rewrite(src, dst, change)


def _partners(ckpt, tmp_path: Path, family: str, layout: str, dtype: str = "float32") -> tuple[Path, Path, Path]:
    """(A, B, base): B and base are noisy copies of A (quantised bytes cannot be perturbed: other
    seeds there)."""
    a = ckpt(family, layout, dtype)
    if (family, layout) in QUANTISED:
        return a, ckpt(family, layout, dtype, seed=1), ckpt(family, layout, dtype, seed=2)
    return a, perturbed_copy(a, tmp_path / "b", 0.05, seed=1), perturbed_copy(a, tmp_path / "base", 0.05, seed=2)


def _modules(a, b=None, base=None, **kw) -> ml.Run:
    kw.setdefault("device", "cpu")
    return ml.module_metrics(a, b, base, **kw)


# -- the float64 reference ------------------------------------------------------------------------

def ref_pair(a: np.ndarray, b: np.ndarray, tol: float = 1e-3) -> dict[str, float]:
    fa, fb = a.ravel(), b.ravel()
    na, nb = np.linalg.norm(fa), np.linalg.norm(fb)
    out = {}
    with np.errstate(all="ignore"):
        out["corr"] = float(np.corrcoef(fa, fb)[0, 1]) if fa.std() > 0 and fb.std() > 0 else math.nan
        out["cos"] = float(fa @ fb / (na * nb)) if na > 0 and nb > 0 else math.nan
        out["rel_l2"] = float(np.linalg.norm(a / na - b / nb)) if na > 0 and nb > 0 else math.nan
        x = a.T - a.T.mean(axis=0)  # X = Aᵀ [in, out], each column (output neuron) centred over the inputs
        y = b.T - b.T.mean(axis=0)
        den = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
        out["cka"] = float(np.linalg.norm(y.T @ x) ** 2 / den) if den > 0 else math.nan
        sd = fa.std()  # ddof 0
        out["changed_frac"] = float(np.mean(np.abs(fa - fb) > tol * sd)) if sd > 0 else math.nan
    return out


def ref_single(w: np.ndarray) -> dict[str, float]:
    s = np.linalg.svd(w, compute_uv=False)  # float64, descending
    fro = float(np.sqrt(np.sum(w * w)))
    out = {"fro_norm": fro, "spectral_norm": float(s[0])}
    if s[0] == 0:
        return {**out, "stable_rank": math.nan, "effective_rank": math.nan, "alpha": math.nan}
    out["stable_rank"] = fro ** 2 / float(s[0]) ** 2
    kept = s[s > max(w.shape) * EPS32 * s[0]]
    p = kept / kept.sum()
    out["effective_rank"] = float(np.exp(-np.sum(p * np.log(p))))
    out["alpha"] = power_law_alpha(s ** 2) if min(w.shape) >= MIN_EVALS else math.nan
    return out


def shared_name(i: int, role: str) -> str:
    return f"shared.{role}" if i == 0 else f"shared{i}.{role}"


def read_modules(model, L: int) -> tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]]]:
    """({module: matrix} of plain modules, {module: [matrix per routed expert]}) of layer L, float64."""
    plain: dict[str, np.ndarray] = {}
    routed: dict[str, list[np.ndarray]] = {}
    for key, w in model.attention(L).items():
        if w.ndim != 2:
            continue  # GPT-OSS sinks: one number per head
        plain[ATTN[key]] = w.double().numpy()  # a KeyError here: an attention matrix docs/methods.md §5 does not name
    if L in set(model.moe_layers):
        layer = model.layer(L)
        for role in ROLES:
            try:
                routed[f"mlp.{role}"] = [layer.expert_matrix(e, role).double().numpy() for e in range(layer.n_experts)]
            except ConfigError:
                pass
        for i, expert in enumerate(layer.shared_experts()):
            for role in ROLES:
                w = getattr(expert, role)
                if w is not None:
                    plain[shared_name(i, role)] = w.double().numpy()
        plain["router"] = layer.router().weight.double().numpy()
    else:
        for role, w in model.dense_mlp(L).items():
            plain[f"mlp.{role}"] = w.double().numpy()
    return plain, routed


def _close(got: float, want: float) -> bool:
    if math.isnan(want) or math.isnan(got):
        return math.isnan(want) and math.isnan(got)
    return abs(got - want) <= TOL + TOL * abs(want)


def _track(metric: str, got: float, want: float) -> None:
    if math.isnan(got) or math.isnan(want):
        return
    err = abs(got - want)
    w = WORST.setdefault(metric, [0.0, 0.0])
    w[0] = max(w[0], err)
    w[1] = max(w[1], err / abs(want) if want else err)


def _values(m: dict[str, np.ndarray], pair: tuple[str, ...], single: tuple[str, ...], tol: float) -> dict[tuple[str, str], float]:
    """{(metric, model): value} of one module given its matrix in each model ("a", "b", "base")."""
    out = {}
    for name in ("a", "b") if single else ():
        if name in m:
            out.update({(metric, name): v for metric, v in ref_single(m[name]).items() if metric in single})
    if pair:
        other = m["b"] if "b" in m else m["base"]
        out.update({(metric, "pair"): v for metric, v in ref_pair(m["a"], other, tol).items() if metric in pair})
        if "b" in m and "base" in m:
            deltas = ref_pair(m["a"] - m["base"], m["b"] - m["base"], tol)
            out.update({(metric, "pair_delta"): v for metric, v in deltas.items() if metric in pair})
    return out


def expected_rows(models: dict, layers: list[int], pair: tuple[str, ...], single: tuple[str, ...], tol: float = 1e-3):
    """({(layer, module, metric, model): value}, {(layer, module, expert, metric, model): value})."""
    rows: dict[tuple, float] = {}
    experts: dict[tuple, float] = {}
    for L in layers:
        read = {name: read_modules(m, L) for name, m in models.items()}
        plain_a, routed_a = read["a"]
        assert set(routed_a).isdisjoint(plain_a)
        for name, (plain, routed) in read.items():
            assert set(plain) == set(plain_a) and set(routed) == set(routed_a), (name, L)
        for module in plain_a:
            for (metric, model), v in _values({n: r[0][module] for n, r in read.items()}, pair, single, tol).items():
                rows[(L, module, metric, model)] = v
        for module, mats in routed_a.items():
            per = [_values({n: r[1][module][e] for n, r in read.items()}, pair, single, tol) for e in range(len(mats))]
            for key in per[0]:
                for e, vals in enumerate(per):
                    experts[(L, module, e, *key)] = vals[key]
                with np.errstate(all="ignore"):
                    rows[(L, module, *key)] = float(np.mean([vals[key] for vals in per]))
    return rows, experts


def check_run(run: ml.Run, models: dict, layers: list[int] | None = None, pair=PAIR, single=SINGLE, tol: float = 1e-3) -> int:
    """Every row of both tables against the reference (and nothing else); returns rows checked."""
    a = models["a"]
    layers = list(range(a.n_layers)) if layers is None else layers
    want_rows, want_experts = expected_rows(models, layers, tuple(pair), tuple(single), tol)
    t, te = run["module_metrics"], run["module_metrics_experts"]
    assert list(t.columns) == ["layer", "module", "metric", "model", "value"]
    assert list(te.columns) == ["layer", "module", "expert", "metric", "model", "value"]
    keys = list(zip(t.layer.astype(int), t.module, t.metric, t.model))
    assert len(keys) == len(set(keys)), f"rows twice: {pd.Series(keys)[pd.Series(keys).duplicated()].tolist()[:5]}"
    ekeys = list(zip(te.layer.astype(int), te.module, te.expert.astype(int), te.metric, te.model))
    assert len(ekeys) == len(set(ekeys)), "expert rows twice"
    assert set(keys) == set(want_rows), f"not expected: {sorted(set(keys) - set(want_rows))[:6]}; missing: {sorted(set(want_rows) - set(keys))[:6]}"
    assert set(ekeys) == set(want_experts), f"not expected: {sorted(set(ekeys) - set(want_experts))[:6]}; missing: {sorted(set(want_experts) - set(ekeys))[:6]}"
    bad = []
    for k, got in zip(keys, t.value.astype(float)):
        _track(f"{k[2]} ({k[3]})", got, want_rows[k])
        if not _close(got, want_rows[k]):
            bad.append(f"{k}: got {got!r}, want {want_rows[k]!r}")
    for k, got in zip(ekeys, te.value.astype(float)):
        _track(f"{k[3]} ({k[4]})", got, want_experts[k])
        if not _close(got, want_experts[k]):
            bad.append(f"{k}: got {got!r}, want {want_experts[k]!r}")
    assert not bad, f"{len(bad)} of {len(keys) + len(ekeys)} rows differ from the float64 reference:\n" + "\n".join(bad[:20])
    # mlp.* of an MoE layer is the mean of the same table's expert rows
    if len(te):
        means = te.groupby(["layer", "module", "metric", "model"])["value"].mean()
        plain = t.set_index(["layer", "module", "metric", "model"])["value"]
        np.testing.assert_allclose(plain.loc[means.index].to_numpy(), means.to_numpy(), rtol=1e-12, atol=1e-12)
    return len(keys) + len(ekeys)


# -- 1. the float64 reference on every family and layout --------------------------------------------

@pytest.mark.parametrize("family,layout,dtype", CASES)
def test_every_row_matches_the_float64_reference(ckpt, tmp_path, family, layout, dtype):
    pa, pb, pbase = _partners(ckpt, tmp_path, family, layout, dtype)
    a, b, base = ml.open_model(pa), ml.open_model(pb), ml.open_model(pbase)
    # one model: single-model metrics of A only
    run = _modules(a)
    assert set(run["module_metrics"].model) == {"a"}
    check_run(run, {"a": a}, pair=())
    # A vs B, and the deltas from the base
    run = _modules(a, b, base)
    assert set(run["module_metrics"].model) == {"a", "b", "pair", "pair_delta"}
    n = check_run(run, {"a": a, "b": b, "base": base})
    assert n > 0
    # A against its base only: 'pair' is A vs base, no 'b', no 'pair_delta'
    run = _modules(a, base=base, layers=[a.n_layers - 1], metrics=("cka", "corr"), single=("stable_rank",))
    assert set(run["module_metrics"].model) == {"a", "pair"}
    check_run(run, {"a": a, "base": base}, layers=[a.n_layers - 1], pair=("corr", "cka"), single=("stable_rank",))
    if (family, layout) not in QUANTISED:
        # the copy really differs, and only a little: a fine-tune, not another model
        p = run["module_metrics"].query("model == 'pair' and metric == 'corr'").value
        assert (p > 0.99).all() and (p < 1 - 1e-6).all(), p.describe()


GPU_CASES = [("mixtral", "per_expert"), ("deepseek_v3", "fused"), ("qwen3_next", "fused"), ("llama", "per_expert")]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family,layout", GPU_CASES, ids=[f"{f}-{lay}" for f, lay in GPU_CASES])
def test_cuda_rows_match_the_float64_reference(ckpt, tmp_path, family, layout):
    pa, pb, pbase = _partners(ckpt, tmp_path, family, layout)
    a, b, base = ml.open_model(pa), ml.open_model(pb), ml.open_model(pbase)
    run = _modules(a, b, base, device="cuda")
    assert run.manifest["options"]["device"].startswith("cuda")
    check_run(run, {"a": a, "b": b, "base": base})


def test_subsets_of_metrics_and_layers(ckpt, tmp_path):
    pa, pb, pbase = _partners(ckpt, tmp_path, "qwen2_moe", "fused")
    a, b, base = ml.open_model(pa), ml.open_model(pb), ml.open_model(pbase)
    run = _modules(a, b, base, layers="3,1", metrics="rel_l2", single=["effective_rank", "fro_norm"], tol=0.05)
    assert run.manifest["options"]["layers"] == [3, 1]
    assert run.manifest["options"]["metrics"] == ["rel_l2"]
    assert run.manifest["options"]["single"] == ["fro_norm", "effective_rank"]  # the canonical order
    assert run.manifest["options"]["tol"] == 0.05
    check_run(run, {"a": a, "b": b, "base": base}, layers=[3, 1], pair=("rel_l2",), single=("fro_norm", "effective_rank"), tol=0.05)
    # tol reaches changed_frac: a larger tol counts fewer entries
    loose = _modules(a, b, layers=[1], metrics="changed_frac", single="fro_norm", tol=10.0)
    tight = _modules(a, b, layers=[1], metrics="changed_frac", single="fro_norm", tol=1e-3)
    check_run(loose, {"a": a, "b": b}, layers=[1], pair=("changed_frac",), single=("fro_norm",), tol=10.0)
    lo = loose["module_metrics"].query("model == 'pair'").set_index("module").value
    ti = tight["module_metrics"].query("model == 'pair'").set_index("module").value
    assert (lo < ti).all() and (ti > 0.9).all(), (lo, ti)


def test_raw_safetensors_reads(ckpt):
    """The matrices straight from the files (no moelens reader): DBRX's fused Wqkv split into q,
    k, v by its config; GPT-OSS's sinks stored but not reported; Llama's and Mixtral's names."""
    def tensors(path: Path) -> dict[str, np.ndarray]:
        out = {}
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    out[k] = h.get_tensor(k).double().numpy()
        return out

    # DBRX
    path = ckpt("dbrx", "fused")
    raw = tensors(path)
    cfg = json.loads((path / "config.json").read_text())
    d, heads, kv_heads = cfg["d_model"], cfg["n_heads"], cfg["attn_config"]["kv_n_heads"]
    kv = kv_heads * (d // heads)
    t = _modules(path)["module_metrics"].set_index(["layer", "module", "metric", "model"]).value
    for L in range(cfg["n_layers"]):
        qkv = raw[f"transformer.blocks.{L}.norm_attn_norm.attn.Wqkv.weight"]
        assert qkv.shape == (d + 2 * kv, d)
        parts = {"attn.q": qkv[:d], "attn.k": qkv[d:d + kv], "attn.v": qkv[d + kv:],
                 "attn.o": raw[f"transformer.blocks.{L}.norm_attn_norm.attn.out_proj.weight"],
                 "router": raw[f"transformer.blocks.{L}.ffn.router.layer.weight"]}
        for module, w in parts.items():
            for metric, want in ref_single(w).items():
                assert _close(t.loc[(L, module, metric, "a")], want), (L, module, metric)
    # GPT-OSS: sinks in the file, not in the table
    path = ckpt("gpt_oss", "fused")
    raw = tensors(path)
    assert "model.layers.0.self_attn.sinks" in raw
    t = _modules(path)["module_metrics"]
    assert not t.module.str.contains("sink").any()
    assert set(t[t.layer == 0].module) == {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down", "router"}
    idx = t.set_index(["layer", "module", "metric", "model"]).value
    for key, module in (("q_proj", "attn.q"), ("k_proj", "attn.k"), ("v_proj", "attn.v"), ("o_proj", "attn.o"), ("router", "router")):
        w = raw[f"model.layers.0.self_attn.{key}.weight"] if key != "router" else raw["model.layers.0.mlp.router.weight"]
        for metric, want in ref_single(w).items():
            assert _close(idx.loc[(0, module, metric, "a")], want), (module, metric)
    # Llama (dense) and Mixtral (per-expert files) by their published names
    for family, names in (
        ("llama", {"attn.q": "self_attn.q_proj.weight", "attn.o": "self_attn.o_proj.weight", "mlp.gate": "mlp.gate_proj.weight", "mlp.down": "mlp.down_proj.weight"}),
        ("mixtral", {"attn.k": "self_attn.k_proj.weight", "router": "block_sparse_moe.gate.weight"}),
    ):
        path = ckpt(family, "per_expert")
        raw = tensors(path)
        run = _modules(path)
        idx = run["module_metrics"].set_index(["layer", "module", "metric", "model"]).value
        for L in (0, 1):
            for module, name in names.items():
                for metric, want in ref_single(raw[f"model.layers.{L}.{name}"]).items():
                    assert _close(idx.loc[(L, module, metric, "a")], want), (family, L, module, metric)
        if family == "mixtral":
            ex = run["module_metrics_experts"].set_index(["layer", "module", "expert", "metric", "model"]).value
            for L in (0, 1):
                for e in range(4):
                    for role, w in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
                        mat = raw[f"model.layers.{L}.block_sparse_moe.experts.{e}.{w}.weight"]
                        for metric, want in ref_single(mat).items():
                            assert _close(ex.loc[(L, f"mlp.{role}", e, metric, "a")], want), (L, e, role, metric)


# -- 2. known by construction ---------------------------------------------------------------------

def _pair_table(run: ml.Run) -> pd.DataFrame:
    """Pair rows of both tables (experts with their expert id, plain modules with -1)."""
    t = run["module_metrics"].assign(expert=-1)
    te = run["module_metrics_experts"]
    both = pd.concat([t, te], ignore_index=True)
    return both[both.model == "pair"]


KNOWN = [("llama", "per_expert"), ("mixtral", "per_expert"), ("qwen2_moe", "fused"), ("deepseek_v3", "per_expert"), ("dbrx", "fused")]


@pytest.mark.parametrize("family,layout", KNOWN, ids=[f"{f}-{lay}" for f, lay in KNOWN])
def test_identical_negated_and_scaled_copies(ckpt, tmp_path, family, layout):
    path = ckpt(family, layout)
    same = _pair_table(_modules(path, path))
    negated = _pair_table(_modules(path, rewrite(path, tmp_path / "neg", lambda n, t: -t if t.is_floating_point() else t)))
    scaled = _pair_table(_modules(path, rewrite(path, tmp_path / "x3", lambda n, t: 3 * t if t.is_floating_point() else t)))
    half = _pair_table(_modules(path, rewrite(path, tmp_path / "x05", lambda n, t: 0.5 * t if t.is_floating_point() else t)))
    want = {
        "same": (same, {"corr": 1.0, "cos": 1.0, "rel_l2": 0.0, "cka": 1.0, "changed_frac": 0.0}),
        "negated": (negated, {"corr": -1.0, "cos": -1.0, "rel_l2": 2.0, "cka": 1.0}),
        "scaled": (scaled, {"corr": 1.0, "cos": 1.0, "rel_l2": 0.0, "cka": 1.0}),
        "half": (half, {"corr": 1.0, "cos": 1.0, "rel_l2": 0.0, "cka": 1.0}),
    }
    for case, (t, values) in want.items():
        assert len(t) and t.value.notna().all(), case
        assert set(t.metric) == set(PAIR)
        for metric, v in values.items():
            got = t[t.metric == metric].value.to_numpy()
            np.testing.assert_allclose(got, v, rtol=0, atol=TOL, err_msg=f"{case} {metric}")
    # B = c·A, c ≠ 1: |A − B| = |1 − c|·|a| > 1e-3·std(A) for all but the entries nearest 0
    for case in ("scaled", "half", "negated"):
        t = want[case][0]
        cf = t[t.metric == "changed_frac"].value
        assert (cf > 0.99).all() and (cf <= 1).all(), (case, cf.describe())


def test_permuted_output_rows_keep_cka(ckpt, tmp_path):
    """Permuting the output rows of a matrix: CKA (inputs as samples) is invariant, the weights
    are not: corr and cos fall near 0, rel_l2 near √2; the other modules are untouched."""
    g = torch.Generator().manual_seed(5)
    llama = ckpt("llama")
    mixtral = ckpt("mixtral", "per_expert")

    def permute_rows(match: str) -> Callable[[str, torch.Tensor], torch.Tensor]:
        def change(name: str, t: torch.Tensor) -> torch.Tensor:
            if not name.endswith(match):
                return t
            p = torch.randperm(t.shape[0], generator=g)
            assert not torch.equal(p, torch.arange(t.shape[0]))
            return t[p]
        return change

    cases = [
        (llama, "model.layers.0.self_attn.q_proj.weight", (0, "attn.q", -1)),
        (llama, "model.layers.1.mlp.down_proj.weight", (1, "mlp.down", -1)),  # down [d, F]: out < in
        (mixtral, "model.layers.1.block_sparse_moe.experts.2.w1.weight", (1, "mlp.gate", 2)),
        (mixtral, "model.layers.0.block_sparse_moe.experts.0.w2.weight", (0, "mlp.down", 0)),
    ]
    for i, (path, name, (L, module, e)) in enumerate(cases):
        permuted = rewrite(path, tmp_path / f"perm{i}", permute_rows(name))
        t = _pair_table(_modules(path, permuted)).set_index(["layer", "module", "expert", "metric"]).value
        assert t.loc[(L, module, e, "cka")] == pytest.approx(1.0, abs=TOL), name
        assert abs(t.loc[(L, module, e, "corr")]) < 0.5 and abs(t.loc[(L, module, e, "cos")]) < 0.5, name
        assert t.loc[(L, module, e, "rel_l2")] > 1.0, name
        # the permutation moves every row but its fixed points (~1 of them)
        assert t.loc[(L, module, e, "changed_frac")] > 0.5, name
        others = t.drop(index=[(L, module, e, m) for m in PAIR])
        if e >= 0:  # the layer's mean rows mix the permuted expert with untouched ones
            others = others.drop(index=[(L, module, -1, m) for m in PAIR])
        corr = others.xs("corr", level="metric")
        np.testing.assert_allclose(corr.to_numpy(), 1.0, atol=TOL, err_msg=name)


def test_changed_frac_threshold_is_strict_with_std_ddof_0(ckpt, tmp_path):
    """The router [4, 32] (n = 128 entries): B = A ± f·tol·std(A), std with ddof 0. ddof 1 would
    raise the threshold by √(128/127) = 1.0039: f = 1.002 counts every entry with ddof 0 and none
    with ddof 1; f = 0.998 counts none (the comparison is |A − B| > tol·std(A))."""
    tol = 1e-2
    g = torch.Generator().manual_seed(11)
    factor = {0: 1.002, 1: 0.998}

    def change(name: str, t: torch.Tensor) -> torch.Tensor:
        m = re.fullmatch(r"model\.layers\.(\d)\.block_sparse_moe\.gate\.weight", name)
        if m is None:
            return t
        a = t.double()
        sign = torch.randint(0, 2, a.shape, generator=g).double() * 2 - 1
        return (a + sign * factor[int(m[1])] * tol * a.std(correction=0)).to(t.dtype)

    path = ckpt("mixtral", "per_expert")
    moved = rewrite(path, tmp_path / "moved", change)
    t = _modules(path, moved, metrics="changed_frac", single="fro_norm", tol=tol)["module_metrics"]
    t = t[t.model == "pair"].set_index(["layer", "module"]).value
    assert t.loc[(0, "router")] == 1.0 and t.loc[(1, "router")] == 0.0, t
    assert (t.drop(index=[(0, "router"), (1, "router")]) == 0).all()  # nothing else moved


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_rank_r_matrices_have_stable_and_effective_rank_at_most_r(ckpt, tmp_path, rank):
    g = torch.Generator().manual_seed(rank)
    targets = {  # stored name -> (layer, module, expert)
        "model.layers.0.self_attn.q_proj.weight": (0, "attn.q", -1),  # 32 × 32
        "model.layers.1.self_attn.k_proj.weight": (1, "attn.k", -1),  # 16 × 32
        "model.layers.1.block_sparse_moe.experts.3.w1.weight": (1, "mlp.gate", 3),  # 48 × 32
        "model.layers.0.block_sparse_moe.experts.1.w2.weight": (0, "mlp.down", 1),  # 32 × 48
        "model.layers.0.block_sparse_moe.gate.weight": (0, "router", -1),  # 4 × 32
    }
    stored = {}

    def change(name: str, t: torch.Tensor) -> torch.Tensor:
        if name not in targets:
            return t
        r = min(rank, *t.shape)
        w = (torch.randn(t.shape[0], r, generator=g, dtype=torch.float64) @ torch.randn(r, t.shape[1], generator=g, dtype=torch.float64)) * 0.05
        stored[name] = (w.to(t.dtype), r)
        return w.to(t.dtype)

    path = rewrite(ckpt("mixtral", "per_expert"), tmp_path / "lowrank", change)
    run = _modules(path)
    t = run["module_metrics"].assign(expert=-1)
    both = pd.concat([t, run["module_metrics_experts"]], ignore_index=True).set_index(["layer", "module", "expert", "metric"]).value
    for name, (L, module, e) in targets.items():
        w, r = stored[name]
        stable, eff = both.loc[(L, module, e, "stable_rank")], both.loc[(L, module, e, "effective_rank")]
        assert 1 - 1e-9 <= stable <= r + 1e-9, (name, stable, r)
        assert 1 - 1e-9 <= eff <= r + 1e-9, (name, eff, r)
        want = ref_single(w.double().numpy())
        assert _close(stable, want["stable_rank"]) and _close(eff, want["effective_rank"]), (name, stable, eff, want)
        if r == 1:
            assert stable == pytest.approx(1.0, abs=TOL) and eff == pytest.approx(1.0, abs=TOL)
    # the unchanged matrices are random: full rank well above 7
    assert (both.xs("effective_rank", level="metric").drop(index=[(L, m, e) for L, m, e in targets.values()]).loc[lambda s: s.index.get_level_values("module") != "router"] > 10).all()


def test_a_zero_matrix_gives_nan_and_a_warning(ckpt, tmp_path):
    """docs/methods.md §7: a zero matrix (or delta) gives NaN where a metric is undefined, a warning in the
    run's manifest, never an exception."""
    llama = ckpt("llama")
    zero_o = rewrite(llama, tmp_path / "zero-o", lambda n, t: torch.zeros_like(t) if n == "model.layers.0.self_attn.o_proj.weight" else t)
    # the zero matrix in A: every metric of A's attn.o but the norms undefined; changed_frac too (std(A) = 0)
    run = _modules(zero_o, llama)
    t = run["module_metrics"].set_index(["layer", "module", "metric", "model"]).value
    assert t.loc[(0, "attn.o", "fro_norm", "a")] == 0 and t.loc[(0, "attn.o", "spectral_norm", "a")] == 0
    for metric in ("stable_rank", "effective_rank", "alpha"):
        assert math.isnan(t.loc[(0, "attn.o", metric, "a")]), metric
        assert not math.isnan(t.loc[(0, "attn.o", metric, "b")]), metric
    for metric in PAIR:
        assert math.isnan(t.loc[(0, "attn.o", metric, "pair")]), metric
    nan = t[t.isna()]
    assert set(nan.index.get_level_values("module")) == {"attn.o"} and set(nan.index.get_level_values("layer")) == {0}
    warnings = run.manifest["warnings"]
    assert list(warnings) == ["L00000"], warnings
    text = " ".join(warnings["L00000"])
    assert "layer 0" in text and "attn.o" in text and "zero" in text
    check_run(run, {"a": ml.open_model(zero_o), "b": ml.open_model(llama)})
    # the zero matrix in B: changed_frac is defined (std(A) > 0) and every entry of A changed
    t = _modules(llama, zero_o, layers=[0], metrics="changed_frac,cos".split(","))["module_metrics"].set_index(["layer", "module", "metric", "model"]).value
    assert t.loc[(0, "attn.o", "changed_frac", "pair")] > 0.99 and math.isnan(t.loc[(0, "attn.o", "cos", "pair")])
    # a zero delta: B = base, so B − base = 0 in every module: NaN pair_delta (but changed_frac,
    # whose scale is std(A − base) > 0: every entry of A − base differs from 0), warned, computed
    b = perturbed_copy(llama, tmp_path / "b")
    run = _modules(llama, b, b, layers=[1])
    d = run["module_metrics"].query("model == 'pair_delta'")
    assert len(d) and d[d.metric != "changed_frac"].value.isna().all()
    assert (d[d.metric == "changed_frac"].value > 0.99).all()
    assert run["module_metrics"].query("model != 'pair_delta'").value.notna().all()
    assert "layer 1" in " ".join(run.manifest["warnings"]["L00001"])


def test_a_zero_expert_matrix(ckpt, tmp_path):
    """One expert's gate zeroed: that expert's rows NaN; the layer's mlp.gate row is the mean
    over the experts whose value is defined (pandas' mean skips NaN)."""
    mixtral = ckpt("mixtral", "per_expert")
    zeroed = rewrite(mixtral, tmp_path / "zeroed", lambda n, t: torch.zeros_like(t) if n == "model.layers.0.block_sparse_moe.experts.1.w1.weight" else t)
    run = _modules(zeroed, mixtral)
    te = run["module_metrics_experts"].set_index(["layer", "module", "expert", "metric", "model"]).value
    for metric in PAIR:
        assert math.isnan(te.loc[(0, "mlp.gate", 1, metric, "pair")]), metric
    assert te.loc[(0, "mlp.gate", 1, "fro_norm", "a")] == 0
    assert math.isnan(te.loc[(0, "mlp.gate", 1, "stable_rank", "a")])
    t = run["module_metrics"].set_index(["layer", "module", "metric", "model"]).value
    others = [te.loc[(0, "mlp.gate", e, "corr", "pair")] for e in (0, 2, 3)]
    assert t.loc[(0, "mlp.gate", "corr", "pair")] == pytest.approx(np.mean(others), abs=1e-12)
    assert t.loc[(0, "mlp.gate", "fro_norm", "a")] == pytest.approx(np.mean([te.loc[(0, "mlp.gate", e, "fro_norm", "a")] for e in range(4)]), abs=1e-12)
    text = " ".join(run.manifest["warnings"]["L00000"])
    assert "layer 0" in text and "mlp.gate" in text
    # layer 1 only warns of the router's α (E = 4 < 8 eigenvalues), never of its experts
    assert "mlp.gate" not in " ".join(run.manifest["warnings"].get("L00001", []))


# -- 3. which modules each layer has -----------------------------------------------------------

ATT4 = {"attn.q", "attn.k", "attn.v", "attn.o"}
MLP = {"mlp.gate", "mlp.up", "mlp.down"}
SHARED = {"shared.gate", "shared.up", "shared.down"}
MLA_V2 = {"attn.q", "attn.kv_a", "attn.kv_b", "attn.o"}
MLA_V3 = {"attn.q_a", "attn.q_b", "attn.kv_a", "attn.kv_b", "attn.o"}
# family, layout -> per layer: (modules, MoE layer?). From the tiny configs of the family modules.
STRUCTURE = {
    ("llama", "per_expert"): [(ATT4 | MLP, False)] * 2,
    ("mistral", "per_expert"): [(ATT4 | MLP, False)] * 2,
    ("qwen2", "per_expert"): [(ATT4 | MLP, False)] * 2,
    ("qwen3", "per_expert"): [(ATT4 | MLP, False)] * 2,
    ("mixtral", "per_expert"): [(ATT4 | MLP | {"router"}, True)] * 2,
    ("mixtral", "fused"): [(ATT4 | MLP | {"router"}, True)] * 2,
    ("dbrx", "fused"): [(ATT4 | MLP | {"router"}, True)] * 2,  # q, k, v split out of Wqkv
    ("gpt_oss", "fused"): [(ATT4 | MLP | {"router"}, True)] * 2,  # no sinks
    ("jetmoe", "fused"): [({"attn.k", "attn.v"} | MLP | {"router"}, True)] * 2,  # k/v-only attention
    # MoE layers 0, 1, 3 (layer 2 dense through mlp_only_layers), a shared expert in each MoE layer
    ("qwen2_moe", "fused"): [(ATT4 | MLP | SHARED | {"router"}, True)] * 2 + [(ATT4 | MLP, False), (ATT4 | MLP | SHARED | {"router"}, True)],
    ("qwen3_moe", "per_expert"): [(ATT4 | MLP, False), (ATT4 | MLP | {"router"}, True)] * 2,
    # first_k_dense_replace = 1; MLA without q-LoRA (v2) and with it (v3)
    ("deepseek_v2", "per_expert"): [(MLA_V2 | MLP, False)] + [(MLA_V2 | MLP | SHARED | {"router"}, True)] * 2,
    ("deepseek_v3", "fused"): [(MLA_V3 | MLP, False)] + [(MLA_V3 | MLP | SHARED | {"router"}, True)] * 2,
    # Mamba layers 0, 2 (no attention), experts in layers 0, 2
    ("jamba", "per_expert"): [(MLP | {"router"}, True), (ATT4 | MLP, False)] * 2,
    # linear attention in layers 0-2, full attention in 3; layer 1 dense
    ("qwen3_next", "fused"): [(MLP | SHARED | {"router"}, True), (MLP, False), (MLP | SHARED | {"router"}, True), (ATT4 | MLP | SHARED | {"router"}, True)],
    # layer 0 Mamba, layer 1 attention; a shared MLP and experts in both
    ("granitemoehybrid", "hub"): [(MLP | SHARED | {"router"}, True), (ATT4 | MLP | SHARED | {"router"}, True)],
    ("granitemoe", "hub"): [(ATT4 | MLP | {"router"}, True)] * 2,
    ("granitemoeshared", "fused"): [(ATT4 | MLP | SHARED | {"router"}, True)] * 2,
    ("llama4", "fused"): [(ATT4 | MLP, False), (ATT4 | MLP | SHARED | {"router"}, True)] * 2,
}


@pytest.mark.parametrize("family,layout", list(STRUCTURE), ids=[f"{f}-{lay}" for f, lay in STRUCTURE])
def test_modules_of_each_layer(ckpt, family, layout):
    path = ckpt(family, layout)
    model = ml.open_model(path)
    want = STRUCTURE[(family, layout)]
    assert model.n_layers == len(want)
    assert model.moe_layers == [L for L, (_, moe) in enumerate(want) if moe]
    run = _modules(path, path)
    t, te = run["module_metrics"], run["module_metrics_experts"]
    for L, (modules, moe) in enumerate(want):
        rows = t[t.layer == L]
        assert set(rows.module) == modules, (L, sorted(set(rows.module) ^ modules))
        # each module exactly once per (metric, model)
        counts = rows.groupby(["module", "metric", "model"]).size()
        assert (counts == 1).all()
        assert len(counts) == len(modules) * (2 * len(SINGLE) + len(PAIR))  # a, b and pair
        for module in modules:
            m = rows[rows.module == module]
            assert sorted(m[m.model == "a"].metric) == sorted(SINGLE) and sorted(m[m.model == "b"].metric) == sorted(SINGLE)
            assert sorted(m[m.model == "pair"].metric) == sorted(PAIR)
        ex = te[te.layer == L]
        if moe:
            E = model.layer(L).n_experts
            assert set(ex.module) == MLP
            for _, g in ex.groupby(["module", "metric", "model"]):
                assert sorted(g.expert) == list(range(E))
            assert len(ex) == 3 * E * (2 * len(SINGLE) + len(PAIR))
        else:
            assert ex.empty
    if not model.is_moe:
        assert te.empty and list(te.columns) == ["layer", "module", "expert", "metric", "model", "value"]
    # the seed's column order first (attn.q, k, v, o, MLA parts, mlp.up, down, gate, shared, router)
    order = ["attn.q", "attn.k", "attn.v", "attn.o", "attn.q_a", "attn.q_b", "attn.kv_a", "attn.kv_b",
             "mlp.up", "mlp.down", "mlp.gate", "shared.up", "shared.down", "shared.gate", "router"]
    for L in range(model.n_layers):
        seen = list(dict.fromkeys(t[t.layer == L].module))
        assert seen == [m for m in order if m in seen], (L, seen)


# -- 4. bad input through the API -----------------------------------------------------------------

@pytest.fixture(scope="module")
def other_shapes(ckpt, tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of one family that differ from each other in one size each."""
    root = tmp_path_factory.mktemp("module-shapes")
    g = torch.Generator().manual_seed(0)

    def write(name: str, n_layers: int = 2, n_experts: int = 4, d: int = 32, f: int = 48) -> Path:
        return write_checkpoint(
            root / name, "mixtral", n_layers, n_experts, d, f,
            router=lambda L: torch.randn(n_experts, d, generator=g),
            expert=lambda L, e, role: torch.randn((d, f) if role == "down" else (f, d), generator=g),
        )

    def ffn40(name: str, t: torch.Tensor) -> torch.Tensor:
        if "mlp.gate_proj" in name or "mlp.up_proj" in name:
            return t[:40]
        return t[:, :40] if "mlp.down_proj" in name else t

    def kv_one_head(name: str, t: torch.Tensor) -> torch.Tensor:
        return t[:8] if ("k_proj" in name or "v_proj" in name) else t

    llama = ckpt("llama")
    return {
        "base": write("base"), "experts5": write("experts5", n_experts=5), "ffn40": write("ffn40", f=40),
        "layers3": write("layers3", n_layers=3),
        "llama_ffn40": rewrite(llama, root / "llama-ffn40", ffn40, {"intermediate_size": 40}),
        "llama_kv1": rewrite(llama, root / "llama-kv1", kv_one_head, {"num_key_value_heads": 1}),
    }


def _api_error(out: Path, *args, **kw) -> MoelensError:
    with pytest.raises(MoelensError) as info:
        _modules(*args, out=out, **kw)
    assert not out.exists() or not any(out.iterdir()), f"a refused run left files behind: {sorted(p.name for p in out.iterdir())}"
    return info.value


KNOWN_PAIR = "corr, cos, rel_l2, cka, changed_frac"
KNOWN_SINGLE = "fro_norm, spectral_norm, stable_rank, effective_rank, alpha"
@pytest.mark.parametrize("case,kind,message", [
    ("families", ConfigError, r"differ in family \(mixtral vs qwen3_moe\)"),
    ("dense_families", ConfigError, r"differ in family \(llama vs mistral\)"),
    ("base_family", ConfigError, r"the base .* differ in family \(mixtral vs qwen3_moe\)"),
    ("experts", ConfigError, r"differ in experts \(4 vs 5\)"),
    ("ffn", ConfigError, r"differ in expert FFN \(48 vs 40\)"),
    ("layers", ConfigError, r"differ in number of layers \(2 vs 3\)"),
    ("dense_ffn", ConfigError, r"differ in intermediate_size \(48 vs 40\)"),
    ("kv_heads", ConfigError, r"the base .* differ in num_key_value_heads \(2 vs 1\)"),
    ("metric", ConfigError, rf"unknown pair metric 'foo'; expected some of {KNOWN_PAIR}"),
    ("single", ConfigError, rf"unknown single metric 'bar'; expected some of {KNOWN_SINGLE}"),
    ("single_as_pair", ConfigError, r"'fro_norm' is a single metric"),
    ("nothing", ConfigError, r"nothing to compute"),
    ("pair_one_model", ConfigError, r"pair metrics compare two models"),
    ("layer_range", IndexOutOfRangeError, r"layer 7 is out of range: .* has layers 0\.\.1"),
    ("layer_negative", IndexOutOfRangeError, r"layer -1 is out of range"),
    ("layers_empty", ConfigError, r"layer list is empty"),
    ("layers_twice", ConfigError, r"name a layer twice"),
    ("tol0", ConfigError, r"tol=0.*positive"),
    ("tol_negative", ConfigError, r"tol=-0\.1.*positive"),
    ("tol_nan", ConfigError, r"tol=nan"),
    ("tol_inf", ConfigError, r"tol=inf"),
    ("device", ConfigError, r"unknown device 'tpu'"),
])
def test_bad_input_through_the_api(ckpt, other_shapes, tmp_path, case, kind, message):
    mixtral, qwen, llama, mistral = ckpt("mixtral"), ckpt("qwen3_moe"), ckpt("llama"), ckpt("mistral")
    s = other_shapes
    calls = {
        "families": lambda: ((mixtral, qwen), {}),
        "dense_families": lambda: ((llama, mistral), {}),
        "base_family": lambda: ((mixtral, None, qwen), {}),
        "experts": lambda: ((s["base"], s["experts5"]), {}),
        "ffn": lambda: ((s["base"], s["ffn40"]), {}),
        "layers": lambda: ((s["base"], s["layers3"]), {}),
        "dense_ffn": lambda: ((llama, s["llama_ffn40"]), {}),
        "kv_heads": lambda: ((llama, None, s["llama_kv1"]), {}),
        "metric": lambda: ((mixtral, mixtral), {"metrics": ("corr", "foo")}),
        "single": lambda: ((mixtral,), {"single": ["bar"]}),
        "single_as_pair": lambda: ((mixtral, mixtral), {"metrics": "fro_norm"}),
        "nothing": lambda: ((mixtral, mixtral), {"metrics": (), "single": []}),
        "pair_one_model": lambda: ((mixtral,), {"metrics": ("corr",)}),
        "layer_range": lambda: ((mixtral,), {"layers": [0, 7]}),
        "layer_negative": lambda: ((mixtral,), {"layers": [-1]}),
        "layers_empty": lambda: ((mixtral,), {"layers": []}),
        "layers_twice": lambda: ((mixtral,), {"layers": [1, 1]}),
        "tol0": lambda: ((mixtral, mixtral), {"tol": 0}),
        "tol_negative": lambda: ((mixtral, mixtral), {"tol": -0.1}),
        "tol_nan": lambda: ((mixtral, mixtral), {"tol": float("nan")}),
        "tol_inf": lambda: ((mixtral, mixtral), {"tol": float("inf")}),
        "device": lambda: ((mixtral,), {"device": "tpu"}),
    }
    args, kw = calls[case]()
    err = _api_error(tmp_path / "run", *args, **kw)
    assert isinstance(err, kind), repr(err)
    assert re.search(message, str(err)), str(err)
    assert "\n" not in str(err)


def test_same_shapes_in_plan_before_anything_is_written(ckpt, other_shapes, tmp_path):
    """A size the family-level checks do not see (the dense MLP width, key/value heads) is refused
    in plan, from the configs and the safetensors headers, naming the size."""
    llama = ckpt("llama")
    with pytest.raises(ConfigError, match=r"differ in intermediate_size \(48 vs 40\)"):
        _modules(llama, other_shapes["llama_ffn40"])
    with pytest.raises(ConfigError, match=r"differ in num_key_value_heads"):
        _modules(other_shapes["llama_kv1"], llama)


def test_comma_separated_metric_names_through_the_api(ckpt):
    path = ckpt("llama")
    run = _modules(path, path, metrics="corr,cos", single="fro_norm,alpha", layers="1")
    assert run.manifest["options"]["metrics"] == ["corr", "cos"]
    assert run.manifest["options"]["single"] == ["fro_norm", "alpha"]


def test_empty_metric_lists_mean_none_of_that_kind(ckpt, tmp_path):
    path = ckpt("qwen2_moe", "fused")
    a, b = ml.open_model(path), ml.open_model(perturbed_copy(path, tmp_path / "b"))
    run = _modules(a, metrics=(), layers=[2, 3])  # one model: an empty pair list is no error
    assert set(run["module_metrics"].model) == {"a"}
    check_run(run, {"a": a}, layers=[2, 3], pair=())
    run = _modules(a, b, single=[], layers=[2, 3])
    assert set(run["module_metrics"].model) == {"pair"}
    check_run(run, {"a": a, "b": b}, layers=[2, 3], single=())


def test_two_models_without_pair_metrics_give_both_models_single_metrics(ckpt, tmp_path):
    path = ckpt("qwen2_moe", "fused")
    a, b = ml.open_model(path), ml.open_model(perturbed_copy(path, tmp_path / "b"))
    run = _modules(a, b, metrics=(), layers=[2, 3])
    assert set(run["module_metrics"].model) == {"a", "b"}
    check_run(run, {"a": a, "b": b}, layers=[2, 3], pair=())


def test_one_metric_name_as_a_string(ckpt):
    path = ckpt("llama")
    run = _modules(path, path, metrics="cka", single="alpha", layers="1")
    t = run["module_metrics"]
    assert set(t.metric) == {"cka", "alpha"} and set(t.layer) == {1}


# -- 5. resume -------------------------------------------------------------------------------------

class Killed(Exception):
    """Stands for the process dying at a chosen moment."""


def _kill_when(task: str, done: int):
    def callback(event):
        if event.task == task and event.done == done:
            raise Killed(f"{task} {done}")
    return callback


def test_killed_after_the_first_layer_resumes_to_the_uninterrupted_tables(ckpt, tmp_path):
    a = ckpt("qwen2_moe", "fused")  # MoE layers 0, 1, 3; shared experts; layer 2 dense
    b = perturbed_copy(a, tmp_path / "b", seed=1)
    # B = base in layer 0 (a zero delta there): a warning that must survive the resume
    base = rewrite(b, tmp_path / "base", lambda n, t: t if ".layers.0." in n or not t.is_floating_point() or t.numel() < 2 else t + 0.01 * torch.randn_like(t))
    opts = {"tol": 2e-3}
    full = _modules(a, b, base, out=tmp_path / "full", **opts)
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        _modules(a, b, base, out=out, progress=_kill_when("layers", 1), **opts)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running" and manifest["completed_units"] == ["L00000"]
    assert not list(out.glob("*.parquet"))
    seen = []
    resumed = _modules(a, b, base, out=out, progress=lambda ev: seen.append((ev.task, ev.done, ev.total)), **opts)
    assert seen[0] == ("layers", 1, 4), "layer 0 was not taken from the killed run"
    assert [d for _, d, _ in seen] == [1, 2, 3, 4]
    assert set(full.tables) == set(resumed.tables) == {"module_metrics", "module_metrics_experts"}
    for name in full.tables:
        pd.testing.assert_frame_equal(full[name], resumed[name])
    assert resumed.manifest["status"] == "complete" and resumed.manifest["completed_units"] == ["L00000", "L00001", "L00002", "L00003"]
    assert resumed.manifest["warnings"] == full.manifest["warnings"] and "L00000" in full.manifest["warnings"]
    loaded = ml.load_run(out)
    for name in full.tables:
        pd.testing.assert_frame_equal(full[name], loaded[name])
    check_run(loaded, {"a": ml.open_model(a), "b": ml.open_model(b), "base": ml.open_model(base)}, tol=2e-3)
    # other options are another run: refused, not mixed
    with pytest.raises(RunDirectoryError):
        _modules(a, b, base, out=out, tol=1e-2)
