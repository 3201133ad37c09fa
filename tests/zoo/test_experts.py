"""The fast experts implementation computes what the families' own do, loss and gradients alike."""

from __future__ import annotations

import random

import pytest
import torch

from moelens.zoo.experts import EXPERTS_IMPLEMENTATIONS, SORTED, training_experts
from moelens.zoo.models import FAMILIES, ModelShape, make_model
from moelens.zoo.train import Group, RowSampler, Schedule, Sentence, _objective, make_optimizer, train

SHAPE = ModelShape(hidden_size=32, expert_ffn=48, layers=2, heads=4, kv_heads=2, experts=8, top_k=2)
VOCAB, BOS, EOS, PAD = 60, 1, 2, 0
SPECIAL = {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}


def _sampler(seed: int = 0) -> RowSampler:
    rng = random.Random(seed)
    sentences = tuple(
        Sentence(tuple(rng.randrange(3, VOCAB) for _ in range(rng.randrange(4, 9))), subject=f"s{i}", answer=2) for i in range(40)
    )
    return RowSampler([Group(sentences, 1.0)], BOS, EOS, PAD, random.Random(seed), row_tokens=24, answer_weight=8.0)


def _loss_and_grads(model, batch, implementation: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with training_experts(model, implementation):
        loss, _, _ = _objective(model, batch, float(model.config.router_aux_loss_coef))
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_sorted_experts_give_the_eager_loss_and_gradients(family):
    model = make_model(family, SHAPE, VOCAB, SPECIAL, seed=3)
    batch = _sampler().batch(12)  # rows of different lengths: padding is in the batch
    loss_eager, grads_eager = _loss_and_grads(model, batch, "eager")
    loss_sorted, grads_sorted = _loss_and_grads(model, batch, SORTED)
    assert torch.allclose(loss_sorted, loss_eager, rtol=1e-6, atol=0)
    assert grads_sorted.keys() == grads_eager.keys()
    # the routers' and the experts' weights are among them: the routing weights get their gradient
    assert any(".experts." in n for n in grads_sorted) and any(".gate." in n for n in grads_sorted)
    for name, g in grads_eager.items():
        assert torch.allclose(grads_sorted[name], g, rtol=1e-4, atol=1e-6 * float(g.abs().max())), name


def test_the_implementation_is_restored_and_never_saved(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_model("mixtral", SHAPE, VOCAB, SPECIAL, seed=0)
    before = model.config._experts_implementation
    log, _ = train(model, _Data(), Schedule(steps=3, batch_rows=4, warmup_steps=1), experts=SORTED)
    assert len(log.loss) == 3 and model.config._experts_implementation == before
    model.save_pretrained(str(tmp_path), save_original_format=True)
    assert SORTED not in (tmp_path / "config.json").read_text()
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True)
    ids = _sampler(1).batch(3)
    with torch.no_grad():
        a = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
        b = loaded(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
    assert torch.equal(a, b)


class _Data:
    """A curriculum of one stage: every step a batch of the same sampler."""

    def __init__(self) -> None:
        self.sampler = _sampler(2)

    def batch(self, step: int, rows: int) -> dict[str, torch.Tensor]:
        return self.sampler.batch(rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_with_sorted_experts(family):
    model = make_model(family, SHAPE, VOCAB, SPECIAL, seed=1)
    log, _ = train(model, _Data(), Schedule(steps=40, batch_rows=8, lr=1e-2, warmup_steps=4), experts=SORTED)
    assert sum(log.loss[-5:]) < 0.7 * sum(log.loss[:5])


def test_same_seed_same_weights_with_sorted_experts():
    def trained() -> list[torch.Tensor]:
        model = make_model("qwen3_moe", SHAPE, VOCAB, SPECIAL, seed=4)
        train(model, _Data(), Schedule(steps=5, batch_rows=6, warmup_steps=1), experts=SORTED)
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(trained(), trained()):
        assert a.view(torch.uint8).equal(b.view(torch.uint8))


def test_an_unknown_implementation_is_refused():
    model = make_model("olmoe", SHAPE, VOCAB, SPECIAL, seed=0)
    with pytest.raises(ValueError, match="experts implementation"):
        with training_experts(model, "bogus"):
            pass
    assert "grouped_mm" in EXPERTS_IMPLEMENTATIONS and make_optimizer(model, Schedule(steps=1)).defaults["fused"] is True
