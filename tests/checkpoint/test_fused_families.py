"""What test_families and test_structure do not cover for the families fused on disk: GPT-OSS
biases, DBRX's fused attention and row slices, JetMoE's shared keys and values, and the
multimodal form of Llama 4."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import moelens as ml
from moelens.checkpoint.store import TensorStore

from .hf_reference import reference_layer


def _load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("layout", ["fused", "mxfp4"])
def test_gpt_oss_biases_equal_transformers(layout, tiny_checkpoint):
    path = tiny_checkpoint("gpt_oss", layout)
    model, hf = ml.open_model(path), _load_hf(path)
    for L in model.moe_layers:
        ref = reference_layer(hf, "gpt_oss", L)
        layer = model.layer(L)
        torch.testing.assert_close(layer.router().bias, ref["router_bias"], rtol=0, atol=0)
        for e in range(layer.n_experts):
            expert = layer.expert(e)
            for role in ("gate", "up", "down"):
                torch.testing.assert_close(getattr(expert, role), ref[role][e], rtol=0, atol=0)
                torch.testing.assert_close(getattr(expert, f"{role}_bias"), ref[f"{role}_bias"][e], rtol=0, atol=0)


def test_dbrx_attention_reproduces_transformers(tiny_checkpoint):
    """q, k, v split out of Wqkv give what transformers' attention computes before clipping."""
    path = tiny_checkpoint("dbrx", "fused")
    model, hf = ml.open_model(path), _load_hf(path)
    x = torch.randn(5, model.hidden_size, generator=torch.Generator().manual_seed(0))
    for L in range(model.n_layers):
        attn = hf.transformer.blocks[L].norm_attn_norm.attn
        ours = model.attention(L)
        kv = attn.num_key_value_heads * attn.head_dim
        with torch.no_grad():
            q, k, v = attn.Wqkv(x).split([attn.hidden_size, kv, kv], dim=-1)
        torch.testing.assert_close(x @ ours["q"].T, q)
        torch.testing.assert_close(x @ ours["k"].T, k)
        torch.testing.assert_close(x @ ours["v"].T, v)
        torch.testing.assert_close(ours["o"], attn.out_proj.weight.detach(), rtol=0, atol=0)


def test_dbrx_reads_only_one_experts_rows(tiny_checkpoint, monkeypatch):
    model = ml.open_model(tiny_checkpoint("dbrx", "fused"))
    layer = model.layer(1)
    f, reads = layer.expert_ffn, []
    original = TensorStore.read

    def spy(self, name, index=None):
        reads.append((name, index))
        return original(self, name, index)

    monkeypatch.setattr(TensorStore, "read", spy)
    layer.expert_matrix(2, "down")
    assert reads == [("transformer.blocks.1.ffn.experts.mlp.w2", slice(2 * f, 3 * f))]


def test_jetmoe_keys_and_values_equal_transformers(tiny_checkpoint):
    path = tiny_checkpoint("jetmoe", "fused")
    model, hf = ml.open_model(path), _load_hf(path)
    for L in range(model.n_layers):
        kv = hf.model.layers[L].self_attention.kv_proj.weight.detach()
        attention = model.attention(L)
        assert set(attention) == {"k", "v"}
        torch.testing.assert_close(torch.cat([attention["k"], attention["v"]]), kv, rtol=0, atol=0)


def test_llama4_multimodal_reads_like_text_only(tiny_checkpoint):
    """The Hub form (text_config, language_model.model. names) gives the same view as
    Llama4ForCausalLM built from the same seed."""
    text = ml.open_model(tiny_checkpoint("llama4", "fused"))
    wrapped = ml.open_model(tiny_checkpoint("llama4", "multimodal"))
    config = json.loads((wrapped.path / "config.json").read_text())
    assert config["architectures"] == ["Llama4ForConditionalGeneration"] and "text_config" in config
    assert wrapped.store.names() and all(not n.startswith("model.") for n in wrapped.store.names())
    for key in ("family", "n_layers", "moe_layers", "dense_layers", "n_experts", "top_k", "hidden_size", "expert_ffn", "shared_experts"):
        assert wrapped.summary()[key] == text.summary()[key], key
    assert wrapped.summary()["parameters_experts"] == text.summary()["parameters_experts"]
    for L in text.moe_layers:
        torch.testing.assert_close(wrapped.layer(L).router().weight, text.layer(L).router().weight, rtol=0, atol=0)
        for role in ("gate", "up", "down"):
            torch.testing.assert_close(wrapped.layer(L).expert_stack(role), text.layer(L).expert_stack(role), rtol=0, atol=0)
        torch.testing.assert_close(wrapped.layer(L).shared_experts()[0].down, text.layer(L).shared_experts()[0].down, rtol=0, atol=0)
    for L in text.dense_layers:
        torch.testing.assert_close(wrapped.dense_mlp(L)["gate"], text.dense_mlp(L)["gate"], rtol=0, atol=0)
        torch.testing.assert_close(wrapped.attention(L)["q"], text.attention(L)["q"], rtol=0, atol=0)


@pytest.mark.parametrize("moe_layers, expected", [([0, 3], [0, 3]), (None, [1, 3])])
def test_llama4_moe_layers_from_config(moe_layers, expected, tiny_checkpoint, tmp_path):
    """An explicit ``moe_layers`` wins; without it, every ``interleave_moe_layer_step``-th layer."""
    path = tmp_path / "llama4"
    shutil.copytree(tiny_checkpoint("llama4", "fused"), path)
    config = json.loads((path / "config.json").read_text())
    config.pop("moe_layers", None)
    if moe_layers is not None:
        config["moe_layers"] = moe_layers
    (path / "config.json").write_text(json.dumps(config))
    assert ml.open_model(path).moe_layers == expected


def test_granite_hybrid_without_experts_is_dense(tmp_path):
    """Granite 4's dense variants (``num_local_experts`` = 0) keep only the shared MLP."""
    from transformers import AutoModelForCausalLM

    from moelens.checkpoint.families.granite import GraniteMoeHybrid
    from moelens.errors import NotMoEError

    config = GraniteMoeHybrid.tiny_config()
    config.num_local_experts = 0
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config).eval()
    hf.save_pretrained(tmp_path)
    model = ml.open_model(tmp_path)
    assert model.family == "granitemoehybrid" and model.moe_layers == [] and not model.is_moe
    assert model.summary()["dtype"] == "F32"
    with pytest.raises(NotMoEError):
        model.layer(0)
    for L in range(model.n_layers):
        gate_up = hf.model.layers[L].shared_mlp.input_linear.weight.detach()
        mlp = model.dense_mlp(L)
        torch.testing.assert_close(torch.cat([mlp["gate"], mlp["up"]]), gate_up, rtol=0, atol=0)
        torch.testing.assert_close(mlp["down"], hf.model.layers[L].shared_mlp.output_linear.weight.detach(), rtol=0, atol=0)
