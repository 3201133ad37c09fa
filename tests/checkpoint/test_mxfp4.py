"""MXFP4 (GPT-OSS): the format itself, and GPT-OSS checkpoints written as openai/gpt-oss is."""

from __future__ import annotations

import json

import pytest
import torch

import moelens as ml
from moelens.checkpoint.families.gpt_oss import GptOss
from moelens.checkpoint.store import FP4_VALUES, TensorStore, dequantize_mxfp4, quantize_mxfp4
from moelens.errors import ConfigError
from moelens.testing.tiny import TinySpec, build_tiny_model


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [..., 32] -> bytes [..., 16], low nibble first."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)


def _scale_of(scales: torch.Tensor) -> torch.Tensor:
    """2^(scale - 127), repeated over each block's 32 values."""
    return torch.ldexp(torch.ones(scales.shape), scales.float() - 127).repeat_interleave(32, dim=-1)


def test_dequantize_by_hand():
    # byte 0x72: low nibble 2 (1.0) first, high nibble 7 (6.0); byte 0xA9: 9 (-0.5), 10 (-1.0)
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0], blocks[0, 0, 1] = 0x72, 0xA9
    scales = torch.tensor([[128]], dtype=torch.uint8)  # 2^1
    out = dequantize_mxfp4(blocks, scales)
    assert out.shape == (1, 32)
    assert out[0, :4].tolist() == [2.0, 12.0, -1.0, -2.0]
    assert out[0, 4:].abs().sum() == 0


