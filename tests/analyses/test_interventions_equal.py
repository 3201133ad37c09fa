"""Layer-wise interventions (docs/methods.md §4, §7): ``moelens.trace`` against a one-cell-at-a-time hook
loop (tests/analyses/interventions_reference.py), batch invariance, causality and the JSD.

The reference is first checked on its own against cases whose answer is known by construction
(a site replaced by its own clean value, a restore that makes the last position clean again, an
attention block that leaves only the last position itself, ...). Then every mode of the trace is
compared with it, cell by cell, within 1e-5 in JSD and in the target probabilities, on a tiny
Mixtral-layout MoE model and a tiny dense Llama model (random weights, word-level tokenizer; see
tests/analyses/interventions_fixtures.py), plus the router rule of Qwen3-MoE and OLMoE, and one
mode per site kind on the causal LMs opened for forward passes only (GPT-2, GPT-J, GPT-NeoX, Phi,
Gemma, Falcon, OPT), the trace running sdpa attention and the reference eager attention.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

import moelens
from tests.analyses import interventions_fixtures as fx
from tests.analyses.interventions_reference import (
    BLOCK_SITES,
    KNOCKOUT_SITES,
    MOE_SITES,
    RESTORE_SITES,
    Reference,
    blocking_mask,
    hooked,
    js_divergence_bits,
    load_reference,
    record_output,
    route,
    token_kind,
    use_mask,
    window_layers,
)

TOL = 1e-5
KEYS = ["prompt_id", "layer", "site", "position"]
MEASURES = ["jsd", "p_target_clean", "p_target", "p_target_corrupt", "indirect_effect"]


def _key(name: str, mode: str, options: dict[str, Any]) -> tuple:
    return name, mode, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved tiny models (mixtral, llama, olmoe, qwen3_moe) sharing one tokenizer, and the
    prompts as JSONL."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("interventions")
    tok = fx.tokenizer()
    out = {"prompts": fx.write_prompts(root / "facts.jsonl"), "llama": fx.save_model(fx.llama_config(tok), tok, root / "llama")}
    for family in ("mixtral", "olmoe", "qwen3_moe"):
        out[family] = fx.save_model(fx.mixtral_config(tok, family), tok, root / family)
    for model_type in fx.CAUSAL_LMS:
        out[model_type] = fx.save_model(fx.causal_lm_config(tok, model_type), tok, root / model_type)
    return out


@pytest.fixture(scope="module")
def references(checkpoints: dict[str, Path]):
    """``references(name) -> Reference`` (loaded once per model)."""
    cache: dict[str, Reference] = {}

    def get(name: str) -> Reference:
        if name not in cache:
            cache[name] = load_reference(checkpoints[name], checkpoints["prompts"])
        return cache[name]

    return get


@pytest.fixture(scope="module")
def reference_table(references):
    """``reference_table(name, mode, **options) -> DataFrame``, each table computed once."""
    cache: dict[tuple, pd.DataFrame] = {}

    def get(name: str, mode: str, **options: Any) -> pd.DataFrame:
        key = _key(name, mode, options)
        if key not in cache:
            cache[key] = references(name).table(mode, **options)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def traced(checkpoints: dict[str, Path]):
    """``traced(name, mode, **options) -> DataFrame``: ``moelens.trace(...)["interventions"]``,
    each run once."""
    cache: dict[tuple, pd.DataFrame] = {}

    def get(name: str, mode: str, **options: Any) -> pd.DataFrame:
        key = _key(name, mode, options)
        if key not in cache:
            run = moelens.trace(str(checkpoints[name]), str(checkpoints["prompts"]), mode=mode, device="cpu", seed=0, **options)
            cache[key] = run["interventions"]
        return cache[key]

    return get


def assert_same_table(ours: pd.DataFrame, ref: pd.DataFrame, tol: float = TOL) -> None:
    """The same cells (prompt, layer, site, position), the same labels, and every measure within
    ``tol`` (NaN where the other is NaN)."""
    a = ours.sort_values(KEYS, kind="stable").reset_index(drop=True)
    b = ref.sort_values(KEYS, kind="stable").reset_index(drop=True)
    assert a[KEYS].astype(str).values.tolist() == b[KEYS].astype(str).values.tolist()
    for column in ("mode", "token_kind", "target_id"):
        assert a[column].tolist() == b[column].tolist(), column
    for column in MEASURES:
        x, y = a[column].to_numpy(np.float64), b[column].to_numpy(np.float64)
        assert np.array_equal(np.isnan(x), np.isnan(y)), column
        worst = np.nanmax(np.abs(x - y)) if len(x) and not np.isnan(x).all() else 0.0
        assert worst <= tol, f"{column}: largest difference {worst:.3g} (tolerance {tol:g})"


# ----------------------------------------------------------------------------- the reference alone

def test_prompts_subjects_and_targets(references) -> None:
    ref = references("mixtral")
    vocab = ref.tokenizer.get_vocab()
    bos = ref.tokenizer.bos_token_id
    words = [[vocab[w] for w in r["prompt"].lower().split()] for r in fx.PROMPTS]
    assert [p.ids for p in ref.prompts] == [[bos, *w] for w in words]
    assert [p.subject for p in ref.prompts] == [[5], [1, 2], [5, 6], [1]]
    assert [p.target_id for p in ref.prompts[:3]] == [vocab["paris"], vocab["trumpet"], vocab["french"]]
    # no target: the clean top-1
    assert ref.prompts[3].target_id == int(np.argmax(ref.clean[3].p))


def test_token_kinds() -> None:
    assert [token_kind(t, [2, 3, 4], 8) for t in range(8)] == [
        "before_subject", "before_subject", "first_subject", "middle_subject", "last_subject",
        "first_after", "further", "last"]
    assert [token_kind(t, [1], 4) for t in range(4)] == ["before_subject", "last_subject", "first_after", "last"]
    # the last token is "last" even when it is the first after the subject, or in the subject
    assert [token_kind(t, [1, 2], 4) for t in range(4)] == ["before_subject", "first_subject", "last_subject", "last"]
    assert [token_kind(t, [2, 3], 4) for t in range(4)] == ["before_subject", "before_subject", "first_subject", "last"]


def test_windows() -> None:
    assert window_layers(5, 10, 32) == list(range(0, 10))
    assert window_layers(0, 10, 32) == list(range(0, 5))
    assert window_layers(31, 9, 32) == list(range(27, 32))
    assert window_layers(1, 2, 3) == [0, 1]
    assert window_layers(2, 1, 3) == [2]


def test_reference_jsd_known_values() -> None:
    assert js_divergence_bits([1.0, 0.0], [0.0, 1.0]) == 1.0
    assert js_divergence_bits([0.5, 0.5], [0.5, 0.5]) == 0.0
    # P = (1, 0), Q = (½, ½): M = (¾, ¼); ½·log2(4/3) + ½·(½·log2(2/3) + ½·log2(2))
    expected = 0.5 * np.log2(4 / 3) + 0.5 * (0.5 * np.log2(0.5 / 0.75) + 0.5 * np.log2(0.5 / 0.25))
    assert js_divergence_bits([1.0, 0.0], [0.5, 0.5]) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("name", ["mixtral", "llama"])
def test_site_replaced_by_its_own_clean_value_changes_nothing(references, name: str) -> None:
    ref = references(name)
    sites = KNOCKOUT_SITES + (MOE_SITES if name == "mixtral" else ())
    for prompt in ref.prompts:
        clean = ref.clean[prompt.prompt_id]
        for layer in range(ref.n_layers):
            own = {"subj": clean.hidden[layer][prompt.subject], "last": clean.hidden[layer][prompt.last],
                   "attn": clean.attn[layer][prompt.last]}
            if name == "mixtral":
                own |= {"moe": clean.mlp[layer][prompt.last], "router": clean.router[layer][prompt.last]}
            for site in sites:
                p = ref.knockout_distribution(prompt, layer, site, own[site])
                assert js_divergence_bits(clean.p, p) < 1e-12, (prompt.prompt_id, layer, site)


@pytest.mark.parametrize("name", ["mixtral", "llama"])
def test_reference_causality(references, name: str) -> None:
    """At the final layer, the subject tokens' outputs cannot reach the last position's logits;
    its own output is all the logits see."""
    ref = references(name)
    final = ref.n_layers - 1
    for prompt in ref.prompts:
        clean = ref.clean[prompt.prompt_id].p
        for ablation in ("zero", "mean"):
            means = ref.mean_values() if ablation == "mean" else None
            p_subj = ref.knockout_distribution(prompt, final, "subj", ref.site_value("subj", final, ablation, means))
            assert js_divergence_bits(clean, p_subj) == 0.0
            p_last = ref.knockout_distribution(prompt, final, "last", ref.site_value("last", final, ablation, means))
            assert js_divergence_bits(clean, p_last) > 1e-2


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen3_moe"])
def test_router_rule_is_the_family_rule(references, family: str) -> None:
    """Loading runs the clean passes, which check the written-out rule against the family's own
    router on every token of every prompt at every layer; ties go to the lower expert index."""
    ref = references(family)
    renorm = family != "olmoe"  # the zoo's OLMoE keeps norm_topk_prob=False, as OLMoE-1B-7B
    weights, indices = route(torch.zeros(fx.EXPERTS), fx.TOP_K, renorm)
    assert indices.tolist() == list(range(fx.TOP_K))
    assert torch.allclose(weights, torch.full((fx.TOP_K,), 1 / fx.TOP_K if renorm else 1 / fx.EXPERTS))
    weights, indices = route(torch.tensor([0.0, 2.0, 1.0, 2.0]), 2, renorm)
    assert indices.tolist() == [1, 3]
    # the zero knockout of the router moves the output: the hook does reach the routing
    prompt = ref.prompts[0]
    p_zero = ref.knockout_distribution(prompt, 0, "router", torch.zeros(fx.EXPERTS))
    assert js_divergence_bits(ref.clean[0].p, p_zero) > 1e-4


def test_noise_draw(references) -> None:
    ref = references("mixtral")
    prompt = ref.prompts[2]
    emb = ref.model.get_input_embeddings().weight.detach()
    std = float(np.std(emb.double().numpy()))  # ddof 0
    g = torch.Generator().manual_seed(0 + 2)
    expected = torch.randn(10, 2, fx.HIDDEN, generator=g) * (3 * std)
    assert torch.allclose(ref.noise(prompt), expected, rtol=1e-6, atol=0)
    assert float(ref.noise(prompt).std()) == pytest.approx(3 * std, rel=0.15)


@pytest.mark.parametrize("name", ["mixtral", "llama"])
def test_restore_known_cases(references, name: str) -> None:
    """Restoring the final layer's output at the last token gives p_clean back; restoring every
    attention output at the last token (the window covers all three layers) makes the last
    position's residual stream clean again, so p_clean too; restoring anything before the subject
    (already clean under causal attention) gives the corrupted p back."""
    ref = references(name)
    final = ref.n_layers - 1
    for prompt in ref.prompts:
        clean = ref.clean[prompt.prompt_id].p
        p_corrupt = ref.corrupted_distribution(prompt)
        assert js_divergence_bits(clean, p_corrupt) > 1e-3
        p = ref.corrupted_distribution(prompt, ref.restore_hooks(prompt, final, "restore_hidden", prompt.last, 10))
        assert js_divergence_bits(clean, p) < 1e-12
        p = ref.corrupted_distribution(prompt, ref.restore_hooks(prompt, 1, "restore_attn", prompt.last, 10))
        assert js_divergence_bits(clean, p) < 1e-12
        for site in RESTORE_SITES:
            for position in range(prompt.subject[0]):
                p = ref.corrupted_distribution(prompt, ref.restore_hooks(prompt, 0, site, position, 10))
                # the clean value comes from a pass of batch 1, the corrupted run is a batch of 10:
                # the same numbers up to float32 rounding
                assert np.abs(p - p_corrupt).max() < 1e-6, (site, position)


@pytest.mark.parametrize("name", ["mixtral", "llama"])
def test_block_known_cases(references, name: str) -> None:
    """The hand-built mask with nothing blocked is the model's own causal attention; with every
    key but itself blocked, the last position's attention output is o_proj of its own value
    vector (each query head reading its key-value group)."""
    ref = references(name)
    for prompt in ref.prompts:
        p = ref.blocked_distribution(prompt, range(ref.n_layers), [])
        assert js_divergence_bits(ref.clean[prompt.prompt_id].p, p) < 1e-12
        for layer in range(ref.n_layers):
            attn = ref.layers[layer].self_attn
            store: dict = {}
            mask = blocking_mask(len(prompt.ids), range(prompt.last), torch.float32)
            hooks = [(attn, use_mask(mask)), (attn, record_input(store, "x"))]
            with hooked([(attn, record_output(store, "out"))], pre_kwargs=hooks):
                ref._last_logits(prompt.ids)
            with torch.no_grad():
                v = attn.v_proj(store["x"][0, prompt.last]).view(-1, attn.head_dim)  # [kv_heads, hd]
                heads = v.repeat_interleave(attn.num_key_value_groups, dim=0).reshape(-1)  # [heads·hd]
                expected = attn.o_proj(heads)
            assert torch.allclose(store["out"][0, prompt.last], expected, atol=1e-6), (prompt.prompt_id, layer)


def record_input(store: dict, key: str):
    """Forward pre-hook (with kwargs): keep the module's ``hidden_states`` input."""
    def hook(module, args, kwargs):
        store[key] = kwargs["hidden_states"].detach().clone()

    return hook


