"""Merged checkpoints: compact ones load in transformers with G experts and hold the plain-loop
merge; shared ones of identical (or neuron-permuted) experts give the original logits; every
mistake in the table or the options is one clear error before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from moelens.checkpoint import open_model
from moelens.errors import ConfigError, OutputExistsError, UnsupportedArchitectureError
from moelens.merge import LAYOUTS, RECORD_NAME, export_merged
from moelens.metrics.clustering import most_used_members
from moelens.metrics.permutation import apply_permutation
from tests.merge.helpers import build_checkpoint, logits, loop_merge, moe_blocks

E, G = 8, 4
IDS = torch.tensor([[3, 17, 42, 5, 99, 64, 7, 21, 11, 80]])
# per layer: labels (G = 4 clusters, ids by lowest expert) and usage (cluster 3 of layer "b" unused)
LABELS = {"a": [0, 1, 0, 2, 1, 3, 3, 0], "b": [0, 0, 1, 2, 3, 1, 2, 3]}
USAGE = {"a": [0.10, 0.20, 0.05, 0.15, 0.10, 0.00, 0.30, 0.10], "b": [0.20, 0.10, 0.25, 0.05, 0.00, 0.25, 0.15, 0.00]}


def table(layers: list[int], labels: dict[str, list[int]] = LABELS, usage: dict[str, list[float]] = USAGE) -> pd.DataFrame:
    rows = []
    for i, layer in enumerate(layers):
        key = "ab"[i % 2]
        dominant = most_used_members(labels[key], usage[key])
        for e in range(len(labels[key])):
            rows.append(dict(layer=layer, expert=e, cluster=labels[key][e], dominant=bool(dominant[e]), frequency=usage[key][e]))
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("merge")


@pytest.fixture(scope="module")
def mixtral(root: Path) -> Path:
    path = build_checkpoint("mixtral", root / "mixtral", E)
    (path / "tokenizer_config.json").write_text("{}")  # stands for the tokenizer files
    return path


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_compact_loads_with_g_experts_and_holds_the_merge(family, root):
    src = build_checkpoint(family, root / f"src-{family}", E)
    view = open_model(src)
    clusters = table(view.moe_layers)
    out = export_merged(src, clusters, root / f"compact-{family}")

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert getattr(model.config, LAYOUTS[family].experts_key) == G
    with torch.no_grad():
        y = model(IDS).logits
    assert torch.isfinite(y).all()
    assert all(b.experts.gate_up_proj.shape[0] == G for b in moe_blocks(model, family).values())

    merged = open_model(out)  # the published per-expert layout, read back by moelens
    assert merged.moe_layers == view.moe_layers and merged.n_experts == G
    for i, layer in enumerate(view.moe_layers):
        key = "ab"[i % 2]
        labels, usage = np.array(LABELS[key]), USAGE[key]
        experts = [view.layer(layer).expert(e) for e in range(E)]
        router, new_router = view.layer(layer).router(), merged.layer(layer).router()
        dominant = most_used_members(labels, usage)
        for c in range(G):
            members = np.flatnonzero(labels == c).tolist()
            anchor = next(m for m in members if dominant[m])
            want = loop_merge(experts, members, usage, anchor=anchor, permute=True)
            got = merged.layer(layer).expert(c)
            for role in ("gate", "up", "down"):
                np.testing.assert_allclose(getattr(got, role).double().numpy(), want[role], rtol=0, atol=1e-6)
            total = sum(usage[m] for m in members)
            w = [usage[m] / total if total else 1 / len(members) for m in members]
            row = sum(wi * router.weight[m].double() for wi, m in zip(w, members))
            np.testing.assert_allclose(new_router.weight[c].double().numpy(), row.numpy(), rtol=0, atol=1e-6)
            if router.score_correction_bias is not None:
                bias = sum(wi * float(router.score_correction_bias[m]) for wi, m in zip(w, members))
                assert float(new_router.score_correction_bias[c]) == pytest.approx(bias, abs=1e-6)
    record = json.loads((out / RECORD_NAME).read_text())
    assert record["export"] == "compact" and record["family"] == family and record["permute"] is True
    # what is not an expert or a router is untouched
    torch.testing.assert_close(merged.attention(view.moe_layers[0]), view.attention(view.moe_layers[0]), rtol=0, atol=0)


def _copies(model, family: str, layers_labels: dict[int, list[int]], permuted: bool) -> None:
    """Make every member of each cluster a copy (or a neuron-permuted copy) of its cluster's
    first expert, in the fused in-memory tensors."""
    blocks = moe_blocks(model, family)
    for layer, labels in layers_labels.items():
        experts = blocks[layer].experts
        f = experts.down_proj.shape[2]
        for e, c in enumerate(labels):
            a = labels.index(c)
            if e == a:
                continue
            gu, dn = experts.gate_up_proj.data, experts.down_proj.data
            perm = torch.randperm(f, generator=torch.Generator().manual_seed(100 + e)) if permuted else torch.arange(f)
            src = apply_permutation((gu[a, :f], gu[a, f:], dn[a]), perm)
            gu[e] = torch.cat([src.gate, src.up])
            dn[e] = src.down


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_shared_identical_experts_give_the_original_logits(family, root):
    layers = [0, 1] if family == "mixtral" else [1, 3]
    labels = {layer: LABELS["ab"[i]] for i, layer in enumerate(layers)}
    src = build_checkpoint(family, root / f"identical-{family}", E, edit=lambda m: _copies(m, family, labels, permuted=False))
    # the first expert of each cluster is not its most used member: the anchor is a copy as well
    out = export_merged(src, table(layers), root / f"shared-{family}", export="shared")
    torch.testing.assert_close(logits(out, IDS), logits(src, IDS), rtol=0, atol=1e-6)
    assert open_model(out).n_experts == E


def test_shared_permuted_copies_give_the_original_logits_only_when_permuted(root):
    labels = {0: LABELS["a"], 1: LABELS["b"]}
    src = build_checkpoint("mixtral", root / "permuted-copies", E, seed=1, edit=lambda m: _copies(m, "mixtral", labels, permuted=True))
    clusters = table([0, 1])
    original = logits(src, IDS)
    aligned = export_merged(src, clusters, root / "shared-permuted", export="shared")
    torch.testing.assert_close(logits(aligned, IDS), original, rtol=0, atol=1e-5)
    plain = export_merged(src, clusters, root / "shared-unpermuted", export="shared", permute=False)
    assert (logits(plain, IDS) - original).abs().max() > 1e-3


def test_shared_merges_only_the_listed_layers_and_copies_the_tokenizer(mixtral, root):
    out = export_merged(mixtral, table([1]), root / "shared-one-layer", export="shared")
    before, after = open_model(mixtral), open_model(out)
    for e in range(E):
        torch.testing.assert_close(after.layer(0).expert(e).up, before.layer(0).expert(e).up, rtol=0, atol=0)
    ups = [after.layer(1).expert(e).up for e in range(E)]
    for e, c in enumerate(LABELS["a"]):
        torch.testing.assert_close(ups[e], ups[LABELS["a"].index(c)], rtol=0, atol=0)  # members share the merged weights
    torch.testing.assert_close(after.layer(1).router().weight, before.layer(1).router().weight, rtol=0, atol=0)
    assert (out / "tokenizer_config.json").read_text() == "{}"
    assert json.loads((out / RECORD_NAME).read_text())["tokenizer_files"] == ["tokenizer_config.json"]


def _bad(path: Path, clusters: pd.DataFrame, out: Path, error: type, match: str, **kwargs) -> None:
    with pytest.raises(error, match=match):
        export_merged(path, clusters, out, **kwargs)
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_compact_constraints_point_to_shared(mixtral, root):
    uneven = table([0, 1], labels={"a": LABELS["a"], "b": [0, 0, 1, 2, 2, 1, 2, 0]})
    _bad(mixtral, uneven, root / "x1", ConfigError, r"same number of groups in every layer, found 3, 4.*--export shared")
    one = table([0, 1], labels={"a": [0] * 8, "b": [0] * 8})
    _bad(mixtral, one, root / "x2", ConfigError, r"1 experts per layer are fewer than the 2 the router picks.*--export shared")
    _bad(mixtral, table([1]), root / "x3", ConfigError, r"needs every MoE layer clustered; layers 0 are not in the table")
    grouped = build_checkpoint("deepseek_v3", root / "v3-groups", E, n_group=2, topk_group=1)
    three = {"a": [0, 1, 0, 2, 1, 2, 2, 0], "b": [0, 0, 1, 2, 2, 1, 2, 0]}
    _bad(grouped, table([1, 2], labels=three), root / "x4", ConfigError, r"do not split into the router's n_group = 2 equal groups.*--export shared")


def test_bad_tables_and_options(mixtral, root, tiny_checkpoint):
    good = table([0, 1])
    out = root / "bad"
    _bad(mixtral, good.drop(columns="frequency"), out, ConfigError, r"lacks column\(s\) frequency")
    _bad(mixtral, good[good.expert != 3], out, ConfigError, r"layer 0 of the clusters table must list its experts 0..E−1 once each; expert 3 is missing")
    twice = pd.concat([good, good.iloc[[2]]])
    _bad(mixtral, twice, out, ConfigError, r"expert 2 appears twice")
    two_dom = good.copy()
    two_dom.loc[(two_dom.layer == 0) & (two_dom.cluster == 0), "dominant"] = True
    _bad(mixtral, two_dom, out, ConfigError, r"layer 0: cluster 0 marks 3 dominant experts")
    gaps = good.copy()
    gaps.loc[gaps.cluster == 3, "cluster"] = 5
    _bad(mixtral, gaps, out, ConfigError, r"cluster ids must run 0..G−1 without gaps")
    negative = good.copy()
    negative.loc[0, "frequency"] = -0.1
    _bad(mixtral, negative, out, ConfigError, r"finite numbers ≥ 0")
    _bad(mixtral, table([0, 5]), out, ConfigError, r"layer 5 of the clusters table is not an MoE layer of .* \(MoE layers: 0-1\)")
    small = table([0, 1], labels={"a": [0, 1, 0, 1], "b": [0, 1, 1, 0]}, usage={"a": [1.0] * 4, "b": [1.0] * 4})
    _bad(mixtral, small, out, ConfigError, r"lists 4 experts where .* has 8")
    _bad(mixtral, good, out, ConfigError, r"unknown export 'fused'", export="fused")
    qwen = build_checkpoint("qwen3_moe", root / "qwen-dense-layers", E)
    _bad(qwen, table([0, 1]), out, ConfigError, r"layer 0 of the clusters table is not an MoE layer .*MoE layers: 1,3")
    gpt = tiny_checkpoint("gpt_oss", layout="fused")
    _bad(gpt, table([0, 1], labels={"a": [0, 1, 0, 1], "b": [0, 1, 1, 0]}, usage={"a": [1.0] * 4, "b": [1.0] * 4}), out,
         UnsupportedArchitectureError, r"not supported for the 'gpt_oss' family; supported: deepseek_v2, deepseek_v3")
    full = root / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not empty"):
        export_merged(mixtral, good, full)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
