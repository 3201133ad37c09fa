"""Every MoE family's structure agrees with the model transformers builds from the same config:
which layers are MoE, top-k, shared experts, the summary, dense MLPs and attention."""

from __future__ import annotations

import shutil

import pytest
import torch

import moelens as ml
from moelens.checkpoint.registry import families
from moelens.errors import IndexOutOfRangeError, NotMoEError
from moelens.testing.tiny import tiny_specs

from .hf_reference import decoder_layers, hf_moe_layer_indices, reference_layer

MOE_FAMILIES = [name for name, cls in families().items() if not cls.is_dense]
SPECS = list(tiny_specs(families=MOE_FAMILIES, dtypes=("float32",), sharded=(False,)))

# what the tiny configs declare: DeepSeek-style shared MLPs stand for n experts of width F
SHARED_EXPERTS = {"qwen2_moe": 1, "qwen3_next": 1, "deepseek_v2": 2, "deepseek_v3": 1, "glm4_moe": 1, "dots1": 1, "ernie4_5_moe": 2}
# tiny configs whose MoE-layer rule leaves some layers dense: the rule must be exercised
MIXED = {"qwen2_moe", "qwen3_next", "qwen3_moe", "deepseek_v2", "deepseek_v3", "glm4_moe", "dots1", "ernie4_5_moe", "jamba"}
ATTENTION_MODULES = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "q_a": "q_a_proj", "q_b": "q_b_proj", "kv_a": "kv_a_proj_with_mqa", "kv_b": "kv_b_proj",
}
# token mixers that replace attention in hybrid models: such a layer has no attention matrices
ATTENTION_FREE_MIXERS = ("mamba", "linear_attn")


def _load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _hf_top_k(config) -> int:
    for key in ("num_experts_per_tok", "moe_k", "top_k"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return int(config.ffn_config.moe_top_k)  # DBRX


@pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])
def test_structure_equals_transformers(spec, tiny_checkpoint):
    path = tiny_checkpoint(spec.family, spec.layout, spec.dtype, spec.sharded)
    model = ml.open_model(path)
    hf = _load_hf(path)
    hf_layers = decoder_layers(hf)

    assert model.moe_layers == hf_moe_layer_indices(hf)
    assert model.dense_layers == [i for i in range(len(hf_layers)) if i not in model.moe_layers]
    if spec.family in MIXED:
        assert model.dense_layers, "the tiny config should leave some layers dense"
    assert model.top_k == _hf_top_k(hf.config)

    ref = reference_layer(hf, spec.family, model.moe_layers[0])
    shared = model.layer(model.moe_layers[0]).shared_experts()
    assert (model.n_shared_experts > 0) == bool(shared)
    if spec.family in SHARED_EXPERTS:
        assert model.n_shared_experts == SHARED_EXPERTS[spec.family]

    summary = model.summary()
    assert summary["family"] == spec.family
    assert summary["moe_layers"] == model.moe_layers and summary["dense_layers"] == model.dense_layers
    assert summary["n_experts"] == ref["router"].shape[0]
    assert summary["top_k"] == model.top_k
    assert summary["expert_ffn"] == ref["gate"].shape[1]
    assert summary["shared_experts"] == model.n_shared_experts
    assert (summary["expert_layout"] == "per_expert") == (spec.layout == "per_expert")
    if spec.layout in ("per_expert", "fused"):  # not a quantised layout
        assert summary["dtype"] == "F32"
    expert_tensors = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")
    hf_expert_params = sum(
        ref_l[key].numel()
        for ref_l in (reference_layer(hf, spec.family, L) for L in model.moe_layers)
        for key in expert_tensors
        if ref_l.get(key) is not None
    )
    assert summary["parameters_experts"] == hf_expert_params

    for i, hf_layer in enumerate(hf_layers):
        if i in model.moe_layers:
            with pytest.raises(NotMoEError):
                model.dense_mlp(i)
        else:
            with pytest.raises(NotMoEError):
                model.layer(i)
            hf_mlp = getattr(hf_layer, "mlp", None) or hf_layer.feed_forward
            mlp = model.dense_mlp(i)
            for role in ("gate", "up", "down"):
                torch.testing.assert_close(mlp[role], getattr(hf_mlp, f"{role}_proj").weight.detach(), rtol=0, atol=0)
        _check_attention(model, i, hf_layer)


def _check_attention(model, i: int, hf_layer) -> None:
    """Layer ``i``'s attention as moelens reads it against the module transformers built; every
    layer falls under one rule, and a layer no rule knows fails the test."""
    attention = model.attention(i)
    if getattr(hf_layer, "self_attn", None) is not None:
        hf_attn = hf_layer.self_attn
        if hasattr(hf_attn, "qkv_proj"):
            _check_lightning_attention(attention, hf_attn)
            return
        expected = {key for key, attr in ATTENTION_MODULES.items() if isinstance(getattr(hf_attn, attr, None), torch.nn.Linear)}
        assert expected, f"layer {i}: no q/k/v/o projection found on {type(hf_attn).__name__}"
        assert set(attention) == expected
        for key in expected:
            torch.testing.assert_close(attention[key], getattr(hf_attn, ATTENTION_MODULES[key]).weight.detach(), rtol=0, atol=0)
    elif any(getattr(hf_layer, name, None) is not None for name in ATTENTION_FREE_MIXERS):
        # a Mamba layer (Jamba, Granite-MoE-Hybrid) or a linear-attention layer (Qwen3-Next):
        # no attention matrices, documented as {} (docs/methods.md §7: the module is absent from its rows)
        assert attention == {}, f"layer {i} has no softmax attention, yet moelens returned {sorted(attention)}"
    elif getattr(hf_layer, "self_attention", None) is not None:
        _check_jetmoe_attention(attention, hf_layer.self_attention)
    elif getattr(hf_layer, "norm_attn_norm", None) is not None:
        _check_dbrx_attention(attention, hf_layer.norm_attn_norm.attn)
    else:
        pytest.fail(f"layer {i} ({type(hf_layer).__name__}) has an attention this test has no rule for")


