"""Bad input, end to end: each mistake raises the right MoelensError from the API, and the
command line prints it as one line on stderr and exits with status 2, without a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moelens as ml
from moelens import cli
from moelens.checkpoint.registry import supported_architectures
from moelens.errors import (
    CheckpointFormatError,
    IndexOutOfRangeError,
    NotMoEError,
    SourceNotFoundError,
    UnsupportedArchitectureError,
)

EXPERT_W2 = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
EXPERT_W1 = "model.layers.0.block_sparse_moe.experts.1.w1.weight"


def run_cli(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    """Run ``moelens *args`` through :func:`moelens.cli.main`, as the installed script does."""
    monkeypatch.setattr(sys, "argv", ["moelens", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def assert_cli_fails(capsys, monkeypatch, source: Path | str, *phrases: str) -> str:
    code, out, err = run_cli(capsys, monkeypatch, "inspect", str(source))
    assert code == 2
    assert "Traceback" not in err + out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for phrase in phrases:
        assert phrase in lines[0]
    return lines[0]


@pytest.fixture
def mixtral(tiny_checkpoint, tmp_path) -> Path:
    """A private copy of a tiny Mixtral checkpoint, free to damage."""
    path = tmp_path / "mixtral"
    shutil.copytree(tiny_checkpoint("mixtral", "per_expert"), path)
    return path


@pytest.fixture
def sharded_mixtral(tiny_checkpoint, tmp_path) -> Path:
    path = tmp_path / "mixtral-sharded"
    shutil.copytree(tiny_checkpoint("mixtral", "per_expert", sharded=True), path)
    return path


def rewrite(path: Path, change) -> None:
    """Load a safetensors file, let ``change`` edit the dict of tensors, save it back."""
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


# -- where the checkpoint is -----------------------------------------------------------------------
def test_missing_path(tmp_path, capsys, monkeypatch):
    with pytest.raises(SourceNotFoundError, match="does not exist"):
        ml.open_model(tmp_path / "nowhere")
    assert_cli_fails(capsys, monkeypatch, tmp_path / "nowhere", "does not exist")


def test_directory_without_config(mixtral, capsys, monkeypatch):
    (mixtral / "config.json").unlink()
    with pytest.raises(SourceNotFoundError, match="no config.json"):
        ml.open_model(mixtral)
    assert_cli_fails(capsys, monkeypatch, mixtral, "no config.json")


def test_repo_id_not_in_cache(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(SourceNotFoundError, match="nor in the Hugging Face cache") as info:
        ml.open_model("someorg/absent-model")
    assert str(tmp_path / "hub") in str(info.value)
    assert_cli_fails(capsys, monkeypatch, "someorg/absent-model", "someorg/absent-model", "HF_HUB_CACHE")


def fake_hub_cache(root: Path, checkpoint: Path, repo: str, commit: str) -> Path:
    """Lay ``checkpoint`` out as huggingface_hub does: blobs, snapshot symlinks, refs/main."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(checkpoint.iterdir())):
        blob = repo_dir / "blobs" / f"blob{i:04d}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def test_repo_id_in_cache_opens(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = fake_hub_cache(tmp_path / "hub", tiny_checkpoint("mixtral", "per_expert"), "someorg/tiny-mixtral", commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    model = ml.open_model("someorg/tiny-mixtral")
    assert model.path == snapshot and model.name == "someorg/tiny-mixtral"
    assert model.family == "mixtral" and model.layer(0).expert(0).gate.shape == (model.expert_ffn, model.hidden_size)
    assert ml.open_model("someorg/tiny-mixtral", revision=commit).path == snapshot
    with pytest.raises(SourceNotFoundError, match=commit):  # names the snapshots it has
        ml.open_model("someorg/tiny-mixtral", revision="v2.0")
    code, out, _ = run_cli(capsys, monkeypatch, "inspect", "someorg/tiny-mixtral", "--json")
    assert code == 0 and json.loads(out)["family"] == "mixtral"


# -- what the config says ----------------------------------------------------------------------------
def test_unsupported_architecture(mixtral, capsys, monkeypatch):
    config = json.loads((mixtral / "config.json").read_text())
    config.update(architectures=["FancyNewMoeForCausalLM"], model_type="fancy_new_moe")
    (mixtral / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="FancyNewMoeForCausalLM") as info:
        ml.open_model(mixtral)
    assert "MixtralForCausalLM" in str(info.value) and "GptOssForCausalLM" in str(info.value)
    assert_cli_fails(capsys, monkeypatch, mixtral, "FancyNewMoeForCausalLM", "MixtralForCausalLM")


