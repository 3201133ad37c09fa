"""Restore's exact savings in memory (moelens.runtime.trace, Tracer._restore_in_memory): cells before
the subject copied from the corrupted baseline, and the other cells run on their suffix after the
corrupted run's key/value cache. Both give the table the full pass gives (every cell running the
whole prompt), on tiny random checkpoints of each family whose cache qualifies, and the families
whose cache does not qualify keep the full pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moelens.runtime.architecture import describe
from moelens.runtime.prefix_cache import prefix_cache_supported
from moelens.runtime.prompts import PromptRecord, TokenisedPrompt, tokenise
from moelens.runtime.trace import RESTORE_SITES, Tracer, TraceSettings
from tests.analyses import interventions_fixtures as fx

TOL = 1e-6


def _model(family: str, tok):
    from transformers import AutoModelForCausalLM

    if family == "llama":
        config = fx.llama_config(tok)
    elif family in fx.CAUSAL_LMS:
        config = fx.causal_lm_config(tok, family)
    else:
        config = fx.mixtral_config(tok, family)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _prompts(tok):
    """The fixtures' prompts (``<bos>`` first, so a subject starts at position 1 or later) and the
    first of them without ``<bos>``: a subject at position 0, whose cells start with an empty cache."""
    out = [tokenise(tok, PromptRecord(i, r["prompt"], r["subject"], r.get("target"))) for i, r in enumerate(fx.PROMPTS)]
    p = out[1]
    bare = TokenisedPrompt(PromptRecord(len(out), p.record.prompt, p.record.subject, p.record.target), p.input_ids[1:],
                           tuple(t - 1 for t in p.subject_positions), p.target_id)
    return out + [bare]


def _table(model, tok, prompts, shortcuts: bool, **options):
    arch = describe(model)
    settings = TraceSettings(mode="restore", layers=tuple(range(arch.n_layers)), **options)
    tracer = Tracer(model, arch, settings, pad_id=tok.pad_token_id, shortcuts=shortcuts)
    return tracer.run(prompts).columns()


@pytest.fixture(scope="module")
def tok():
    return fx.tokenizer()


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("width", [2, 10])  # windows of distinct layers; windows that all clip to the whole model
@pytest.mark.parametrize("family", ["mixtral", "llama", "qwen3_moe", "olmoe", "gpt2"])
def test_suffix_on_the_cache_equals_the_full_pass(tok, family: str, width: int) -> None:
    """Every family of the cache, and GPT-2 (no cache: only the cells before the subject and the
    repeated windows are saved)."""
    model = _model(family, tok)
    assert prefix_cache_supported(model, describe(model).n_layers) == (family != "gpt2")
    prompts = _prompts(tok)
    options = dict(sites=tuple(RESTORE_SITES), window=width, noise_samples=3, rows_per_batch=7)  # chunks that split cells and samples
    fast = _table(model, tok, prompts, True, **options)
    full = _table(model, tok, prompts, False, **options)
    for key in ("prompt_id", "layer", "site", "position", "token_kind", "target_id"):
        assert fast[key] == full[key], key
    assert set(full["site"]) == set(RESTORE_SITES)
    for column in ("indirect_effect", "jsd", "p_target", "p_target_corrupt"):
        diff = np.abs(np.asarray(fast[column]) - np.asarray(full[column])).max()
        assert diff <= TOL, f"{family} {column}: {diff:.3g}"
    # the restores move the prediction, so the comparison is not of constants
    assert np.abs(np.asarray(full["indirect_effect"])).max() > 1e-2


@pytest.mark.usefixtures("one_torch_thread")
def test_cells_before_the_subject_are_the_corrupted_baseline(tok) -> None:
    model = _model("mixtral", tok)
    prompts = _prompts(tok)
    table = _table(model, tok, prompts, True, sites=tuple(RESTORE_SITES), noise_samples=4)
    first = {p.prompt_id: min(p.subject_positions) for p in prompts}
    assert max(first.values()) > 1 and min(first.values()) == 0
    before = [k for k, (i, t) in enumerate(zip(table["prompt_id"], table["position"])) if t < first[i]]
    after = [k for k, (i, t) in enumerate(zip(table["prompt_id"], table["position"])) if t >= first[i]]
    assert before and after
    for k in before:
        assert table["p_target"][k] == table["p_target_corrupt"][k] and table["indirect_effect"][k] == 0.0
    # the full pass computes them, and finds the baseline too
    full = _table(model, tok, prompts, False, sites=tuple(RESTORE_SITES), noise_samples=4)
    worst = max(abs(full["p_target"][k] - full["p_target_corrupt"][k]) for k in before)
    assert worst <= TOL
    assert max(abs(full["indirect_effect"][k]) for k in after) > 1e-2


@pytest.mark.parametrize("family", ["gpt2", "gemma"])
def test_other_caches_keep_the_full_pass(tok, family: str) -> None:
    model = _model(family, tok)
    assert not prefix_cache_supported(model, describe(model).n_layers)


def test_a_sliding_window_is_not_a_plain_cache(tok) -> None:
    config = fx.mixtral_config(tok, "mixtral")
    config.sliding_window = 4
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    assert not prefix_cache_supported(model, describe(model).n_layers)


@pytest.mark.usefixtures("one_torch_thread")
def test_a_corrupted_run_too_large_to_keep_runs_the_whole_prompt(tok, monkeypatch) -> None:
    from moelens.runtime import trace as trace_module

    model = _model("mixtral", tok)
    prompts = _prompts(tok)[:2]
    arch = describe(model)
    settings = TraceSettings(mode="restore", layers=tuple(range(arch.n_layers)), sites=tuple(RESTORE_SITES), noise_samples=3)
    kept = Tracer(model, arch, settings, pad_id=tok.pad_token_id).run(prompts).columns()
    calls = {"n": 0}
    original = trace_module.Tracer._restore_prompt

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trace_module.Tracer, "_restore_prompt", counted)
    monkeypatch.setattr(trace_module, "memory_budget", lambda device: 1)  # nothing fits: one row per batch
    whole = Tracer(model, arch, settings, pad_id=tok.pad_token_id).run(prompts).columns()
    assert calls["n"] == 0
    assert np.abs(np.asarray(kept["indirect_effect"]) - np.asarray(whole["indirect_effect"])).max() <= TOL
    monkeypatch.setattr(trace_module, "memory_budget", lambda device: 1 << 30)
    Tracer(model, arch, settings, pad_id=tok.pad_token_id).run(prompts)
    assert calls["n"] == len(prompts)