def test_a_block_that_leaves_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="nothing to attend"):
        blocking_mask(3, [0, 1, 2], torch.float32)


# ----------------------------------------------------------------------------- trace == reference

@pytest.mark.parametrize("name", ["mixtral", "llama"])
@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_knockout_equals_reference(traced, reference_table, name: str, ablation: str) -> None:
    """Every site: subj, attn, last, and router, moe on the MoE model."""
    sites = list(KNOCKOUT_SITES + (MOE_SITES if name == "mixtral" else ()))
    ours = traced(name, "knockout", ablation=ablation, sites=sites)
    assert_same_table(ours, reference_table(name, "knockout", ablation=ablation, sites=sites))


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_router_knockout_of_other_families(traced, reference_table, family: str, ablation: str) -> None:
    """OLMoE keeps the top-k softmax weights as they are; Qwen3-MoE renormalises them; zero logits
    tie every expert, and the lower indices win."""
    ours = traced(family, "knockout", ablation=ablation, sites=["router", "moe"])
    assert_same_table(ours, reference_table(family, "knockout", ablation=ablation, sites=["router", "moe"]))


@pytest.mark.parametrize("name", ["mixtral", "llama"])
def test_restore_equals_reference(traced, reference_table, references, name: str) -> None:
    ours = traced(name, "restore")
    assert set(ours["site"]) == set(RESTORE_SITES)
    assert_same_table(ours, reference_table(name, "restore"))
    # one row per (prompt, layer, site, position) for every token position
    assert len(ours) == sum(len(p.ids) for p in references(name).prompts) * fx.LAYERS * len(RESTORE_SITES)


