"""Every family and layout: the moelens view equals what transformers loads."""

from __future__ import annotations

import pytest
import torch

import moelens as ml
from moelens.checkpoint.registry import families
from moelens.testing.tiny import tiny_specs

from .hf_reference import reference_layer

# dense families (no MoE layer) are compared with transformers in test_dense.py
SPECS = [s for s in tiny_specs() if not families()[s.family].is_dense]


def _load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])
def test_view_equals_transformers(spec, tiny_checkpoint):
    path = tiny_checkpoint(spec.family, spec.layout, spec.dtype, spec.sharded)
    model = ml.open_model(path)
    hf = _load_hf(path)
    assert model.family == spec.family
    assert model.n_layers == hf.config.num_hidden_layers
    assert model.is_moe
    tol = dict(rtol=0, atol=0)
    for L in model.moe_layers:
        ref = reference_layer(hf, spec.family, L)
        layer = model.layer(L)
        router = layer.router()
        torch.testing.assert_close(router.weight.float(), ref["router"].float(), **tol)
        if "score_correction_bias" in ref:
            torch.testing.assert_close(router.score_correction_bias.float(), ref["score_correction_bias"].float(), **tol)
        else:
            assert router.score_correction_bias is None
        if "shared_expert_gate" in ref:
            torch.testing.assert_close(layer.shared_expert_gate().float(), ref["shared_expert_gate"].float(), **tol)
        else:
            assert layer.shared_expert_gate() is None
        assert layer.n_experts == ref["router"].shape[0]
        for role in ("gate", "up", "down"):
            stack = layer.expert_stack(role).float()
            torch.testing.assert_close(stack, ref[role].float(), **tol)
            for e in (0, layer.n_experts - 1):
                torch.testing.assert_close(layer.expert_matrix(e, role).float(), ref[role][e].float(), **tol)
        assert layer.expert_ffn == ref["gate"].shape[1]
        assert len(layer.shared_experts()) == len(ref["shared"])
        for mine, (g, u, d) in zip(layer.shared_experts(), ref["shared"]):
            torch.testing.assert_close(mine.gate.float(), g.float(), **tol)
            torch.testing.assert_close(mine.up.float(), u.float(), **tol)
            torch.testing.assert_close(mine.down.float(), d.float(), **tol)
