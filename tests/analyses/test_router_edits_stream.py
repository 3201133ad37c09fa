"""Router edits with the model layer-streamed: the tables equal the in-memory ones on three
families, a unit's edited pass starts at its layer without reading the layers before it, and a
model too large with ``--stream off`` is refused before anything is written."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import moelens as ml
from moelens.runtime import stream as stream_module
from tests.analyses import interventions_fixtures as fx
from tests.runtime.stream_checks import assert_refused_off_then_streamed

pytestmark = pytest.mark.usefixtures("one_torch_thread")
OPTIONS = dict(layers=[0, 1], experts=[0, 2], k=[1, 8], samples=2, pairs=[(0, 3), (2, 1)], device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("route-stream")
    tok = fx.tokenizer()
    out = {family: fx.save_model(fx.mixtral_config(tok, family), tok, root / family) for family in ("mixtral", "olmoe", "qwen3_moe")}
    out["prompts"] = fx.write_prompts(root / "prompts.jsonl")
    return out


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen3_moe"])
def test_streamed_router_edits_equal_in_memory(models, family, monkeypatch) -> None:
    memory = ml.router_edits(models[family], models["prompts"], batch_size=7, stream="off", **OPTIONS)
    reads: list[tuple[int, str]] = []
    original = stream_module.StreamedForward.run

    def run(self, calls, progress=None, start=0):
        reads.append((start, len(calls)))
        return original(self, calls, progress, start=start)

    monkeypatch.setattr(stream_module.StreamedForward, "run", run)
    streamed = ml.router_edits(models[family], models["prompts"], batch_size=7, stream="on", **OPTIONS)
    for name in ("router_edits", "router_edits_migration", "router_edits_summary"):
        pd.testing.assert_frame_equal(memory[name], streamed[name], check_exact=True, obj=f"{family} {name}")
    table = streamed["router_edits"]
    assert (table["topk_changed"] > 0).any() and (table["jsd"] > 1e-4).any()  # the edits move things
    assert streamed.manifest["options"]["stream"] == "on"
    # the edited rows of layer 1 ran in one pass that started there; clean passes start at 0
    assert any(start == 1 and n > 1 for start, n in reads), reads
    assert {start for start, _ in reads} <= {0, 1}


def test_a_model_too_large_with_stream_off_is_refused_before_anything_is_written(models, tmp_path, monkeypatch) -> None:
    out = tmp_path / "route"
    args = [str(models["mixtral"]), "--prompts", str(models["prompts"]), "--layers", "1", "--experts", "0", "--edits", "zero",
            "--device", "cpu", "--out", str(out)]
    assert_refused_off_then_streamed("route", args, out, monkeypatch)
    run = ml.load_run(out)
    assert run.manifest["options"]["stream"] == "auto"
    monkeypatch.undo()
    memory = ml.router_edits(models["mixtral"], models["prompts"], layers=[1], experts=[0], edits=["zero"], device="cpu", stream="off")
    pd.testing.assert_frame_equal(memory["router_edits"], run["router_edits"], check_exact=True)
