"""The calibration pass against plain-loop references: block inputs, router logits, top-k,
usage and every expert's mean output, per family against transformers' own experts modules,
with known cases, batch invariance, text handling, resume and bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import moelens as ml
from moelens.analyses.calibration import calibrate, load_calibration
from moelens.calibration.activation import expert_activation
from moelens.calibration.capture import LayerCapture, right_padded, topk_of_logits
from moelens.calibration.features import ExpertFeatures
from moelens.calibration.layer import batches, expert_weights, usage_counts
from moelens.calibration.texts import read_lines, tokenise
from moelens.errors import ConfigError, IndexOutOfRangeError, NotMoEError

from . import clustering_fixtures as fx


@pytest.fixture(scope="module")
def text(lm_files):
    return lm_files["text"]


@pytest.fixture(scope="module")
def run(lm_dir, text):
    return calibrate(lm_dir, text)


# ----------------------------------------------------------------------------------------------
# A slow reference: one sequence at a time, a full forward pass, float64, loops over experts
# ----------------------------------------------------------------------------------------------
def _silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1.0 + torch.exp(-x))


def reference_layer(lm_dir, sequences, layer):
    from moelens.runtime import load_causal_lm
    from moelens.runtime.architecture import describe

    lm = load_causal_lm(lm_dir, dtype="float32")
    mlp = describe(lm).layers[layer].mlp
    seen = []
    handle = mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    try:
        with torch.no_grad():
            for seq in sequences:
                lm(input_ids=torch.tensor([list(seq)]))
    finally:
        handle.remove()
    x = torch.cat(seen).double()                                              # [N, d]
    view = ml.open_model(lm_dir).layer(layer)
    logits = x @ view.router().weight.double().T                              # [N, E]
    e, k = view.n_experts, view.top_k
    probs = torch.softmax(logits, -1)
    topk = np.array([sorted(range(e), key=lambda j: (-float(probs[t, j]), j))[:k] for t in range(len(x))])
    counts = np.zeros(e, dtype=np.int64)
    for row in topk:
        for j in row:
            counts[j] += 1
    features = np.zeros((e, x.shape[1]))
    for j in range(e):
        w = view.expert(j)
        out = (_silu(x @ w.gate.double().T) * (x @ w.up.double().T)) @ w.down.double().T   # [N, d]
        features[j] = out.mean(0).numpy()
    return x, logits.numpy(), topk, counts, features


def test_every_record_equals_the_plain_reference(run, lm_dir, text):
    tokens = run["calibration_tokens"]
    sequences = [tuple(g["token_id"]) for _, g in tokens.groupby("sequence", sort=True)]
    for layer in run.layers:
        _, logits, topk, counts, features = reference_layer(lm_dir, sequences, layer)
        np.testing.assert_allclose(run.router_logits(layer), logits, atol=2e-5, rtol=0)
        assert np.array_equal(np.sort(run.topk(layer), 1), np.sort(topk, 1))
        usage = run["calibration_usage"][run["calibration_usage"]["layer"] == layer].sort_values("expert")
        assert usage["count"].tolist() == counts.tolist()
        np.testing.assert_allclose(usage["frequency"], counts / counts.sum(), rtol=0, atol=1e-15)
        np.testing.assert_allclose(run.features(layer), features, rtol=1e-5, atol=1e-6 * np.abs(features).max())
        np.testing.assert_allclose(usage["feature_norm"], np.linalg.norm(features, axis=1), rtol=1e-5)
        np.testing.assert_allclose(usage["logit_mean"], logits.mean(0), atol=1e-5)
    layers = run["calibration_layers"]
    assert (layers["n_tokens"] == len(tokens)).all() and (layers["routing"] == "experts").all()
    assert (run["calibration_usage"].groupby("layer")["frequency"].sum() - 1).abs().max() < 1e-12


def test_tokens_follow_the_text_lines_without_the_held_out_tenth(run, text):
    lines = [line for line in text.read_text().splitlines()]
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    assert len(numbered) == 20 and run.manifest["options"]["heldout_lines"] == 2
    tok = fx.tokenizer()
    expected = [(n, tok(line)["input_ids"][: fx.POSITIONS]) for n, line in numbered[:18]]
    tokens = run["calibration_tokens"]
    got = [(int(g["line"].iloc[0]), g["token_id"].tolist()) for _, g in tokens.groupby("sequence", sort=True)]
    assert got == expected  # blank lines skipped, the long line cut at the positions, the last two lines never used
    assert tokens["token"].tolist() == list(range(len(tokens)))
    assert all(g["position"].tolist() == list(range(len(g))) for _, g in tokens.groupby("sequence"))


def test_max_tokens_cuts_the_last_sequence(lm_dir, text):
    cut = calibrate(lm_dir, text, max_tokens=50, layers=[1])
    assert len(cut["calibration_tokens"]) == 50 and cut.router_logits(1).shape == (50, fx.EXPERTS)
    full = calibrate(lm_dir, text, layers=[1], batch_tokens=7)  # also: batches of one sequence each
    np.testing.assert_allclose(cut.router_logits(1), full.router_logits(1)[:50], atol=1e-5)


def test_batches_do_not_change_the_numbers(run, lm_dir, text):
    small = calibrate(lm_dir, text, batch_tokens=32)
    for layer in run.layers:
        np.testing.assert_allclose(small.router_logits(layer), run.router_logits(layer), atol=1e-5)
        np.testing.assert_allclose(small.features(layer), run.features(layer), rtol=1e-5, atol=1e-7)
        assert np.array_equal(small.topk(layer), run.topk(layer))
    assert list(batches([[1] * 5, [1] * 3, [1] * 4, [1] * 9], 10)) == [[0, 1], [2], [3]]  # 5·2 ≤ 10 < 5·3


def test_identical_experts_have_identical_features_and_usage_adds_up():
    """Known by construction: experts with the same weights have the same mean output."""
    from moelens.calibration.activation import ExpertActivation

    g = torch.Generator().manual_seed(0)
    gate, up, down = torch.randn(1, 6, 4, generator=g), torch.randn(1, 6, 4, generator=g), torch.randn(1, 4, 6, generator=g)
    acc = ExpertFeatures(gate.repeat(3, 1, 1), up.repeat(3, 1, 1), down.repeat(3, 1, 1), ExpertActivation("silu", torch.nn.functional.silu),
                         chunk_bytes=1)  # one token per chunk
    x = torch.randn(10, 4, generator=g)
    acc.add(x)
    f = acc.result()
    # equal up to rounding: a batched kernel need not give every batch item the same summation order
    np.testing.assert_allclose(f[1], f[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(f[2], f[0], rtol=1e-6, atol=1e-7)
    expected = (_silu(x.double() @ gate[0].double().T) * (x.double() @ up[0].double().T)) @ down[0].double().T
    np.testing.assert_allclose(f[0], expected.mean(0).numpy(), rtol=1e-6)
    assert usage_counts(np.array([[0, 1], [1, 2], [2, -1], [7, 2]]), 3).tolist() == [1, 2, 3]  # −1 and 7 are not selections
    assert topk_of_logits(torch.tensor([[1.0, 3.0, 3.0, 0.0]]), 2).tolist() == [[1, 2]]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3", "dbrx"])
def test_features_match_the_families_own_experts_modules(tiny_checkpoint, family):
    """Every expert of the first MoE layer run from the checkpoint's weights with the family's
    nonlinearity equals the transformers experts module run on the same tokens."""
    from moelens.runtime import load_causal_lm
    from moelens.runtime.architecture import describe

    layout = "fused" if family in ("gpt_oss", "dbrx") else "per_expert"
    path = tiny_checkpoint(family, layout)
    view = ml.open_model(path)
    lm = load_causal_lm(path, dtype="float32")
    arch = describe(lm)
    layer = view.moe_layers[0]
    ids, mask = right_padded([[3, 5, 7, 9, 11], [2, 4, 6]], 0, torch.device("cpu"))
    routing = LayerCapture(lm, arch, layer, view.top_k).run(ids, mask)
    assert routing.inputs.shape[0] == 8 and routing.source == "experts"
    w = expert_weights(view.layer(layer))
    acc = ExpertFeatures(w["gate"], w["up"], w["down"], expert_activation(view.family, view.config), w["gate_bias"], w["up_bias"], w["down_bias"])
    acc.add(routing.inputs)
    experts = arch.layers[layer].mlp.experts
    n = routing.inputs.shape[0]
    with torch.no_grad():
        reference = np.stack([
            experts(routing.inputs, torch.full((n, 1), e, dtype=torch.long), torch.ones(n, 1)).reshape(n, -1).double().mean(0).numpy()
            for e in range(view.layer(layer).n_experts)
        ])
    np.testing.assert_allclose(acc.result(), reference, rtol=2e-5, atol=2e-6 * np.abs(reference).max())


def test_the_forward_pass_stops_after_the_router_and_equals_a_full_pass(lm_dir):
    from moelens.runtime import load_causal_lm
    from moelens.runtime.architecture import describe

    lm = load_causal_lm(lm_dir, dtype="float32")
    arch = describe(lm)
    ids, mask = right_padded([[2, 5, 6, 7], [2, 9]], 0, torch.device("cpu"))
    calls = []
    later = [arch.layers[1].layer.register_forward_hook(lambda *a: calls.append("layer 1")),
             arch.layers[0].mlp.experts.register_forward_hook(lambda *a: calls.append("experts 0"))]
    try:
        stopped = LayerCapture(lm, arch, 0, fx.TOP_K).run(ids, mask)
    finally:
        for h in later:
            h.remove()
    assert calls == []  # neither layer 0's experts nor layer 1 ran
    full = {}
    handles = [arch.layers[0].router.register_forward_hook(lambda m, a, o: full.setdefault("router", o))]
    with torch.no_grad():
        lm(input_ids=ids, attention_mask=mask)
    handles[0].remove()
    keep = mask.reshape(-1).bool()
    assert torch.equal(stopped.logits, full["router"][0][keep].float())
    assert torch.equal(stopped.topk, full["router"][2][keep].long())


def test_texts_are_read_split_and_refused_as_the_spec_says(tmp_path):
    tok = fx.tokenizer()
    lines = read_lines(fx.write_text(tmp_path / "t.txt"))
    assert (len(lines.items), lines.n_heldout, lines.n_calibration) == (20, 2, 18)
    assert lines.line_numbers[:7] == (1, 2, 3, 4, 5, 7, 8)
    held = tokenise(lines, tok, fx.POSITIONS, len(tok), part="heldout")
    assert held.lines == (22, 23) and len(held.sequences) == 2  # the 19th and 20th non-empty lines
    assert read_lines(["a b", "  ", "c"]).line_numbers == (1, 3)
    (tmp_path / "blank.txt").write_text("\n   \n\n")
    with pytest.raises(ConfigError, match="is empty"):
        read_lines(tmp_path / "blank.txt")
    (tmp_path / "unknown.txt").write_text("zzz qqq\nxxx\n")
    with pytest.raises(ConfigError, match="none of its .* tokens is known"):
        tokenise(read_lines(tmp_path / "unknown.txt"), tok, fx.POSITIONS, len(tok))
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        tokenise(read_lines([[1, 2, 999]]), None, None, 30)
    with pytest.raises(ConfigError, match="does not exist"):
        read_lines(tmp_path / "missing.txt")


def test_bad_input_is_refused_before_anything_is_written(lm_dir, tmp_path, tiny_checkpoint):
    out = tmp_path / "never"
    (tmp_path / "blank.txt").write_text("\n\n")
    (tmp_path / "unknown.txt").write_text("zzz qqq\n")
    cases = [
        ({"texts": tmp_path / "blank.txt"}, ConfigError, "is empty"),
        ({"texts": tmp_path / "unknown.txt"}, ConfigError, "known to the model's tokenizer"),
        ({"texts": ["the river"], "max_tokens": 0}, ConfigError, "max_tokens=0"),
        ({"texts": ["the river"], "layers": [5]}, IndexOutOfRangeError, "layer 5 is out of range"),
        ({"texts": ["the river"], "dtype": "int8"}, ConfigError, "dtype 'int8'"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            calibrate(lm_dir, out=out, **kwargs)
        assert not out.exists()
    with pytest.raises(NotMoEError, match="dense"):
        calibrate(tiny_checkpoint("llama"), [[1, 2, 3]], out=out)
    with pytest.raises(ConfigError, match="no calibration text"):
        calibrate(lm_dir, None)


def test_a_killed_run_resumes_and_reads_back_with_its_matrices(run, lm_dir, text, tmp_path):
    out = tmp_path / "run"

    class Killed(Exception):
        pass

    def kill(event):
        if event.task == "layers" and event.done == 1:
            raise Killed

    with pytest.raises(Killed):
        calibrate(lm_dir, text, out=out, progress=kill)
    manifest = json.loads((out / "manifest.json").read_text())
    # a finished unit's arrays are kept with its parts; the run's matrices are assembled at the end
    assert manifest["completed_units"] == ["L00000"] and (out / "parts" / "L00000" / "features.npy").is_file()
    assert not (out / "matrices").exists()
    resumed = calibrate(lm_dir, text, out=out)
    loaded = load_calibration(out)
    for name in run.tables:
        assert loaded[name].equals(run[name]), name
    for layer in run.layers:
        for get in ("features", "router_logits", "topk"):
            assert np.array_equal(getattr(loaded, get)(layer), getattr(run, get)(layer))
    assert resumed.manifest["status"] == "complete" and loaded.manifest["activation"] == "silu glu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_calibration_on_cuda_equals_the_cpu(run, lm_dir, text):
    gpu = calibrate(lm_dir, text, device="cuda", dtype="float32")
    assert gpu.manifest["options"]["device"].startswith("cuda")
    for layer in run.layers:
        np.testing.assert_allclose(gpu.router_logits(layer), run.router_logits(layer), atol=1e-4)
        np.testing.assert_allclose(gpu.features(layer), run.features(layer), rtol=1e-4, atol=1e-5 * np.abs(run.features(layer)).max())
        assert np.array_equal(gpu.topk(layer), run.topk(layer))
    bf16 = calibrate(lm_dir, text, device="cuda", dtype="bfloat16", layers=[0])  # the checkpoint dtype a real model runs in
    assert bf16.manifest["options"]["dtype"] == "bfloat16"
    np.testing.assert_allclose(bf16.features(0), run.features(0), rtol=0.05, atol=0.05 * np.abs(run.features(0)).max())


def test_shards_add_up_to_the_whole_layer_within_float32_summation_order(run, lm_dir, text):
    """The same tokens split into shards of whole sequences: identical rows, top-k and counts;
    features (float64 sums of float32 chunk sums, added in another order) within SHARD_RTOL of
    each feature's norm; router logits within float32 rounding of another batch."""
    from moelens.analyses.calibration.analysis import SHARD_RTOL

    sharded = calibrate(lm_dir, text, shard_tokens=50)
    assert sharded.manifest["units"][:2] == ["L00000S00000", "L00000S00001"] and len(sharded.manifest["units"]) > 4
    assert sharded.manifest["options"]["shard_tokens"] == 50 and "completed_layers" not in sharded.manifest
    for layer in run.layers:
        assert np.array_equal(sharded.topk(layer), run.topk(layer))
        np.testing.assert_allclose(sharded.router_logits(layer), run.router_logits(layer), rtol=0, atol=1e-5)
        whole = run.features(layer)
        scale = np.linalg.norm(whole, axis=1, keepdims=True)
        assert (np.abs(sharded.features(layer) - whole) <= SHARD_RTOL * scale).all()
    for name in ("calibration_layers", "calibration_tokens"):
        pd.testing.assert_frame_equal(sharded[name], run[name])
    usage, whole_usage = sharded["calibration_usage"], run["calibration_usage"]
    assert usage[["layer", "expert", "count"]].equals(whole_usage[["layer", "expert", "count"]])
    np.testing.assert_array_equal(usage["frequency"], whole_usage["frequency"])
    np.testing.assert_allclose(usage["feature_norm"], whole_usage["feature_norm"], rtol=SHARD_RTOL)