@pytest.mark.parametrize("damage, phrase", [
    (lambda c: c.pop("num_hidden_layers"), "'num_hidden_layers'"),
    (lambda c: c.update(num_hidden_layers="many"), "cannot use"),
])
def test_config_missing_or_bad_key(mixtral, damage, phrase, capsys, monkeypatch):
    config = json.loads((mixtral / "config.json").read_text())
    damage(config)
    (mixtral / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointFormatError, match=phrase):
        ml.open_model(mixtral)
    assert_cli_fails(capsys, monkeypatch, mixtral, "config.json")


def test_config_not_json(mixtral, capsys, monkeypatch):
    (mixtral / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointFormatError, match="not valid JSON"):
        ml.open_model(mixtral)
    assert_cli_fails(capsys, monkeypatch, mixtral, "not valid JSON")


def test_moe_layer_of_a_dense_model(tmp_path, capsys, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    if "LlamaForCausalLM" not in supported_architectures():
        with pytest.raises(UnsupportedArchitectureError):
            ml.open_model(tmp_path / "llama")
        assert_cli_fails(capsys, monkeypatch, tmp_path / "llama", "LlamaForCausalLM")
        return
    model = ml.open_model(tmp_path / "llama")
    assert not model.is_moe and model.moe_layers == []
    with pytest.raises(NotMoEError, match="dense"):
        model.layer(0)
    assert list(model.layers()) == []
    code, out, _ = run_cli(capsys, monkeypatch, "inspect", str(tmp_path / "llama"))
    assert code == 0 and "dense" in out  # inspecting a dense model is no mistake


# -- what the files hold -------------------------------------------------------------------------------
def test_index_names_a_missing_shard(sharded_mixtral, capsys, monkeypatch):
    shards = sorted(sharded_mixtral.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    with pytest.raises(CheckpointFormatError, match=f"shard {shards[1].name} .* is missing"):
        ml.open_model(sharded_mixtral)
    assert_cli_fails(capsys, monkeypatch, sharded_mixtral, shards[1].name, "missing")


def test_truncated_safetensors(mixtral, capsys, monkeypatch):
    file = mixtral / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        ml.open_model(mixtral)
    assert_cli_fails(capsys, monkeypatch, mixtral, "truncated", "model.safetensors")


def test_truncated_inside_the_header(mixtral, capsys, monkeypatch):
    file = mixtral / "model.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        ml.open_model(mixtral)
    assert_cli_fails(capsys, monkeypatch, mixtral, "truncated")


def test_corrupt_header(mixtral, capsys, monkeypatch):
    file = mixtral / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:40] = b"\xff" * 32  # the header's first bytes: no longer JSON
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match="corrupt header"):
        ml.open_model(mixtral)
    assert_cli_fails(capsys, monkeypatch, mixtral, "corrupt header")


def test_missing_tensor(mixtral, capsys, monkeypatch):
    rewrite(mixtral / "model.safetensors", lambda t: t.pop(EXPERT_W2))
    model = ml.open_model(mixtral)  # lazy: nothing is read yet
    with pytest.raises(CheckpointFormatError, match=EXPERT_W2.replace(".", r"\.")):
        model.layer(1).expert(2)
    with pytest.raises(CheckpointFormatError, match="incomplete"):
        model.check()
    model.layer(1).expert(1)  # the rest still reads
    assert_cli_fails(capsys, monkeypatch, mixtral, EXPERT_W2, "incomplete")


def test_missing_router(mixtral, capsys, monkeypatch):
    rewrite(mixtral / "model.safetensors", lambda t: t.pop("model.layers.0.block_sparse_moe.gate.weight"))
    with pytest.raises(CheckpointFormatError, match="router of layer 0 is missing"):
        ml.open_model(mixtral).layer(0).router()
    assert_cli_fails(capsys, monkeypatch, mixtral, "router of layer 0 is missing")


def test_nan_weights_in_an_expert(mixtral):
    def poison(tensors):
        tensors[EXPERT_W1][3, 5] = float("nan")

    rewrite(mixtral / "model.safetensors", poison)
    layer = ml.open_model(mixtral).layer(0)
    for read in (lambda: layer.expert(1), lambda: layer.expert_matrix(1, "gate"), lambda: layer.expert_stack("gate")):
        with pytest.raises(CheckpointFormatError, match="1 NaN/inf") as info:
            read()
        assert EXPERT_W1 in str(info.value)
    layer.expert(0)  # a healthy expert still reads
    layer.expert_matrix(1, "up")


