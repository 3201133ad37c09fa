"""The layer-streamed runtime gives the in-memory tables: interventions (every mode, router edits
included) on every family the tiny checkpoints cover, calibration, passes split by the activation
budget; it reads each layer once per pass; a model too large with streaming off is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moelens as ml
from moelens.errors import ConfigError
from moelens.runtime.forward import Estimate, choose_stream, open_forward, refusal
from moelens.runtime.prompts import PromptRecord, TokenisedPrompt
from moelens.runtime.trace import Tracer, TraceSettings
from tests.analyses import interventions_fixtures as fx
from tests.runtime.stream_checks import assert_refused_off_then_streamed, count_reads

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")
JSD_TOL = 1e-5  # bits; float32 (in practice the streamed tables are bit-equal)

# (family, layout): every MoE family the brief of streaming names, a dense one, fused and
# quantised layouts, and families whose checkpoint names transformers renames on load
FAMILIES = [
    ("mixtral", "per_expert"), ("mixtral", "fused"), ("qwen3_moe", "per_expert"), ("olmoe", "per_expert"),
    ("deepseek_v2", "per_expert"), ("deepseek_v3", "per_expert"), ("gpt_oss", "fused"), ("gpt_oss", "mxfp4"),
    ("qwen2_moe", "per_expert"), ("phimoe", "per_expert"), ("granitemoe", "hub"), ("llama", "per_expert"),
]
MODES = [("knockout", ("subj", "attn", "last", "moe", "router")),
         ("restore", ("restore_hidden", "restore_mlp", "restore_attn")),
         ("block", ("block_subj", "block_nonsubj", "block_last"))]


def _prompts(vocab: int) -> list[TokenisedPrompt]:
    g = torch.Generator().manual_seed(0)
    return [TokenisedPrompt(PromptRecord(i, "p", "s"), tuple(torch.randint(3, vocab, (n,), generator=g).tolist()), (1, 2), None)
            for i, n in enumerate([5, 7, 6])]


def _cells(forward, mode: str, sites: tuple[str, ...], prompts) -> tuple[np.ndarray, np.ndarray]:
    arch = forward.arch
    if not arch.moe_layers:
        sites = tuple(s for s in sites if s not in ("moe", "router"))
    settings = TraceSettings(mode=mode, sites=sites, layers=tuple(range(arch.n_layers)), window=3, noise_samples=3, seed=0)
    tracer = Tracer(forward.model, arch, settings, 0, forward=forward)
    means = tracer.means(prompts) if mode == "knockout" else None
    r = tracer.run(prompts, means)
    return np.array(r.jsd), np.array(r.p_target)


@pytest.mark.parametrize("family, layout", FAMILIES)
def test_streamed_interventions_equal_in_memory(tiny_checkpoint, family, layout):
    path = tiny_checkpoint(family, layout)
    memory = open_forward(path, CPU, "float32", stream="off")
    streamed = open_forward(path, CPU, "float32", stream="on")
    assert not memory.streamed and streamed.streamed
    # nothing of a layer is resident between passes
    assert all(p.device.type == "meta" for p in streamed.model.parameters())
    prompts = _prompts(memory.model.get_input_embeddings().weight.shape[0])
    for mode, sites in MODES:
        jsd_m, p_m = _cells(memory, mode, sites, prompts)
        jsd_s, p_s = _cells(streamed, mode, sites, prompts)
        assert jsd_m.shape == jsd_s.shape and len(jsd_m) > 0
        assert np.abs(jsd_m - jsd_s).max() <= JSD_TOL, (family, mode)
        assert np.abs(p_m - p_s).max() <= 1e-6, (family, mode)
        if mode == "knockout":
            assert jsd_m.max() > 1e-4  # the cells measure something: equality is not of zeros
    assert all(p.device.type == "meta" for p in streamed.model.parameters())


def test_each_layer_is_read_once_per_pass_and_passes_split_by_budget(tiny_checkpoint, monkeypatch):
    path = tiny_checkpoint("mixtral", "per_expert")
    streamed = open_forward(path, CPU, "float32", stream="on")
    reads = count_reads(streamed, monkeypatch)
    prompts = _prompts(streamed.model.get_input_embeddings().weight.shape[0])
    settings = TraceSettings(mode="knockout", sites=("subj", "last"), ablation="zero", layers=(0, 1), rows_per_batch=1)
    tracer = Tracer(streamed.model, streamed.arch, settings, 0, forward=streamed)
    one, _ = tracer.clean(prompts)
    # one pass over three batches: the embedding, each layer once and the head
    assert reads == ["embedding", *(f"layer {i}" for i in range(streamed.arch.n_layers)), "head"]
    events = []
    streamed.activation_budget = 1  # every batch over budget: a pass per batch, said in the progress
    reads.clear()
    specs = [tracer._spec([p.input_ids], 7, {}) for p in prompts]
    split = torch.cat([torch.softmax(lg, -1) for lg in tracer._forward_many(specs, events.append)])
    assert reads.count("layer 0") == reads.count("head") == 3
    assert any("pass 2/3" in e.message for e in events)
    torch.testing.assert_close(one, split, rtol=0, atol=1e-7)


def test_weights_are_scanned_for_nan_once_per_layer_and_a_nan_layer_is_named(tiny_checkpoint, tmp_path, monkeypatch):
    """A pass reads the same tensors again, so each layer's finite-scan is made on its first load
    only; a NaN in a layer's weights stops the first pass that reads it, naming the weight."""
    import shutil

    from safetensors.torch import load_file, save_file

    from moelens.errors import CheckpointFormatError
    from moelens.runtime import checks

    path = tiny_checkpoint("mixtral", "per_expert")
    streamed = open_forward(path, CPU, "float32", stream="on")
    scanned: list[int] = []
    original = checks.check_parameters_finite
    monkeypatch.setattr(checks, "check_parameters_finite", lambda lm, source: (scanned.append(1), original(lm, source))[1])
    prompts = _prompts(streamed.model.get_input_embeddings().weight.shape[0])
    tracer = Tracer(streamed.model, streamed.arch, TraceSettings(mode="knockout", sites=("last",), ablation="zero", layers=(0,)), 0,
                    forward=streamed)
    tracer.clean(prompts)
    first = len(scanned)
    assert first == streamed.arch.n_layers + 2  # embedding, every layer, head
    tracer.clean(prompts)
    assert len(scanned) == first  # the second pass scans nothing again

    damaged = tmp_path / "damaged"
    shutil.copytree(path, damaged)
    tensors = load_file(damaged / "model.safetensors")
    name = next(n for n in sorted(tensors) if "layers.1." in n and "experts" in n)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[3] = float("nan")
    save_file(tensors, damaged / "model.safetensors", metadata={"format": "pt"})
    broken = open_forward(damaged, CPU, "float32", stream="on")
    tracer = Tracer(broken.model, broken.arch, TraceSettings(mode="knockout", sites=("last",), ablation="zero", layers=(0,)), 0,
                    forward=broken)
    with pytest.raises(CheckpointFormatError, match="NaN/inf"):
        tracer.clean(prompts)


