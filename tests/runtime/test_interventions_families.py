"""The hook points and edits on every family the reader knows, dense ones included, and on the
causal LMs opened for forward passes only (GPT-2, GPT-J, GPT-NeoX, Phi, Gemma, Falcon, OPT).

Writing a site's own clean value back must leave the logits unchanged (the edit reaches the right
tensor and nothing else), and writing something else must change them; for routers this checks that
routing is recomputed with the family's own rule from the edited logits."""

from __future__ import annotations

import pytest
import torch

from moelens.checkpoint.families.causal_lm import TINY_CAUSAL_LMS
from moelens.checkpoint.registry import families
from moelens.errors import ConfigError
from moelens.runtime.architecture import describe
from moelens.runtime.interventions import Batch, Edit, InterventionHooks, last_logits, lower_index_ties

# Routers that do not return their logits first (or at all) cannot have them replaced.
NO_ROUTER_EDIT = {"jetmoe", "llama4"}
MOE_AND_DENSE = sorted(families())
FAMILIES = MOE_AND_DENSE + list(TINY_CAUSAL_LMS)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _setup(family: str):
    from moelens.testing.tiny import build_tiny_model

    model = build_tiny_model(family)
    arch = describe(model)
    torch.manual_seed(1)
    vocab = model.get_input_embeddings().weight.shape[0]
    rows = [torch.randint(3, vocab, (6,)).tolist(), torch.randint(3, vocab, (4,)).tolist()]
    batch = Batch.of(rows, 0, torch.device("cpu"))
    return model, arch, batch, [len(r) for r in rows]


def _logits(model, hooks, batch, lengths, edits=None, capture=()):
    hooks.edits = edits or {}
    hooks.capture = set(capture)
    hooks.captured = {}
    hooks.attention_mask, hooks.last = batch.attention_mask, batch.last
    with torch.no_grad(), lower_index_ties():
        out = last_logits(model, batch, lengths)
    hooks.capture = set()
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_writing_back_the_clean_value_changes_nothing_and_another_value_does(family):
    model, arch, batch, lengths = _setup(family)
    hooks = InterventionHooks(model, arch)
    L = arch.n_layers - 1 if arch.layers[-1].attention is not None else next(
        p.index for p in reversed(arch.layers) if p.attention is not None)
    points = [("layer", L), ("mlp", L)] + ([("attn", L)] if arch.layers[L].attention is not None else [])
    R, T = batch.input_ids.shape
    last = torch.arange(T)[None, :] == batch.last[:, None]  # [R, T]
    row0 = last & (torch.arange(R) == 0)[:, None]
    with hooks.installed():
        clean = _logits(model, hooks, batch, lengths, capture=[(L, p) for p, L in points])
        captured = dict(hooks.captured)
        for point, layer in points:
            own = captured[(layer, point)]
            same = _logits(model, hooks, batch, lengths, {(layer, point): [Edit(row0, own)]})
            torch.testing.assert_close(same, clean, rtol=0, atol=1e-6)
            other = _logits(model, hooks, batch, lengths, {(layer, point): [Edit(row0, own * 3 + 1)]})
            assert (other[0] - clean[0]).abs().max() > 1e-4, (family, point)
            torch.testing.assert_close(other[1], clean[1], rtol=0, atol=1e-6)  # row 1 untouched
        # block: barring no key is the clean pass; barring every earlier key of row 0 is not
        if family == "minimax":  # the last layer is linear (lightning) attention: no mask to block
            with pytest.raises(ConfigError, match="4-D attention mask"):
                _logits(model, hooks, batch, lengths, {(L, "block"): [Edit(torch.zeros(R, T, dtype=torch.bool))]})
        elif arch.layers[L].attention is not None:
            none = torch.zeros(R, T, dtype=torch.bool)
            same = _logits(model, hooks, batch, lengths, {(L, "block"): [Edit(none)]})
            torch.testing.assert_close(same, clean, rtol=0, atol=1e-6)
            earlier = (torch.arange(T)[None, :] < batch.last[:, None]) & (torch.arange(R) == 0)[:, None]
            other = _logits(model, hooks, batch, lengths, {(L, "block"): [Edit(earlier)]})
            assert (other[0] - clean[0]).abs().max() > 1e-5, (family, "block")


@pytest.mark.parametrize("family", [f for f in MOE_AND_DENSE if not families()[f].is_dense])
def test_router_logits_are_replaced_and_routing_recomputed_with_the_familys_rule(family):
    model, arch, batch, lengths = _setup(family)
    hooks = InterventionHooks(model, arch)
    L = arch.moe_layers[-1]
    R, T = batch.input_ids.shape
    last = torch.arange(T)[None, :] == batch.last[:, None]
    row0 = last & (torch.arange(R) == 0)[:, None]
    with hooks.installed():
        if family in NO_ROUTER_EDIT:
            with pytest.raises(ConfigError, match="router"):
                hooks.prepare_routers({"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})
            return
        hooks.prepare_routers({"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})
        clean = _logits(model, hooks, batch, lengths, capture=[(L, "router")])
        logits = hooks.captured[(L, "router")]  # [R·T, E]
        own = logits.view(R, T, -1)
        same = _logits(model, hooks, batch, lengths, {(L, "router"): [Edit(row0, own)]})
        torch.testing.assert_close(same, clean, rtol=0, atol=1e-6)
        # reversing the logits at the last token of row 0 sends it to other experts
        flipped = -own
        other = _logits(model, hooks, batch, lengths, {(L, "router"): [Edit(row0, flipped)]})
        assert (other[0] - clean[0]).abs().max() > 1e-5, family
        torch.testing.assert_close(other[1], clean[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", *TINY_CAUSAL_LMS])
def test_blocking_every_earlier_key_in_every_layer_hides_the_earlier_tokens(family):
    """Known by construction: when the last position may attend only to itself in every layer, its
    logits depend on its own token and position alone, so changing every earlier token of the
    prompt changes nothing (and without the block it does)."""
    model, arch, batch, lengths = _setup(family)
    hooks = InterventionHooks(model, arch)
    R, T = batch.input_ids.shape
    earlier = torch.arange(T)[None, :] < batch.last[:, None]  # [R, T]
    other_ids = batch.input_ids.clone()
    other_ids[earlier] = (other_ids[earlier] + 7 - 3) % (other_ids.max() + 1 - 3) + 3  # other real tokens
    assert (other_ids[earlier] != batch.input_ids[earlier]).all()
    other = Batch(other_ids, batch.attention_mask, batch.last)
    blocked = {(p.index, "block"): [Edit(earlier)] for p in arch.layers if p.attention is not None}
    with hooks.installed():
        a = _logits(model, hooks, batch, lengths, blocked)
        b = _logits(model, hooks, other, lengths, blocked)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        assert (_logits(model, hooks, batch, lengths) - _logits(model, hooks, other, lengths)).abs().max() > 1e-4