def test_restore_window_equals_reference(traced, reference_table) -> None:
    """A window of 2 layers, [ℓ − 1, ℓ] clipped ({0} at layer 0, {1, 2} at layer 2), tells apart
    layers that the default window of 10 covers whole."""
    options = {"sites": ["restore_mlp", "restore_attn"], "window": 2, "layers": [0, 2]}
    ours = traced("mixtral", "restore", **options)
    assert_same_table(ours, reference_table("mixtral", "restore", **options))


@pytest.mark.parametrize("name", ["mixtral", "llama"])
def test_block_equals_reference(traced, reference_table, name: str) -> None:
    ours = traced(name, "block")
    assert set(ours["site"]) == set(BLOCK_SITES)
    assert_same_table(ours, reference_table(name, "block"))


def test_block_window_equals_reference(traced, reference_table) -> None:
    ours = traced("mixtral", "block", window=1)
    assert_same_table(ours, reference_table("mixtral", "block", window=1))


def test_restore_seed_prompt_records_and_manifest(checkpoints, traced) -> None:
    """Prompts given as records instead of a file; the noise follows ``seed`` (seed + prompt_id)."""
    options = {"mode": "restore", "layers": [2], "sites": ["restore_hidden"]}
    run = moelens.trace(str(checkpoints["llama"]), [dict(r) for r in fx.PROMPTS], device="cpu", seed=3, **options)
    ours = run["interventions"]
    ref = load_reference(checkpoints["llama"], fx.PROMPTS, seed=3).restore(["restore_hidden"], layers=[2])
    assert_same_table(ours, ref)
    seed0 = traced("llama", "restore", layers=[2], sites=["restore_hidden"]).sort_values(KEYS)
    assert np.abs(seed0["p_target_corrupt"].to_numpy() - ours.sort_values(KEYS)["p_target_corrupt"].to_numpy()).max() > 1e-4
    manifest = run.manifest["options"]
    assert manifest["mode"] == "restore" and manifest["noise_samples"] == 10 and manifest["seed"] == 3