@pytest.mark.parametrize("mode, sites, passes", [("knockout", ("subj", "last"), 1), ("block", ("block_subj",), 1),
                                                  ("restore", ("restore_hidden",), 2)])
def test_knockout_and_block_read_each_layer_once_per_unit(tiny_checkpoint, monkeypatch, mode, sites, passes):
    """The clean batches of knockout and block ride in the cells' pass; restore's cells edit in
    the clean states, so its clean pass comes first."""
    path = tiny_checkpoint("mixtral", "per_expert")
    streamed = open_forward(path, CPU, "float32", stream="on")
    prompts = _prompts(streamed.model.get_input_embeddings().weight.shape[0])
    settings = TraceSettings(mode=mode, sites=sites, ablation="zero", layers=(0, 1), window=1, noise_samples=2)
    tracer = Tracer(streamed.model, streamed.arch, settings, 0, forward=streamed)
    reads = count_reads(streamed, monkeypatch)
    result = tracer.run(prompts)
    assert reads.count("layer 0") == passes and reads.count("head") == passes
    memory = open_forward(path, CPU, "float32", stream="off")
    same = Tracer(memory.model, memory.arch, settings, 0, forward=memory).run(prompts)
    np.testing.assert_allclose(result.jsd, same.jsd, rtol=0, atol=JSD_TOL)
    np.testing.assert_allclose(result.p_target, same.p_target, rtol=0, atol=1e-6)


