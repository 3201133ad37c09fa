"""Expert clustering and the cluster pairings of expert distance, against plain-loop and SciPy
references on a recorded calibration; determinism, reuse of a calibration run, bad input."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import moelens as ml
from moelens.analyses.calibration import calibrate, load_calibration
from moelens.analyses.clustering import cluster
from moelens.errors import ConfigError

from . import clustering_fixtures as fx


@pytest.fixture(scope="module")
def text(lm_files):
    return lm_files["text"]


@pytest.fixture(scope="module")
def cal_dir(lm_dir, text, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "calibration"
    calibrate(lm_dir, text, out=out)
    return out


@pytest.fixture(scope="module")
def runs(lm_dir, cal_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("clusters")
    return {
        "hc": cluster(lm_dir, cal_dir, method="hc-smoe", groups=3, out=root / "hc"),
        "m": cluster(lm_dir, cal_dir, method="m-smoe", groups=3, out=root / "m"),
    }


# ----------------------------------------------------------------------------------------------
# Plain references
# ----------------------------------------------------------------------------------------------
def _canonical(labels) -> list[int]:
    """Cluster ids renumbered by each cluster's lowest expert."""
    ids: dict[int, int] = {}
    for c in labels:
        ids.setdefault(int(c), len(ids))
    return [ids[int(c)] for c in labels]


def m_smoe_reference(logits: np.ndarray, freq: np.ndarray, groups: int) -> tuple[list[int], list[bool]]:
    """M-SMoE with loops: the G most used experts dominant (ties → lower index), every other one
    joins the dominant expert of highest router-logit cosine (ties → lower index)."""
    n, e = logits.shape
    dominant = sorted(sorted(range(e), key=lambda j: (-freq[j], j))[:groups])

    def cos(i: int, j: int) -> float:
        dot = math.fsum(float(logits[t, i]) * float(logits[t, j]) for t in range(n))
        ni = math.sqrt(math.fsum(float(logits[t, i]) ** 2 for t in range(n)))
        nj = math.sqrt(math.fsum(float(logits[t, j]) ** 2 for t in range(n)))
        return dot / (ni * nj) if ni > 0 and nj > 0 else 0.0

    anchor = [j if j in dominant else max(dominant, key=lambda d: (cos(j, d), -d)) for j in range(e)]
    return _canonical(anchor), [j in dominant for j in range(e)]


def global_budget_reference(freqs: list[np.ndarray], groups: int) -> list[int]:
    """MC-SMoE's budget with loops: each layer's most used expert, then the most used others."""
    kept = {(layer, min(range(len(f)), key=lambda j: (-f[j], j))) for layer, f in enumerate(freqs)}
    rest = sorted(((layer, j) for layer, f in enumerate(freqs) for j in range(len(f)) if (layer, j) not in kept),
                  key=lambda lj: (-freqs[lj[0]][lj[1]] / freqs[lj[0]].sum(), lj[0], lj[1]))
    kept |= set(rest[: groups * len(freqs) - len(freqs)])
    return [sum(1 for layer, _ in kept if layer == i) for i in range(len(freqs))]


def _layer(run, layer: int) -> pd.DataFrame:
    c = run["clusters"]
    return c[c["layer"] == layer].sort_values("expert")


# ----------------------------------------------------------------------------------------------
# Clustering
# ----------------------------------------------------------------------------------------------
def test_m_smoe_equals_a_plain_loop_on_the_recorded_logits(runs, cal_dir):
    recorded = load_calibration(cal_dir)
    for layer in recorded.layers:
        labels, dominant = m_smoe_reference(np.asarray(recorded.router_logits(layer)), recorded.frequency(layer), 3)
        rows = _layer(runs["m"], layer)
        assert rows["cluster"].tolist() == labels and rows["dominant"].tolist() == dominant
        np.testing.assert_array_equal(rows["frequency"], recorded.frequency(layer))


def test_the_global_budget_equals_a_plain_loop(lm_dir, cal_dir):
    recorded = load_calibration(cal_dir)
    run = cluster(lm_dir, cal_dir, method="m-smoe", groups=3, budget="global")
    freqs = [recorded.frequency(L) for L in recorded.layers]
    budget = global_budget_reference(freqs, 3)
    assert run["cluster_layers"]["groups"].tolist() == budget and sum(budget) == 3 * len(freqs)
    for layer, g in zip(recorded.layers, budget):
        labels, dominant = m_smoe_reference(np.asarray(recorded.router_logits(layer)), recorded.frequency(layer), g)
        rows = _layer(run, layer)
        assert rows["cluster"].tolist() == labels and rows["dominant"].tolist() == dominant