# -- tensors of the wrong shape -------------------------------------------------------------------------
# Tiny configs: d = 32 (GPT-OSS 64), E = 4; expert width F = 48 (Qwen2-MoE, DeepSeek-V2: 24;
# GPT-OSS: 32); shared width Fs = 40 (Qwen2-MoE, Granite), 2 x 24 (DeepSeek-V2), 48 (Llama4).
MALFORMED = [
    # (family, layout, tensor, shape written, expected shape as the message spells it)
    ("mixtral", "per_expert", "model.layers.0.block_sparse_moe.experts.3.w1.weight", (48, 31), "[F, d] = [48, 32]"),
    ("mixtral", "per_expert", "model.layers.1.block_sparse_moe.experts.1.w2.weight", (48, 32), "[d, F] = [32, 48]"),  # transposed
    ("mixtral", "per_expert", "model.layers.1.block_sparse_moe.gate.weight", (4, 31), "[E, d] = [4, 32]"),
    ("mixtral", "per_expert", "model.layers.0.block_sparse_moe.gate.weight", (5, 32), "[E, d] = [4, 32]"),
    ("mixtral", "fused", "model.layers.1.mlp.experts.gate_up_proj", (4, 96, 31), "[E, 2F, d] = [4, 96, 32]"),
    ("mixtral", "fused", "model.layers.0.mlp.experts.down_proj", (4, 32, 47), "[E, d, F] = [4, 32, 48]"),
    ("gpt_oss", "fused", "model.layers.1.mlp.experts.gate_up_proj", (4, 64, 62), "[E, d, 2F] = [4, 64, 64]"),
    ("gpt_oss", "fused", "model.layers.0.mlp.experts.gate_up_proj_bias", (4, 62), "[E, 2F] = [4, 64]"),
    ("llama4", "fused", "model.layers.1.feed_forward.experts.down_proj", (4, 48, 31), "[E, F, d] = [4, 48, 32]"),
    ("dbrx", "fused", "transformer.blocks.1.ffn.experts.mlp.w2", (192, 31), "[E·F, d] = [192, 32]"),
    ("qwen2_moe", "per_expert", "model.layers.3.mlp.experts.2.up_proj.weight", (23, 32), "[F, d] = [24, 32]"),
    ("qwen2_moe", "per_expert", "model.layers.1.mlp.shared_expert.up_proj.weight", (40, 31), "[Fs, d] = [40, 32]"),
    ("qwen2_moe", "per_expert", "model.layers.0.mlp.shared_expert_gate.weight", (1, 31), "[1, d] = [1, 32]"),
    ("deepseek_v2", "per_expert", "model.layers.1.mlp.shared_experts.down_proj.weight", (32, 24), "[d, Fs] = [32, 48]"),
    ("granitemoeshared", "hub", "model.layers.1.shared_mlp.output_linear.weight", (32, 39), "[d, Fs] = [32, 40]"),
    ("minimax_m2", "per_expert", "model.layers.1.block_sparse_moe.e_score_correction_bias", (5,), "E = 4 values are expected"),
]


def replace_tensor(directory: Path, name: str, shape: tuple[int, ...]) -> None:
    """Rewrite tensor ``name`` of a single-file checkpoint with random values of ``shape``."""

    def change(tensors):
        assert name in tensors, sorted(tensors)
        tensors[name] = torch.randn(shape, dtype=tensors[name].dtype)

    rewrite(directory / "model.safetensors", change)


@pytest.mark.parametrize("family, layout, name, shape, expected", MALFORMED, ids=[f"{m[0]}-{m[2].rsplit('.', 2)[-2]}" for m in MALFORMED])
def test_a_tensor_of_the_wrong_shape_is_named_from_headers(family, layout, name, shape, expected, tiny_checkpoint, tmp_path):
    path = tmp_path / family
    shutil.copytree(tiny_checkpoint(family, layout), path)
    replace_tensor(path, name, shape)
    model = ml.open_model(path)
    layer = int(name.split(".")[2])
    for check in (model.check, model.layer(layer).check, model.summary):
        with pytest.raises(CheckpointFormatError) as info:
            check()
        message = str(info.value)
        assert f"layer {layer} of {path} is malformed" in message
        assert f"tensor {name!r} has shape [{', '.join(map(str, shape))}] where {expected}" in message
        assert "(and" not in message  # only the damaged tensor is named
    for other in model.moe_layers:
        if other != layer:
            model.layer(other).check()  # the other layers are fine


