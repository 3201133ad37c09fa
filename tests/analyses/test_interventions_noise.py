"""Restore's noise rules (moelens' default and ROME's, as options) and ``correct_only``.

The noise std of each ``noise_scale`` is computed here with numpy from the saved weights; the
trace with ROME's rules (subject std, shared draw) is compared with the one-cell-at-a-time
reference run with that std and that draw; the shared draw is the same numbers for every prompt
of one subject length; ``correct_only`` is checked on prompts whose targets are chosen to be right
or wrong for the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import moelens
from moelens.analyses.interventions.analysis import InterventionsConfig
from moelens.errors import ConfigError
from moelens.runtime.architecture import describe
from moelens.runtime.trace import Tracer, TraceSettings, _UnitContext
from tests.analyses import interventions_fixtures as fx
from tests.analyses.interventions_reference import load_reference
from tests.analyses.test_interventions_equal import assert_same_table

RESTORE = {"mode": "restore", "layers": [1], "sites": ["restore_hidden", "restore_mlp"], "device": "cpu"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict[str, Path]:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from safetensors.numpy import load_file, save_file

    root = tmp_path_factory.mktemp("noise")
    tok = fx.tokenizer()
    path = fx.save_model(fx.llama_config(tok), tok, root / "llama")
    # the subject tokens' embedding rows twice as large: the "subject" and "embedding" scales differ
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.embed_tokens.weight"][_subject_token_ids()] *= 2
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return {"model": path, "prompts": fx.write_prompts(root / "facts.jsonl")}


def _embedding(path: Path) -> np.ndarray:
    from safetensors.numpy import load_file

    return load_file(str(path / "model.safetensors"))["model.embed_tokens.weight"].astype(np.float64)


def _subject_token_ids() -> list[int]:
    """The subject tokens of every prompt, from the word-level vocabulary (one token per word)."""
    vocab = fx.tokenizer().get_vocab()
    return [vocab[w] for r in fx.PROMPTS for w in r["subject"].lower().split()]


def test_each_noise_scale_gives_the_std_computed_with_numpy(llama) -> None:
    weight = _embedding(llama["model"])
    subject = weight[_subject_token_ids()]
    assert subject.shape == (6, fx.HIDDEN)  # France, Miles Davis, Danielle Darrieux, Rome
    expected = {"embedding": 3 * np.std(weight), "subject": 3 * np.std(subject), 0.25: 0.25}
    assert expected["subject"] > 1.5 * expected["embedding"]  # the two rules differ on this model
    for scale, std in expected.items():
        run = moelens.trace(str(llama["model"]), str(llama["prompts"]), noise_scale=scale, **RESTORE)
        assert run.manifest["noise_std"] == pytest.approx(std, rel=1e-6), scale
        assert run.manifest["options"]["noise_scale"] == scale
        assert run.manifest["options"]["noise_draw"] == "per-prompt" and run.manifest["options"]["correct_only"] is False


def test_rome_rules_equal_the_reference_with_that_std_and_draw(llama) -> None:
    """noise_scale=subject and noise_draw=shared against the reference given the numpy std and
    the shared draw; a different seed moves the numbers, and the default draw differs from it."""
    std = 3 * float(np.std(_embedding(llama["model"])[_subject_token_ids()]))
    ours = moelens.trace(str(llama["model"]), str(llama["prompts"]), noise_scale="subject", noise_draw="shared", **RESTORE)
    ref = load_reference(llama["model"], llama["prompts"], noise_std=std, shared_noise=True)
    assert_same_table(ours["interventions"], ref.restore(RESTORE["sites"], layers=[1]))
    default = moelens.trace(str(llama["model"]), str(llama["prompts"]), noise_scale="subject", **RESTORE)["interventions"]
    a = ours["interventions"].sort_values(["prompt_id", "layer", "site", "position"])["p_target_corrupt"].to_numpy()
    b = default.sort_values(["prompt_id", "layer", "site", "position"])["p_target_corrupt"].to_numpy()
    assert np.abs(a - b).max() > 1e-4


def test_the_shared_draw_is_the_same_for_every_prompt_of_one_subject_length(llama) -> None:
    from moelens.runtime import load_causal_lm, load_tokenizer
    from moelens.runtime.prompts import as_records, tokenise_all

    lm = load_causal_lm(llama["model"], dtype="float32")
    records, _ = as_records(str(llama["prompts"]))
    prompts = tokenise_all(load_tokenizer(llama["model"]), records, "facts")
    assert [len(p.subject_positions) for p in prompts] == [1, 2, 2, 1]
    width = max(p.length for p in prompts)

    def noise(draw: str) -> list[torch.Tensor]:
        tracer = Tracer(lm, describe(lm), TraceSettings(mode="restore", layers=(1,), noise_std=0.5, noise_draw=draw, seed=4))
        ctx = _UnitContext.build(tracer, prompts, width, torch.zeros(len(prompts), 3), {}, None)
        return [ctx.noise[i][:, list(p.subject_positions)] for i, p in enumerate(prompts)]  # [S, n, d]

    shared, own = noise("shared"), noise("per-prompt")
    torch.testing.assert_close(shared[1], shared[2], rtol=0, atol=0)
    torch.testing.assert_close(shared[0], shared[3], rtol=0, atol=0)
    g = torch.Generator().manual_seed(4)
    torch.testing.assert_close(shared[1], torch.randn(10, 2, fx.HIDDEN, generator=g) * 0.5, rtol=0, atol=0)
    assert (own[1] - own[2]).abs().max() > 0.1 and (own[0] - own[3]).abs().max() > 0.1
    # the noise sits only on the subject tokens
    tracer = Tracer(lm, describe(lm), TraceSettings(mode="restore", layers=(1,), noise_draw="shared"))
    ctx = _UnitContext.build(tracer, prompts, width, torch.zeros(len(prompts), 3), {}, None)
    for i, p in enumerate(prompts):
        others = [t for t in range(width) if t not in p.subject_positions]
        assert float(ctx.noise[i][:, others].abs().max()) == 0.0


def test_correct_only_skips_exactly_the_prompts_the_model_gets_wrong(llama, tmp_path) -> None:
    tok = fx.tokenizer()
    bare = [{"prompt": r["prompt"], "subject": r["subject"]} for r in fx.PROMPTS]
    top1 = [tok.convert_ids_to_tokens(p.target_id) for p in load_reference(llama["model"], bare).prompts]
    words = fx.vocabulary()
    records, wrong = [], []
    for i, (record, best) in enumerate(zip(bare, top1)):
        if i % 2 == 0 and best in words:
            records.append({**record, "target": best})  # the model's own top-1: right
        else:
            records.append({**record, "target": next(w for w in words if w != best)})
            wrong.append(i)
    assert wrong and len(wrong) < len(records)
    run = moelens.trace(str(llama["model"]), records, mode="knockout", device="cpu", correct_only=True, out=tmp_path / "run")
    kept = [i for i in range(len(records)) if i not in wrong]
    assert sorted(set(run["interventions"]["prompt_id"])) == kept
    assert run.manifest["prompts_skipped_incorrect"] == len(wrong)
    assert run.manifest["prompts_skipped_incorrect_ids"] == wrong
    assert run.manifest["options"]["correct_only"] is True
    assert any(f"{len(wrong)} of {len(records)} prompts skipped" in n for n in run.manifest["notes"])
    everything = moelens.trace(str(llama["model"]), records, mode="knockout", device="cpu")
    assert sorted(set(everything["interventions"]["prompt_id"])) == list(range(len(records)))
    assert "prompts_skipped_incorrect" not in everything.manifest
    # nothing right: one line, nothing written
    all_wrong = [{**r, "target": next(w for w in words if w != best)} for r, best in zip(bare, top1)]
    with pytest.raises(ConfigError, match="none of the 4 prompts"):
        moelens.trace(str(llama["model"]), all_wrong, device="cpu", correct_only=True, out=tmp_path / "none")
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("options, message", [
    ({"noise_scale": "loud"}, "noise_scale 'loud'"),
    ({"noise_scale": "0"}, "positive number"),
    ({"noise_scale": -1.0}, "positive number"),
    ({"noise_scale": "nan"}, "positive number"),
    ({"noise_scale": True}, "positive number"),
    ({"noise_draw": "each"}, "per-prompt or shared"),
    ({"correct_only": "yes"}, "correct_only='yes'"),
])
def test_bad_noise_options_are_refused(options, message) -> None:
    with pytest.raises(ConfigError, match=message):
        InterventionsConfig(prompts="facts.jsonl", **options)


def test_a_number_from_the_command_line_is_the_std() -> None:
    assert InterventionsConfig(prompts="f.jsonl", noise_scale="0.3").noise_scale == 0.3
    assert InterventionsConfig(prompts="f.jsonl", noise_scale="subject").noise_scale == "subject"