def test_prefetch_off_gives_the_same_cells(tiny_checkpoint):
    path = tiny_checkpoint("qwen3_moe", "per_expert")
    on = open_forward(path, CPU, "float32", stream="on", prefetch=True)
    off = open_forward(path, CPU, "float32", stream="on", prefetch=False)
    prompts = _prompts(on.model.get_input_embeddings().weight.shape[0])
    for mode, sites in MODES[:2]:
        np.testing.assert_array_equal(_cells(on, mode, sites, prompts)[0], _cells(off, mode, sites, prompts)[0])


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream-trace")
    tok = fx.tokenizer()
    return fx.save_model(fx.mixtral_config(tok), tok, root / "moe"), fx.write_prompts(root / "prompts.jsonl")


@pytest.mark.parametrize("mode, sites", [("knockout", "subj,attn,last,router,moe"), ("restore", None), ("block", None)])
def test_trace_tables_equal_with_stream_on(traced, mode, sites):
    path, prompts = traced
    a = ml.trace(path, prompts, mode=mode, sites=sites, device="cpu", dtype="float32", stream="off")["interventions"]
    b = ml.trace(path, prompts, mode=mode, sites=sites, device="cpu", dtype="float32", stream="on")["interventions"]
    assert len(a) == len(b) > 0
    assert np.abs(a["jsd"].to_numpy() - b["jsd"].to_numpy()).max() <= JSD_TOL
    np.testing.assert_allclose(a["p_target"].to_numpy(), b["p_target"].to_numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family, layout", [("mixtral", "per_expert"), ("qwen3_moe", "per_expert"), ("olmoe", "per_expert"),
                                            ("deepseek_v3", "per_expert"), ("gpt_oss", "fused")])
def test_streamed_calibration_equals_in_memory(tiny_checkpoint, family, layout):
    path = tiny_checkpoint(family, layout)
    model = ml.open_model(path)
    vocab = int(model.config.get("vocab_size") or model.config["text_config"]["vocab_size"])
    g = torch.Generator().manual_seed(1)
    texts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (9, 5, 12, 7, 3, 11, 8, 6, 10, 4, 9)]
    kw = dict(texts=texts, device="cpu", dtype="float32", batch_tokens=24)
    a = ml.calibrate(path, stream="off", **kw)
    b = ml.calibrate(path, stream="on", **kw)
    assert a.layers == b.layers and a.layers
    for L in a.layers:
        np.testing.assert_array_equal(a.topk(L), b.topk(L))
        np.testing.assert_allclose(a.router_logits(L), b.router_logits(L), rtol=0, atol=1e-6)
        np.testing.assert_allclose(a.features(L), b.features(L), rtol=1e-6, atol=1e-9)


def test_a_model_too_large_with_stream_off_is_refused_with_the_options_that_fit(traced, monkeypatch, capsys, tmp_path):
    path, prompts = traced
    est = Estimate(weights=int(40e9), layer=int(1e9), available=int(20e9), dtype=torch.float32)
    assert choose_stream("auto", est, CPU) is True
    with pytest.raises(ConfigError, match="92.0 GB to run in memory"):
        choose_stream("off", est, CPU)
    line = refusal(est, CPU)
    assert "--stream on" in line and "3.0 GB" in line and "--dtype bfloat16" not in line  # bf16: 46 GB, does not fit
    assert "--dtype bfloat16" in refusal(Estimate(int(6e9), int(1e8), int(10e9), torch.float32), CPU)
    # the command line: one line, exit status 2, nothing written
    out = tmp_path / "run"
    assert_refused_off_then_streamed("trace", [str(path), "--prompts", str(prompts), "--device", "cpu", "--out", str(out)], out, monkeypatch)


def test_an_unknown_stream_choice_is_refused():
    with pytest.raises(ConfigError, match="stream 'sometimes'"):
        ml.InterventionsConfig(prompts="x.jsonl", stream="sometimes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streamed_on_cuda_equals_cpu(traced):
    path, prompts = traced
    a = ml.trace(path, prompts, mode="restore", device="cpu", dtype="float32", stream="on")["interventions"]
    b = ml.trace(path, prompts, mode="restore", device="cuda", dtype="float32", stream="on")["interventions"]
    assert np.abs(a["jsd"].to_numpy() - b["jsd"].to_numpy()).max() <= JSD_TOL