@pytest.mark.parametrize("name", fx.CAUSAL_LMS)
@pytest.mark.parametrize("mode, options", [
    ("knockout", {"ablation": "zero"}),  # the decoder layer output (subj, last) and attention output (attn)
    ("knockout", {"sites": ["moe", "last"]}),  # the MLP output, mean ablation
    ("restore", {"layers": [1]}),  # noise on the embeddings; layer, MLP and attention outputs restored
    ("block", {}),  # the attention mask
])
def test_any_causal_lm_equals_reference(traced, reference_table, name: str, mode: str, options: dict) -> None:
    ours = traced(name, mode, **options)
    assert len(ours) > 0 and ours["jsd"].max() > 1e-2  # the interventions move the prediction
    assert_same_table(ours, reference_table(name, mode, **options))


# ----------------------------------------------------------------------------- batch invariance, causality

@pytest.mark.parametrize("mode, options", [
    ("knockout", {"sites": list(KNOCKOUT_SITES + MOE_SITES)}),
    ("knockout", {"sites": list(KNOCKOUT_SITES + MOE_SITES), "ablation": "zero"}),
    ("restore", {"layers": [1]}),
    ("block", {"window": 1}),
])
def test_batch_invariance(traced, mode: str, options: dict) -> None:
    """A cell's value does not depend on what else is in its batch (MoE routing included)."""
    one = traced("mixtral", mode, batch_size=1, **options)
    many = traced("mixtral", mode, batch_size=512, **options)
    assert_same_table(one, many)


