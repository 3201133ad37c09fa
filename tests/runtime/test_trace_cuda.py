"""Interventions on CUDA give the CPU's numbers (float32), in every mode, and a CUDA batch that
does not fit is halved and retried."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moelens as ml
from tests.analyses import interventions_fixtures as fx

needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("trace-cuda")
    tok = fx.tokenizer()
    return fx.save_model(fx.mixtral_config(tok), tok, root / "moe"), fx.write_prompts(root / "prompts.jsonl")


@needs_cuda[0]
@needs_cuda[1]
@pytest.mark.parametrize("mode, sites", [("knockout", "subj,attn,last,router,moe"), ("restore", None), ("block", None)])
def test_cuda_equals_cpu(model, mode, sites):
    path, prompts = model
    cpu = ml.trace(path, prompts, mode=mode, sites=sites, device="cpu", dtype="float32")["interventions"]
    gpu = ml.trace(path, prompts, mode=mode, sites=sites, device="cuda", dtype="float32")["interventions"]
    assert len(cpu) == len(gpu)
    np.testing.assert_allclose(gpu["jsd"], cpu["jsd"], atol=1e-4)
    np.testing.assert_allclose(gpu["p_target"], cpu["p_target"], atol=1e-4)


def test_an_out_of_memory_batch_is_halved_and_retried(model, monkeypatch):
    # CUDA's out-of-memory error is simulated, so this runs (and guards the retry) on any device.
    from moelens.runtime import trace as trace_module

    path, prompts = model
    calls = {"n": 0}
    original = trace_module.Tracer._run_batch

    def flaky(self, ctx, cells, samples, width):
        calls["n"] += 1
        if len(cells) > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, ctx, cells, samples, width)

    monkeypatch.setattr(trace_module.Tracer, "_run_batch", flaky)
    halved = ml.trace(path, prompts, sites="subj,last", device=DEVICE, dtype="float32", batch_size=64)["interventions"]
    monkeypatch.setattr(trace_module.Tracer, "_run_batch", original)
    whole = ml.trace(path, prompts, sites="subj,last", device=DEVICE, dtype="float32", batch_size=64)["interventions"]
    assert calls["n"] > 1
    np.testing.assert_allclose(halved["jsd"], whole["jsd"], atol=1e-5)