def test_dequantize_matches_transformers():
    """Same bytes, same numbers as transformers' own GPT-OSS dequantisation, which returns the
    transpose ([E, cols, rows]) because it restores GPT-OSS's [in, out] parameters."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 8, 2, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(110, 140, (3, 8, 2), dtype=torch.uint8, generator=g)
    ours = dequantize_mxfp4(blocks, scales)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert ours.shape == (3, 8, 64)
    torch.testing.assert_close(ours.transpose(1, 2), theirs, rtol=0, atol=0)


def test_quantize_is_exact_on_representable_values():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (2, 5, 3, 32), generator=g)
    codes[..., 7] = 7  # one +6.0 per block pins the scale to the encoded one
    blocks, scales = _pack(codes), torch.randint(100, 150, (2, 5, 3), dtype=torch.uint8, generator=g)
    values = dequantize_mxfp4(blocks, scales)
    blocks2, scales2 = quantize_mxfp4(values)
    assert torch.equal(scales2, scales)
    assert torch.equal(blocks2, blocks)


def test_quantize_error_within_format_bound():
    w = torch.randn(4, 16, 96, generator=torch.Generator().manual_seed(2)) * 0.05
    blocks, scales = quantize_mxfp4(w)
    err = (dequantize_mxfp4(blocks, scales) - w).abs()
    # rounding to the e2m1 grid, with no clipping: at most a quarter of the scale or of |w|
    bound = torch.maximum(_scale_of(scales), w.abs()) / 4
    assert (err <= bound).all()
    assert err.max() > 0  # random weights are not representable: the test exercised rounding
    assert set(dequantize_mxfp4(blocks, scales).div(_scale_of(scales)).unique().tolist()) <= set(FP4_VALUES)


def test_quantize_rejects_ragged_blocks():
    with pytest.raises(ConfigError, match="multiple of 32"):
        quantize_mxfp4(torch.zeros(4, 40))


@pytest.fixture(scope="module")
def mxfp4_checkpoint(tiny_checkpoint):
    return tiny_checkpoint("gpt_oss", "mxfp4", "float32", False)


def test_files_are_laid_out_like_openai_gpt_oss(mxfp4_checkpoint):
    store = TensorStore(mxfp4_checkpoint)
    config = GptOss.tiny_config()
    E, d, F = config.num_local_experts, config.hidden_size, config.intermediate_size
    prefix = "model.layers.0.mlp.experts."
    expected = {
        "gate_up_proj_blocks": ("U8", (E, 2 * F, d // 32, 16)),
        "gate_up_proj_scales": ("U8", (E, 2 * F, d // 32)),
        "down_proj_blocks": ("U8", (E, d, F // 32, 16)),
        "down_proj_scales": ("U8", (E, d, F // 32)),
        "gate_up_proj_bias": ("F32", (E, 2 * F)),
        "down_proj_bias": ("F32", (E, d)),
    }
    for suffix, (dtype, shape) in expected.items():
        info = store.infos[prefix + suffix]
        assert (info.dtype, info.shape) == (dtype, shape), suffix
    assert prefix + "gate_up_proj" not in store.infos  # only the packed form is on disk
    assert store.dtype(prefix + "gate_up_proj") == "MXFP4"
    assert store.shape(prefix + "gate_up_proj") == (E, 2 * F, d)
    quant = json.loads((mxfp4_checkpoint / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "mxfp4"


def test_experts_equal_the_encoded_values(mxfp4_checkpoint):
    """moelens reads exactly what was encoded, oriented [out, in] with gate = even columns of
    GPT-OSS's [in, out] gate_up, and the encoding is within MXFP4's error of the weights."""
    model = ml.open_model(mxfp4_checkpoint)
    assert model.dtype == "MXFP4"
    hf = build_tiny_model("gpt_oss")  # the same seeded weights tiny_write quantised
    for L in model.moe_layers:
        experts = hf.model.layers[L].mlp.experts
        gate_up = experts.gate_up_proj.detach().transpose(1, 2)  # [E, 2F, d]
        down = experts.down_proj.detach().transpose(1, 2)  # [E, d, F]
        encoded = {
            "gate": dequantize_mxfp4(*quantize_mxfp4(gate_up))[:, 0::2],
            "up": dequantize_mxfp4(*quantize_mxfp4(gate_up))[:, 1::2],
            "down": dequantize_mxfp4(*quantize_mxfp4(down)),
        }
        original = {"gate": gate_up[:, 0::2], "up": gate_up[:, 1::2], "down": down}
        layer = model.layer(L)
        for role in ("gate", "up", "down"):
            torch.testing.assert_close(layer.expert_stack(role), encoded[role], rtol=0, atol=0)
            for e in range(layer.n_experts):
                torch.testing.assert_close(layer.expert_matrix(e, role), encoded[role][e], rtol=0, atol=0)
            err = (layer.expert_stack(role) - original[role]).abs()
            assert err.max() <= original[role].abs().max() / 4
        bias = experts.gate_up_proj_bias.detach()
        expert = layer.expert(2)
        torch.testing.assert_close(expert.gate_bias, bias[2, 0::2], rtol=0, atol=0)
        torch.testing.assert_close(expert.up_bias, bias[2, 1::2], rtol=0, atol=0)
        torch.testing.assert_close(expert.down_bias, experts.down_proj_bias.detach()[2], rtol=0, atol=0)


def test_representable_weights_round_trip_exactly(tmp_path):
    """Weights already on the MXFP4 grid come back bit for bit through the whole path."""
    hf = build_tiny_model("gpt_oss", seed=3)
    with torch.no_grad():
        for layer in hf.model.layers:
            for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                snapped = dequantize_mxfp4(*quantize_mxfp4(p.transpose(1, 2))).transpose(1, 2)
                p.copy_(snapped)
    GptOss.tiny_write(hf, tmp_path, TinySpec("gpt_oss", "mxfp4", "float32", sharded=True))
    model = ml.open_model(tmp_path)
    for L in model.moe_layers:
        experts = hf.model.layers[L].mlp.experts
        expert = model.layer(L).expert(1)
        torch.testing.assert_close(expert.gate, experts.gate_up_proj[1, :, 0::2].T, rtol=0, atol=0)
        torch.testing.assert_close(expert.up, experts.gate_up_proj[1, :, 1::2].T, rtol=0, atol=0)
        torch.testing.assert_close(expert.down, experts.down_proj[1].T, rtol=0, atol=0)
