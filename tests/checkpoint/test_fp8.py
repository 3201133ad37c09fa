"""DeepSeek-V3's FP8 Hub layout: e4m3 weights with a float32 ``weight_scale_inv`` per block.

The tiny FP8 checkpoint is the tiny DeepSeek-V3 model quantised block by block (see
``DeepSeekV3.tiny_write``). What moelens reads must (a) be exactly ``fp8 * scale_inv`` expanded
over the blocks the config names, and (b) lie within e4m3's rounding error of the unquantised
weights: half a unit in the last place, 2^-4 of the value for normal numbers and 2^-10 of the
block's scale in the subnormal range.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import moelens as ml
from moelens.testing.tiny import build_tiny_model

from .hf_reference import decoder_layers, generic_layer

FAMILY = "deepseek_v3"
CASES = [("float32", False), ("float32", True), ("bfloat16", False)]
MLA = {"q_a": "q_a_proj", "q_b": "q_b_proj", "kv_a": "kv_a_proj_with_mqa", "kv_b": "kv_b_proj", "o": "o_proj"}


@pytest.fixture(scope="module")
def unquantised():
    """The tiny model before quantisation, in each dtype (same seed as the checkpoints)."""
    model = build_tiny_model(FAMILY)
    return {"float32": model, "bfloat16": build_tiny_model(FAMILY).to(torch.bfloat16)}


def _block(path) -> int:
    config = json.loads((path / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "fp8" and quant["fmt"] == "e4m3"
    rows, cols = quant["weight_block_size"]
    assert rows == cols
    return rows


def _block_scales(weight: torch.Tensor, block: int) -> torch.Tensor:
    """Each element's block scale, amax(block) / 448, computed from the unquantised weight."""
    out = torch.empty_like(weight, dtype=torch.float32)
    rows, cols = weight.shape
    for r in range(0, rows, block):
        for c in range(0, cols, block):
            tile = weight[r : r + block, c : c + block].float()
            out[r : r + block, c : c + block] = tile.abs().max() / 448.0
    return out


def assert_within_fp8_error(read: torch.Tensor, weight: torch.Tensor, block: int) -> None:
    weight = weight.float()
    bound = weight.abs() * 2.0**-4 + _block_scales(weight, block) * 2.0**-10 + 1e-7
    err = (read.float() - weight).abs()
    assert read.shape == weight.shape
    assert (err <= bound).all(), f"max error/bound {float((err / bound).max()):.2f}"
    assert err.max() > 0  # it was quantised


def _expanded_scale(scale_inv: torch.Tensor, shape: tuple[int, int], block: int) -> torch.Tensor:
    rows, cols = shape
    out = torch.empty(shape)
    for i in range(math.ceil(rows / block)):
        for j in range(math.ceil(cols / block)):
            out[i * block : (i + 1) * block, j * block : (j + 1) * block] = scale_inv[i, j]
    return out


@pytest.mark.parametrize("dtype,sharded", CASES, ids=[f"{d}{'-sharded' if s else ''}" for d, s in CASES])
def test_fp8_checkpoint_reads_within_fp8_error(dtype, sharded, tiny_checkpoint, unquantised):
    path = tiny_checkpoint(FAMILY, "fp8", dtype, sharded)
    model = ml.open_model(path)
    plain = ml.open_model(tiny_checkpoint(FAMILY, "per_expert", dtype, sharded))
    ref_model = unquantised[dtype]
    block = _block(path)

    summary = model.summary()
    assert summary["dtype"] == "F8_E4M3"
    assert summary["expert_layout"] == "per_expert"
    assert summary["dtypes"]["F8_E4M3"] > 0
    # scales are not parameters: the counts equal the unquantised checkpoint's
    assert model.parameter_counts() == plain.parameter_counts()
    assert summary["moe_layers"] == plain.moe_layers

    for L in model.moe_layers:
        ref = generic_layer(ref_model, L)
        layer = model.layer(L)
        router = layer.router()  # the router is not quantised
        torch.testing.assert_close(router.weight.float(), ref["router"].float(), rtol=0, atol=0)
        torch.testing.assert_close(router.score_correction_bias.float(), ref["score_correction_bias"].float(), rtol=0, atol=0)
        for role in ("gate", "up", "down"):
            stack = layer.expert_stack(role)
            for e in range(layer.n_experts):
                assert_within_fp8_error(stack[e], ref[role][e], block)
                torch.testing.assert_close(layer.expert_matrix(e, role), stack[e], rtol=0, atol=0)
        (shared,) = layer.shared_experts()
        for mine, theirs in zip((shared.gate, shared.up, shared.down), ref["shared"][0]):
            assert_within_fp8_error(mine, theirs, block)

    hf_layers = decoder_layers(ref_model)
    for L in model.dense_layers:
        mlp = model.dense_mlp(L)
        for role in ("gate", "up", "down"):
            assert_within_fp8_error(mlp[role], getattr(hf_layers[L].mlp, f"{role}_proj").weight.detach(), block)
    attention = model.attention(0)
    for key in ("q_a", "q_b", "kv_b", "o"):
        assert_within_fp8_error(attention[key], getattr(hf_layers[0].self_attn, MLA[key]).weight.detach(), block)


def _raw_pairs(model):
    """(name, fp8 tensor, scale_inv) for every FP8 weight, read straight from the files."""
    from safetensors import safe_open

    for name, info in model.store.infos.items():
        if info.dtype == "F8_E4M3":
            with safe_open(str(info.file), "pt") as fh:
                raw = fh.get_tensor(name)
            scale_info = model.store.infos[f"{name}_scale_inv"]
            with safe_open(str(scale_info.file), "pt") as fh:
                scale = fh.get_tensor(f"{name}_scale_inv")
            yield name, raw, scale


def test_fp8_dequantisation_is_exact_over_whole_blocks(tiny_checkpoint):
    path = tiny_checkpoint(FAMILY, "fp8", "float32", True)
    model = ml.open_model(path)
    block = _block(path)
    checked = 0
    for name, raw, scale in _raw_pairs(model):
        if raw.shape[0] % block or raw.shape[1] % block:
            continue
        expected = raw.float() * _expanded_scale(scale, tuple(raw.shape), block)
        torch.testing.assert_close(model.store.read(name), expected, rtol=0, atol=0)
        checked += 1
    assert checked >= 10


def test_fp8_dequantisation_is_exact_over_partial_blocks(tiny_checkpoint):
    path = tiny_checkpoint(FAMILY, "fp8", "float32", False)
    model = ml.open_model(path)
    block = _block(path)
    partial = [(n, r, s) for n, r, s in _raw_pairs(model) if r.shape[0] % block or r.shape[1] % block]
    assert any(n.endswith("kv_a_proj_with_mqa.weight") for n, _, _ in partial)
    for name, raw, scale in partial:
        expected = raw.float() * _expanded_scale(scale, tuple(raw.shape), block)
        torch.testing.assert_close(model.store.read(name), expected, rtol=0, atol=0)