@pytest.mark.parametrize("name", ["mixtral", "llama"])
def test_trace_causality(traced, name: str) -> None:
    final = fx.LAYERS - 1
    table = traced(name, "knockout", sites=["subj", "last"], layers=[final])
    assert set(table["layer"]) == {final}
    assert (table.loc[table["site"] == "subj", "jsd"] < 1e-7).all()
    assert (table.loc[table["site"] == "last", "jsd"] > 1e-2).all()


# ----------------------------------------------------------------------------- the JSD itself

def _js(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    from moelens.metrics.jsd import js_divergence

    out = js_divergence(torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(q, dtype=torch.float64))
    return np.asarray(out.cpu() if isinstance(out, torch.Tensor) else out, dtype=np.float64)


def test_jsd_against_numpy_float64() -> None:
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(50, 0.3), size=20)
    q = rng.dirichlet(np.full(50, 0.3), size=20)
    p[:5, :10] = 0.0  # zero probabilities: 0·log 0 = 0
    p /= p.sum(-1, keepdims=True)
    expected = np.array([js_divergence_bits(a, b) for a, b in zip(p, q)])
    got = _js(p, q)
    assert got.shape == (20,)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)


def test_jsd_properties() -> None:
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(30), size=10)
    q = rng.dirichlet(np.ones(30), size=10)
    np.testing.assert_allclose(_js(p, q), _js(q, p), rtol=0, atol=1e-12)  # symmetric
    assert np.abs(_js(p, p)).max() < 1e-12  # 0 for identical
    assert (_js(p, q) <= 1.0).all() and (_js(p, q) >= 0.0).all()  # bits: at most 1
    disjoint_p = np.array([[0.2, 0.8, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    disjoint_q = np.array([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.0, 1.0]])
    np.testing.assert_allclose(_js(disjoint_p, disjoint_q), [1.0, 1.0], rtol=0, atol=1e-12)