def test_hc_smoe_equals_scipy_average_linkage_and_marks_the_most_used_member(runs, cal_dir):
    from scipy.cluster.hierarchy import fcluster, linkage

    recorded = load_calibration(cal_dir)
    for layer in recorded.layers:
        features = np.asarray(recorded.features(layer))
        expected = _canonical(fcluster(linkage(features, method="average", metric="euclidean"), t=3, criterion="maxclust"))
        rows = _layer(runs["hc"], layer)
        assert rows["cluster"].tolist() == expected
        freq = recorded.frequency(layer)
        for c in set(expected):
            members = [j for j in range(len(freq)) if expected[j] == c]
            top = min(members, key=lambda j: (-freq[j], j))
            assert rows["dominant"].tolist()[top] and sum(rows["dominant"].tolist()[j] for j in members) == 1
    summary = runs["hc"]["cluster_layers"]
    assert (summary["groups"] == 3).all() and (summary["n_experts"] == fx.EXPERTS).all()


def test_clustering_is_deterministic_and_a_reused_calibration_gives_the_same_clusters(runs, lm_dir, text, cal_dir, tmp_path):
    again = cluster(lm_dir, cal_dir, method="hc-smoe", groups=3)
    pd.testing.assert_frame_equal(again["clusters"], runs["hc"]["clusters"], check_exact=True)
    own = cluster(lm_dir, text, method="m-smoe", groups=3, out=tmp_path / "own")  # calibrates itself
    pd.testing.assert_frame_equal(own["clusters"], runs["m"]["clusters"], check_exact=True)
    pd.testing.assert_frame_equal(own["calibration_usage"], runs["m"]["calibration_usage"], check_exact=True)
    assert own.manifest["options"]["calibration_run"] is None and runs["m"].manifest["options"]["calibration_run"] == str(cal_dir.resolve())
    # a clustering run that calibrated itself is the calibration of the next one
    chained = cluster(lm_dir, tmp_path / "own", method="hc-smoe", groups=3)
    pd.testing.assert_frame_equal(chained["clusters"], runs["hc"]["clusters"], check_exact=True)
    ratio = cluster(lm_dir, cal_dir, method="m-smoe", ratio=0.25)  # G = 8 − round(2) = 6
    assert (ratio["cluster_layers"]["groups"] == 6).all()


def test_bad_input_is_one_clear_error_before_anything_is_written(lm_dir, cal_dir, text, tmp_path):
    other = fx.save_model(tmp_path / "other", seed=1)
    (tmp_path / "blank.txt").write_text("\n \n")
    (tmp_path / "unknown.txt").write_text("zzz qqq\n")
    out = tmp_path / "never"
    cases = [
        (lm_dir, cal_dir, {"groups": 8}, "--groups 8 is outside 1..7"),
        (lm_dir, cal_dir, {"groups": 0}, "--groups 0 is outside 1..7"),
        (lm_dir, cal_dir, {"groups": 2, "ratio": 0.5}, "exactly one of --groups"),
        (lm_dir, cal_dir, {"ratio": 1.0}, "--ratio 1 is outside"),
        (lm_dir, tmp_path / "blank.txt", {"groups": 2}, "is empty"),
        (lm_dir, tmp_path / "unknown.txt", {"groups": 2}, "known to the model's tokenizer"),
        (other, cal_dir, {"groups": 2}, "was made from"),
        (lm_dir, cal_dir, {"groups": 2, "method": "x-smoe"}, "unknown method"),
        (lm_dir, cal_dir, {"groups": 2, "linkage": "ward", "distance": "cosine"}, "ward needs --distance euclidean"),
        (lm_dir, cal_dir, {"groups": 2, "budget": "global"}, "use it with --method m-smoe"),
        (lm_dir, cal_dir, {"groups": 2, "layers": [7]}, "layer 7 is not in the calibration run"),
    ]
    for model, calibration, kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            cluster(model, calibration, out=out, **kwargs)
        assert not out.exists()


# ----------------------------------------------------------------------------------------------
# Expert distance within clusters
# ----------------------------------------------------------------------------------------------
def _pairs(table: pd.DataFrame) -> set[tuple[int, int, int]]:
    rows = table[table["matrix"] == "expert"]
    return {(int(r.layer), int(r.expert_a), int(r.expert_b)) for r in rows.itertuples(index=False)}


