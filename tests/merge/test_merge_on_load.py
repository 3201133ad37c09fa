"""Merging on read: a layer-streamed model whose clustered layers are merged as their weights are
read gives the logits of the exported checkpoint loaded whole, for every family a merge supports,
compact (G experts, router rows and score-correction biases averaged) and shared, pass after pass
(what a compact merge changes on the modules is undone when the layer's weights go)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moelens.checkpoint import open_model
from moelens.merge import LAYOUTS, export_merged, merge_on_load
from moelens.runtime.forward import open_forward
from moelens.runtime.stream import Call
from tests.merge.helpers import build_checkpoint
from tests.merge.test_export import IDS, E, table

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


def _logits(forward, ids: torch.Tensor) -> torch.Tensor:
    calls = [Call({"input_ids": ids, "use_cache": False}, keep=lambda out: out.logits),
             Call({"input_ids": ids[:, :6], "use_cache": False}, keep=lambda out: out.logits)]
    return forward.run(calls)


@pytest.mark.parametrize("export", ["compact", "shared"])
@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_a_streamed_merge_gives_the_exported_checkpoints_logits(family, export, tmp_path: Path):
    src = build_checkpoint(family, tmp_path / "src", E)
    clusters = table(open_model(src).moe_layers)
    out = export_merged(src, clusters, tmp_path / "merged", export=export, permute=True)
    whole = open_forward(out, CPU, "float32", stream="off")
    expected = _logits(whole, IDS)
    streamed = open_forward(src, CPU, "float32", stream="on")
    streamed.edit_layers(merge_on_load(streamed.model, src, clusters, export=export, permute=True))
    for _ in range(2):  # the second pass reads and merges every layer again
        got = _logits(streamed, IDS)
        for a, b in zip(expected, got):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    original = _logits(open_forward(src, CPU, "float32", stream="off"), IDS)
    assert not torch.equal(original[0], expected[0])  # the merge changed the model
    assert all(p.device.type == "meta" for p in streamed.model.parameters())
