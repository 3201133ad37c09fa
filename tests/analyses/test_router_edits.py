"""Router edits (`moelens route`, `ml.router_edits`): the tables equal an independent computation
(weights edited by hand, plain transformers, routing recomputed from the hooked router inputs) on
three families (OLMoE keeps norm_topk_prob=False: its top-k weights are not renormalised, so the
same routing change moves its predictions differently); the random control removes exactly
project_out's norm; bad input is one line, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import moelens as ml
from moelens.analyses.router_edits.analysis import edit_rows, random_basis, sign_flip_p, summarise
from tests.analyses import interventions_fixtures as fx
from tests.analyses import router_edits_reference as ref
from tests.cli.helpers import run_moelens

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYER, EXPERTS, KS, SAMPLES, PAIRS = 1, [0, 2], [1, 8], 2, [(0, 3), (2, 1)]
COLUMNS = ["removed_norm", "routed_before", "routed_after", "topk_changed", "jsd", "kl"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("route")
    tok = fx.tokenizer()
    out = {family: fx.save_model(fx.mixtral_config(tok, family), tok, root / family) for family in ("mixtral", "olmoe", "qwen3_moe")}
    out["dense"] = fx.save_model(fx.llama_config(tok), tok, root / "dense")
    out["prompts"] = fx.write_prompts(root / "prompts.jsonl")
    return out


def _ours(path: Path, prompts: Path, **options) -> pd.DataFrame:
    run = ml.router_edits(path, prompts, layers=[LAYER], experts=EXPERTS, k=KS, samples=SAMPLES, pairs=PAIRS, device="cpu", **options)
    return run


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen3_moe"])
def test_table_equals_an_independent_computation(models, family) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = _ours(models[family], models["prompts"], batch_size=7)  # batches that split a prompt's cells
    ours = run["router_edits"]
    model = AutoModelForCausalLM.from_pretrained(models[family], dtype="float32").eval()
    tok = AutoTokenizer.from_pretrained(models[family])
    prompts = [tok(r["prompt"])["input_ids"] for r in fx.PROMPTS]
    theirs = pd.DataFrame(ref.reference_table(model, prompts, LAYER, EXPERTS, KS, SAMPLES, PAIRS, fx.TOP_K))
    key = ["expert", "partner", "edit", "k", "sample"]
    assert len(ours) == len(theirs) == len(EXPERTS) * (len(KS) * (2 + SAMPLES) + 1) + len(PAIRS)
    merged = ours.merge(theirs, on=key, suffixes=("", "_ref"), validate="one_to_one")
    assert len(merged) == len(ours)
    for c in COLUMNS:
        np.testing.assert_allclose(merged[c], merged[f"{c}_ref"], rtol=0, atol=1e-4, err_msg=f"{family} {c}")
    # the edits move things: a check that could not pass by comparing zeros
    assert (ours["topk_changed"] > 0).any() and (ours["jsd"] > 1e-4).any()
    # random removes exactly project_out's norm
    po = ours[ours["edit"] == "project_out"].set_index(["expert", "k"])["removed_norm"]
    for r in ours[ours["edit"] == "random"].itertuples():
        assert abs(r.removed_norm - po.loc[(r.expert, r.k)]) < 1e-6
    # transplant migration: shares of e's former positions, each a count over them
    mig = run["router_edits_migration"]
    assert set(mig["expert"]) == {e for e, _ in PAIRS} and len(mig) == len(PAIRS) * fx.EXPERTS
    assert ((mig["share"] >= 0) & (mig["share"] <= 1)).all()
    summary = run["router_edits_summary"]
    po_rows = summary[(summary["edit"] == "project_out")]
    assert po_rows["p_value"].between(0, 1).all() and po_rows["random_mean"].notna().all()


def test_same_numbers_whatever_the_batch(models) -> None:
    a = _ours(models["mixtral"], models["prompts"], batch_size=3)["router_edits"]
    b = _ours(models["mixtral"], models["prompts"], batch_size=64)["router_edits"]
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-6, rtol=0)


def test_edit_rows_definitions() -> None:
    import torch

    g = torch.Generator().manual_seed(3)
    router = torch.randn(4, 6, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    specs = edit_rows(router, {0: q}, [0], ("project_out", "keep_aligned", "random", "zero"), [2], 3, 0, 0, [])
    by = {(s.edit, s.sample): s for s in specs}
    r = router[0]
    p = q[:, :2] @ q[:, :2].T
    torch.testing.assert_close(by[("project_out", 0)].row, r - p @ r)
    torch.testing.assert_close(by[("keep_aligned", 0)].row, p @ r)
    torch.testing.assert_close(by[("project_out", 0)].row + by[("keep_aligned", 0)].row, r)
    for s in range(3):
        u = random_basis(6, 2, 0, 0, 0, s)
        torch.testing.assert_close(u.T @ u, torch.eye(2, dtype=torch.float64))
        removed = r - by[("random", s)].row
        torch.testing.assert_close(u @ (u.T @ removed), removed)  # the removed part lies in U
        assert abs(by[("random", s)].removed_norm - float((p @ r).norm())) < 1e-12
    assert not torch.equal(random_basis(6, 2, 0, 0, 0, 0), random_basis(6, 2, 0, 0, 0, 1))
    assert by[("zero", 0)].row.abs().sum() == 0 and by[("zero", 0)].removed_norm == pytest.approx(float(r.norm()))


def test_sign_flip_p() -> None:
    assert sign_flip_p(np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(2 / 16)  # only all-plus and all-minus reach it
    assert sign_flip_p(np.zeros(5)) == 1.0
    assert sign_flip_p(np.ones(40)) < 1e-3


def test_summary_difference_and_p() -> None:
    rows = []
    for e in range(5):
        rows.append(dict(layer=0, expert=e, edit="project_out", k=1, sample=0, removed_norm=1.0, routed_before=0.3, routed_after=0.1,
                         topk_changed=0.2, jsd=0.1, kl=0.2))
        for s in range(2):
            rows.append(dict(layer=0, expert=e, edit="random", k=1, sample=s, removed_norm=1.0, routed_before=0.3, routed_after=0.3 - 0.02 * s,
                             topk_changed=0.0, jsd=0.0, kl=0.0))
    out = summarise(pd.DataFrame(rows))
    drop = out[(out["edit"] == "project_out") & (out["measure"] == "routed_drop")].iloc[0]
    assert drop["mean"] == pytest.approx(0.2) and drop["random_mean"] == pytest.approx(0.01)
    assert drop["difference"] == pytest.approx(0.19) and drop["p_value"] == pytest.approx(2 / 32)


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    r = run_moelens("route", *args)
    return r.code, (r.stdout + r.stderr).strip()


@pytest.mark.parametrize("extra, message", [
    ([], "no prompts"),
    (["--k", "0"], "at least 1"),
    (["--k", "33"], "more than the hidden size"),
    (["--experts", "4"], "expert 4 is out of range"),
    (["--layers", "7"], "layer 7 is out of range"),
    (["--pairs", "1:1"], "names the same expert twice"),
    (["--pairs", "0:9"], "pair 0:9 is out of range"),
    (["--edits", "shuffle"], "edit 'shuffle'"),
    (["--matrix", "w1"], "unknown matrix"),
    (["--prompts", "{empty}"], "holds no prompts"),
    (["--prompts", "{nokey}"], "non-empty \"prompt\""),
    (["MODEL=dense"], "dense"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(models, tmp_path, monkeypatch, capsys, extra, message) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "nokey.jsonl").write_text('{"text": "a"}\n')
    files = {"{empty}": str(tmp_path / "empty.jsonl"), "{nokey}": str(tmp_path / "nokey.jsonl")}
    model = models["mixtral"]
    args = []
    for a in extra:
        if a.startswith("MODEL="):
            model = models[a.split("=")[1]]
        else:
            args.append(files.get(a, a))
    if "--prompts" not in args and extra:
        args = ["--prompts", str(models["prompts"]), *args]
    out = tmp_path / "run"
    code, text = _cli(monkeypatch, capsys, str(model), "--out", str(out), *args)
    assert code == 2, text
    assert message in text
    assert len(text.splitlines()) == 1, text
    assert not out.exists()


def test_cli_writes_the_tables_and_the_headline(models, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    code, text = _cli(monkeypatch, capsys, str(models["qwen3_moe"]), "--out", str(out), "--prompts", str(models["prompts"]),
                      "--layers", "0", "--experts", "0-1", "--k", "1,4", "--samples", "2", "--edits", "project_out,random")
    assert code == 0, text
    assert "as much as a random part of equal norm" in text
    run = ml.load_run(out)
    assert set(run["router_edits"]["edit"]) == {"project_out", "random"} and set(run["router_edits"]["k"]) == {1, 4}