def test_cluster_pairings_pair_what_each_method_merges_with_the_within_values(runs, lm_dir):
    within = ml.expert_distance(lm_dir)["expert_distance"].set_index(["layer", "expert_a", "expert_b", "matrix"])
    for key, method in (("hc", "hc-smoe"), ("m", "m-smoe")):
        run = ml.expert_distance(lm_dir, clusters=runs[key].path)
        table = run["expert_distance"]
        assert set(table["pairing"]) == {method} and run.manifest["options"]["permute"] is False
        expected = set()
        for layer in sorted(table["layer"].unique()):
            rows = _layer(runs[key], layer)
            labels, dominant = rows["cluster"].tolist(), rows["dominant"].tolist()
            for i in range(len(labels)):
                for j in range(len(labels)):
                    if labels[i] != labels[j]:
                        continue
                    if method == "hc-smoe" and i < j:
                        expected.add((layer, i, j))
                    if method == "m-smoe" and dominant[i] and not dominant[j]:
                        expected.add((layer, i, j))
        assert _pairs(table) == expected
        for r in table.itertuples(index=False):  # unpermuted pairs are the within-layer pairs' values
            ref = within.loc[(r.layer, min(r.expert_a, r.expert_b), max(r.expert_a, r.expert_b), r.matrix)]
            assert r.rel_l2 == pytest.approx(ref.rel_l2, abs=1e-6) and r.sv_align == pytest.approx(ref.sv_align, abs=1e-6)


def _aligned(view_layer, anchor: int, e: int):
    """Expert ``e`` with its neurons reordered onto ``anchor`` (identity for the anchor)."""
    from moelens.metrics.permutation import apply_permutation, weight_matching_permutation

    a, b = view_layer.expert(anchor), view_layer.expert(e)
    return b if e == anchor else apply_permutation(b, weight_matching_permutation(a, b))


def _sv_align(a: np.ndarray, b: np.ndarray, gamma: float = 0.3) -> float:
    ua, sa, vta = np.linalg.svd(a)
    ub, sb, vtb = np.linalg.svd(b)
    n = min(int((sa >= gamma * sa[0]).sum()), int((sb >= gamma * sb[0]).sum()))
    return float(np.sum((ua[:, :n] @ vta[:n]) * (ub[:, :n] @ vtb[:n])) / n)


def test_permuted_pairings_equal_a_reference_on_explicitly_aligned_experts(runs, lm_dir):
    view = ml.open_model(lm_dir)
    for key in ("hc", "m"):
        run = ml.expert_distance(lm_dir, clusters=runs[key].path, permute=True)
        table = run["expert_distance"]
        assert set(table["pairing"]) == {f"{run.manifest['options']['pairing']}"} and table["pairing"].iloc[0].endswith("-permuted")
        for layer in sorted(table["layer"].unique()):
            rows = _layer(runs[key], layer)
            anchor_of = {}
            for _, members in rows.groupby("cluster"):
                anchor = int(members[members["dominant"]]["expert"].iloc[0])
                anchor_of.update({int(m): anchor for m in members["expert"]})
            part = table[table["layer"] == layer]
            for r in part[part["matrix"] == "expert"].itertuples(index=False):
                a = _aligned(view.layer(layer), anchor_of[r.expert_a], r.expert_a)
                b = _aligned(view.layer(layer), anchor_of[r.expert_b], r.expert_b)
                ca = np.concatenate([getattr(a, m).double().numpy().ravel() for m in ("gate", "up", "down")])
                cb = np.concatenate([getattr(b, m).double().numpy().ravel() for m in ("gate", "up", "down")])
                rel = np.linalg.norm(ca / np.linalg.norm(ca) - cb / np.linalg.norm(cb))
                assert r.rel_l2 == pytest.approx(rel, abs=1e-6)
                gate = part[(part["matrix"] == "gate") & (part["expert_a"] == r.expert_a) & (part["expert_b"] == r.expert_b)]
                assert float(gate["sv_align"].iloc[0]) == pytest.approx(_sv_align(a.gate.double().numpy(), b.gate.double().numpy()), abs=1e-5)


def test_distance_with_clusters_refuses_what_it_cannot_pair(runs, lm_dir, cal_dir, tmp_path):
    other = fx.save_model(tmp_path / "other", seed=2)
    hc = runs["hc"].path
    cases = [
        (lambda: ml.expert_distance(lm_dir, permute=True), "--permute aligns cluster members"),
        (lambda: ml.ExpertDistanceConfig(clusters=str(hc), pairing="within"), "leave out --pairing"),
        (lambda: ml.expert_distance(lm_dir, other, clusters=hc), "give only the model that was clustered"),
        (lambda: ml.expert_distance(other, clusters=hc), "was made from"),
        (lambda: ml.expert_distance(lm_dir, clusters=cal_dir), "is a calibration run"),
        (lambda: ml.expert_distance(lm_dir, clusters=tmp_path / "nothing"), "does not exist"),
        (lambda: ml.expert_distance(lm_dir, clusters=hc, layers=[5]), "layer 5 is not in the clusters run"),
    ]
    for call, message in cases:
        with pytest.raises(ConfigError, match=message):
            call()