def _probe(in_features: int) -> torch.Tensor:
    return torch.randn(5, in_features, generator=torch.Generator().manual_seed(0))


def _check_jetmoe_attention(attention, hf_attn) -> None:
    """JetMoE: the shared keys and values, as transformers' forward splits them out of
    ``kv_proj``; the per-expert queries and outputs are not single matrices (module docstring)."""
    assert set(attention) == {"k", "v"}
    x = _probe(hf_attn.kv_proj.in_features)
    with torch.no_grad():
        k, v = hf_attn.kv_proj(x).chunk(2, dim=-1)
    torch.testing.assert_close(x @ attention["k"].T, k)
    torch.testing.assert_close(x @ attention["v"].T, v)


def _check_dbrx_attention(attention, hf_attn) -> None:
    """DBRX: q, k and v as transformers' forward splits them out of ``Wqkv``, and ``out_proj``."""
    assert set(attention) == {"q", "k", "v", "o"}
    x = _probe(hf_attn.Wqkv.in_features)
    with torch.no_grad():
        qkv = hf_attn.Wqkv(x)
    kv = hf_attn.num_key_value_heads * hf_attn.head_dim
    for key, part in zip("qkv", qkv.split([hf_attn.hidden_size, kv, kv], dim=-1)):
        torch.testing.assert_close(x @ attention[key].T, part)
    torch.testing.assert_close(attention["o"], hf_attn.out_proj.weight.detach(), rtol=0, atol=0)


def _check_lightning_attention(attention, hf_attn) -> None:
    """MiniMax lightning attention: q, k, v must reproduce what transformers' forward splits
    out of ``qkv_proj`` (per head, then per role)."""
    heads, head_dim = hf_attn.num_attention_heads, hf_attn.head_dim
    x = torch.randn(5, hf_attn.qkv_proj.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        packed = hf_attn.qkv_proj(x).reshape(5, heads, 3 * head_dim)
    for key, part in zip("qkv", torch.split(packed, head_dim, dim=2)):
        torch.testing.assert_close((x @ attention[key].T).reshape(5, heads, head_dim), part)
    torch.testing.assert_close(attention["o"], hf_attn.out_proj.weight.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_multi_token_prediction_layer_is_ignored(family, tiny_checkpoint, tmp_path):
    """DeepSeek-V3 and GLM-4.5 ship their MTP module as layer ``num_hidden_layers``."""
    from safetensors.torch import save_file

    src = tiny_checkpoint(family)
    path = tmp_path / family
    shutil.copytree(src, path)
    model = ml.open_model(path)
    n, before = model.n_layers, model.summary()
    d, f = model.hidden_size, model.expert_ffn
    mtp = f"model.layers.{n}."
    save_file({
        mtp + "eh_proj.weight": torch.randn(d, 2 * d),
        mtp + "enorm.weight": torch.ones(d),
        mtp + "mlp.gate.weight": torch.randn(model.n_experts, d),
        mtp + "mlp.experts.0.gate_proj.weight": torch.randn(f, d),
        mtp + "mlp.experts.0.up_proj.weight": torch.randn(f, d),
        mtp + "mlp.experts.0.down_proj.weight": torch.randn(d, f),
    }, str(path / "model-mtp.safetensors"))

    model = ml.open_model(path)
    after = model.summary()
    assert model.n_layers == n and model.moe_layers == before["moe_layers"]
    assert after["n_experts"] == before["n_experts"] and after["expert_ffn"] == before["expert_ffn"]
    assert after["parameters_experts"] == before["parameters_experts"]
    assert after["parameters_total"] == before["parameters_total"] + 2 * d * d + d + model.n_experts * d + 3 * f * d
    with pytest.raises(IndexOutOfRangeError):
        model.layer(n)


RULES = [
    # (family, config beyond num_hidden_layers=8, MoE layers) — edges the tiny configs do not reach
    ("deepseek_v2", {"n_routed_experts": 4, "first_k_dense_replace": 1, "moe_layer_freq": 2}, [2, 4, 6]),
    ("deepseek_v3", {"n_routed_experts": 4}, [3, 4, 5, 6, 7]),  # transformers' default: 3 dense
    ("qwen2_moe", {"num_experts": 0}, []),
    ("qwen3_moe", {"num_experts": 4, "decoder_sparse_step": 3, "mlp_only_layers": [5]}, [2]),
    ("ernie4_5_moe", {"moe_num_experts": 4, "moe_layer_start_index": 2, "moe_layer_end_index": -1}, [2, 3, 4, 5, 6, 7]),
    ("jamba", {"num_experts": 1}, []),
    ("jamba", {"num_experts": 4}, [1, 3, 5, 7]),  # transformers' default: period 2, offset 1
]


@pytest.mark.parametrize("family,config,expected", RULES)
def test_moe_layer_rule_from_config(family, config, expected):
    adapter = families()[family]({"num_hidden_layers": 8, **config}, store=None)
    assert adapter.moe_layer_indices() == expected
