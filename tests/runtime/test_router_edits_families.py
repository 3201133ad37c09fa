"""Router-row edits on every MoE family: a cell that writes back the row's own value changes
neither routing nor predictions, and zeroing a row changes top-k sets (the
family's own rule recomputed, grouping and score-correction biases included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moelens.checkpoint.registry import families
from moelens.errors import ConfigError
from moelens.runtime.architecture import describe, router_weight
from moelens.runtime.router_edits import Cell, RouterEditRunner

NO_ROUTER_EDIT = {"jetmoe", "llama4"}
#: Families whose router is not re-run alone (checked below, so the list stays true).
ROUTING_IN_BLOCK = {"dbrx"}  # its router returns no top-k weights of [tokens, k]
#: Families whose decoder layers return tuples: their passes run every layer.
TUPLE_LAYERS: set[str] = set()
MOE = sorted(f for f, cls in families().items() if not cls.is_dense)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("family", MOE)
def test_own_row_changes_nothing_and_zero_moves_routing(family):
    from moelens.testing.tiny import build_tiny_model

    model = build_tiny_model(family)
    arch = describe(model)
    L = arch.moe_layers[-1]
    top_k = int(getattr(model.config.get_text_config(), "num_experts_per_tok", None) or getattr(model.config.get_text_config(), "moe_top_k", 2))
    torch.manual_seed(1)
    vocab = model.get_input_embeddings().weight.shape[0]
    prompts = [tuple(torch.randint(3, vocab, (n,)).tolist()) for n in (6, 4, 5)]
    runner = RouterEditRunner(model, arch, [L], top_k)
    if family in NO_ROUTER_EDIT:
        with pytest.raises(ConfigError, match="router"):
            with runner.installed(prompts[0]):
                pass
        return
    with runner.installed(prompts[0]):
        clean = runner.clean(prompts)
        w = router_weight(arch.layers[L].router).detach().double()
        e = int(torch.bincount(clean.topk[L][clean.real].reshape(-1)).argmax())  # the busiest expert
        cells = [Cell(L, e, w[e].clone()), Cell(L, e, torch.zeros_like(w[e])), Cell(L, e, w[e] * 0.5 + w[(e + 1) % w.shape[0]] * 0.5)]
        totals = runner.run(prompts, cells, clean)
        # routing from the router alone (where it runs alone) equals routing read off full passes,
        # and passes that start at the edited layer equal passes through every layer
        fast, skipped = L in clean.inputs, L in clean.layer_inputs
        clean.inputs.clear()
        clean.layer_inputs.clear()
        slow = runner.run(prompts, cells, clean)
    assert fast == (family not in ROUTING_IN_BLOCK), family
    assert skipped == (family not in TUPLE_LAYERS), family
    for name in ("routed_after", "changed", "migration"):
        np.testing.assert_array_equal(getattr(totals, name), getattr(slow, name), err_msg=name)
    np.testing.assert_allclose(totals.jsd, slow.jsd, atol=1e-6)
    routed = clean.routed(L, w.shape[0])[e]
    assert totals.routed_after[0] == routed and totals.changed[0] == 0
    assert totals.jsd[0] < 1e-9
    assert totals.changed[1] > 0  # a zero logit may still win where the others are negative: the sets move, not always the count