def test_malformed_expert_stops_inspect_and_align_with_one_line(mixtral, capsys, monkeypatch):
    """Expert 3's gate saved as [48, 31] in a model whose experts are [48, 32]: ``inspect`` names
    it instead of summarising, and alignment stops before any work with the same error (it
    raised a ValueError from inside the decomposition)."""
    name = "model.layers.0.block_sparse_moe.experts.3.w1.weight"
    replace_tensor(mixtral, name, (48, 31))
    line = assert_cli_fails(capsys, monkeypatch, mixtral, name, "[48, 31]", "[48, 32]", "malformed")
    assert str(mixtral) in line
    with pytest.raises(CheckpointFormatError, match=r"experts\.3\.w1\.weight' has shape \[48, 31\]"):
        ml.router_alignment(ml.open_model(mixtral), layers=[0])


def test_config_that_disagrees_with_every_expert(mixtral):
    """The expected shapes come from config.json: an expert width it states wrongly makes
    every expert tensor misshapen, and the message says where F came from."""
    config = json.loads((mixtral / "config.json").read_text())
    config["intermediate_size"] = 64
    (mixtral / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointFormatError, match=r"where \[F, d\] = \[64, 32\] is expected \(and 11 more\) \(E = 4, F = 64 and d = 32 from config\.json\)"):
        ml.open_model(mixtral).check()


def test_without_a_width_in_the_config_the_first_expert_sets_it(mixtral):
    config = json.loads((mixtral / "config.json").read_text())
    del config["intermediate_size"]
    (mixtral / "config.json").write_text(json.dumps(config))
    ml.open_model(mixtral).check()
    replace_tensor(mixtral, "model.layers.1.block_sparse_moe.experts.2.w3.weight", (47, 32))
    with pytest.raises(CheckpointFormatError, match=r"experts\.2\.w3\.weight' has shape \[47, 32\] where \[F, d\] = \[48, 32\] is expected \(E = 4 and d = 32 from config\.json, F = 48 from the layer's first expert\)"):
        ml.open_model(mixtral).check()


def test_a_missing_shared_expert_matrix_is_incomplete(tiny_checkpoint, tmp_path):
    path = tmp_path / "qwen2_moe"
    shutil.copytree(tiny_checkpoint("qwen2_moe"), path)
    name = "model.layers.3.mlp.shared_expert.gate_proj.weight"
    rewrite(path / "model.safetensors", lambda t: t.pop(name))
    with pytest.raises(CheckpointFormatError, match=f"layer 3 of .* is incomplete: {name.replace('.', chr(92) + '.')} is missing"):
        ml.open_model(path).check()


# -- what is asked of it ------------------------------------------------------------------------------
def test_layer_and_expert_out_of_range(tiny_checkpoint):
    model = ml.open_model(tiny_checkpoint("mixtral", "per_expert"))
    for bad in (model.n_layers, -1, 99):
        with pytest.raises(IndexOutOfRangeError, match=f"layer {bad} is out of range"):
            model.layer(bad)
        with pytest.raises(IndexOutOfRangeError):
            model.attention(bad)
    layer = model.layer(0)
    for bad in (layer.n_experts, -1):
        with pytest.raises(IndexOutOfRangeError, match=f"expert {bad} is out of range"):
            layer.expert(bad)
        with pytest.raises(IndexOutOfRangeError):
            layer.expert_matrix(bad, "down")
    with pytest.raises(IndexError):  # also an IndexError, for code that catches that
        layer.expert(layer.n_experts)


def test_python_dash_m_prints_one_line(tmp_path):
    """``python -m moelens`` goes through the same entry point as the installed script."""
    result = subprocess.run(
        [sys.executable, "-m", "moelens", "inspect", str(tmp_path / "nowhere")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr


def test_router_wider_than_the_fused_experts_is_a_format_error(tiny_checkpoint, tmp_path):
    """A fused expert tensor of 4 experts under a router that scores 6: named from headers
    before any work, and a direct read of the missing expert is a format error too."""


    path = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint("mixtral", "fused"), path)
    tensors = load_file(path / "model.safetensors")
    name = next(n for n in tensors if n.endswith("layers.0.mlp.gate.weight"))
    tensors[name] = torch.cat([tensors[name], tensors[name][:2]])
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    model = ml.open_model(path)
    with pytest.raises(CheckpointFormatError):
        ml.router_alignment(model, layers=[0])
    with pytest.raises(CheckpointFormatError, match="entries along its first axis"):
        model.layer(0).expert_matrix(5, "gate")


def test_numpy_integers_are_indices_and_bools_are_not(tiny_checkpoint):
    import numpy as np

    model = ml.open_model(tiny_checkpoint("mixtral"))
    layer = model.layer(np.int64(1))
    assert layer.index == 1 and type(layer.index) is int
    torch.testing.assert_close(layer.expert(np.int32(3)).gate, layer.expert(3).gate)
    with pytest.raises(IndexOutOfRangeError, match="bool"):
        layer.expert(True)
