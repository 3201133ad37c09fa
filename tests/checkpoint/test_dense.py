"""Dense decoders open as models with no MoE layer, and read like transformers loads them."""

from __future__ import annotations

import pytest
import torch

import moelens as ml
from moelens.checkpoint.registry import families
from moelens.errors import NotMoEError
from moelens.testing.tiny import tiny_specs

from .hf_reference import decoder_layers

DENSE = [name for name, cls in families().items() if cls.is_dense]
SPECS = list(tiny_specs(families=DENSE))
ATTENTION = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}


def test_the_dense_families_are_registered():
    assert {"llama", "mistral", "qwen2", "qwen3"} <= set(DENSE)


@pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])
def test_dense_model_equals_transformers(spec, tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint(spec.family, spec.layout, spec.dtype, spec.sharded)
    model = ml.open_model(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.family == spec.family
    assert not model.is_moe
    assert model.moe_layers == []
    assert model.dense_layers == list(range(hf.config.num_hidden_layers))
    summary = model.summary()
    assert (summary["n_experts"], summary["top_k"], summary["expert_ffn"], summary["shared_experts"]) == (0, 0, 0, 0)
    assert summary["expert_layout"] is None
    assert summary["parameters_experts"] == 0
    assert summary["dtype"] == {"float32": "F32", "bfloat16": "BF16"}[spec.dtype]
    for i, hf_layer in enumerate(decoder_layers(hf)):
        with pytest.raises(NotMoEError):
            model.layer(i)
        mlp = model.dense_mlp(i)
        for role in ("gate", "up", "down"):
            ref = getattr(hf_layer.mlp, f"{role}_proj").weight.detach()
            torch.testing.assert_close(mlp[role].float(), ref, rtol=0, atol=0)
        attention = model.attention(i)
        assert set(attention) == set(ATTENTION)
        for key, attr in ATTENTION.items():
            ref = getattr(hf_layer.self_attn, attr).weight.detach()
            torch.testing.assert_close(attention[key].float(), ref, rtol=0, atol=0)
