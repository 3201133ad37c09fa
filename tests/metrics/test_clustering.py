"""Expert clustering (docs/methods.md §3, §7): HC-SMoE against SciPy and a plain-loop reference, ties and
exactly-G cuts by construction, M-SMoE and MC-SMoE's global budget against plain loops."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist

from moelens.errors import ConfigError
from moelens.metrics.clustering import (
    LINKAGES,
    canonical_labels,
    feature_distances,
    global_group_budget,
    groups_from_ratio,
    hc_smoe_clusters,
    m_smoe_clusters,
    m_smoe_clusters_global,
    most_used_members,
    resolve_groups,
)
from moelens.metrics.permutation import apply_permutation
from tests.metrics.test_permutation import expert_features, random_expert


# ----------------------------------------------------------------------------------------------
# Plain references
# ----------------------------------------------------------------------------------------------
def scipy_cut(features: np.ndarray, groups: int, method: str, metric: str) -> np.ndarray:
    """SciPy's tree, cut after its first E − G merges (union-find over the linkage matrix)."""
    n = features.shape[0]
    z = linkage(pdist(features, metric), method=method)
    parent = list(range(2 * n - 1))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for step in range(n - groups):
        a, b = int(z[step, 0]), int(z[step, 1])
        parent[find(a)] = n + step
        parent[find(b)] = n + step
    return canonical_labels([find(i) for i in range(n)])


def loop_average_linkage(features: np.ndarray, groups: int, metric: str = "euclidean") -> list[int]:
    """UPGMA recomputed from scratch at every step in plain Python: the distance of two
    clusters is the mean over all pairs of members; ties → the pair whose lowest experts come
    first. Returns labels numbered by lowest expert."""
    n = features.shape[0]
    rows = features.tolist()

    def dist(i: int, j: int) -> float:
        if metric == "euclidean":
            return math.sqrt(sum((x - y) ** 2 for x, y in zip(rows[i], rows[j])))
        dot = sum(x * y for x, y in zip(rows[i], rows[j]))
        return 1.0 - dot / (math.sqrt(sum(x * x for x in rows[i])) * math.sqrt(sum(y * y for y in rows[j])))

    clusters = [[i] for i in range(n)]
    while len(clusters) > groups:
        best, pair = math.inf, None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                d = sum(dist(i, j) for i in clusters[a] for j in clusters[b]) / (len(clusters[a]) * len(clusters[b]))
                if d < best:
                    best, pair = d, (a, b)
        a, b = pair
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
        clusters.sort(key=lambda c: c[0])
    labels = [0] * n
    for c, members in enumerate(clusters):
        for i in members:
            labels[i] = c
    return labels


def loop_m_smoe(logits: np.ndarray, usage: list[float], groups: int) -> tuple[list[int], list[bool]]:
    """M-SMoE in plain loops: dominant = the G most used (ties → lower index); each other expert
    joins the dominant with the highest cosine of router-logit columns (ties → lower index)."""
    n_tok, n = logits.shape
    cols = [[float(logits[t, e]) for t in range(n_tok)] for e in range(n)]

    def cos(i: int, j: int) -> float:
        dot = sum(x * y for x, y in zip(cols[i], cols[j]))
        return dot / (math.sqrt(sum(x * x for x in cols[i])) * math.sqrt(sum(y * y for y in cols[j])))

    ranked = sorted(range(n), key=lambda e: (-usage[e], e))
    dominant = sorted(ranked[:groups])
    anchor = {}
    for e in range(n):
        if e in dominant:
            anchor[e] = e
            continue
        best, arg = -math.inf, None
        for dm in dominant:  # increasing index, strict > keeps the lower on ties
            s = cos(e, dm)
            if s > best:
                best, arg = s, dm
        anchor[e] = arg
    ids = {}
    labels = []
    for e in range(n):
        ids.setdefault(anchor[e], len(ids))
        labels.append(ids[anchor[e]])
    return labels, [e in dominant for e in range(n)]


def mc_smoe_threshold_budget(usages: list[np.ndarray], groups: int) -> list[int]:
    """MC-SMoE's own rule: normalise, set each layer's most used to 1.0, threshold at the
    (G·L+1)-th largest frequency, keep those strictly above it."""
    freqs = []
    for u in usages:
        f = (u / u.sum()).copy()
        f[int(np.argmax(f))] = 1.0
        freqs.append(f)
    ranked = sorted(np.concatenate(freqs), reverse=True)
    threshold = ranked[groups * len(usages)]
    return [int((f > threshold).sum()) for f in freqs]


# ----------------------------------------------------------------------------------------------
# Groups from options
# ----------------------------------------------------------------------------------------------
def test_groups_from_ratio():
    assert groups_from_ratio(128, 0.25) == 96
    assert groups_from_ratio(8, 0.5) == 4
    assert groups_from_ratio(7, 0.5) == 3       # 3.5 removed rounds half up to 4
    assert groups_from_ratio(20, 0.35) == 13    # 0.35·20 = 6.999… in binary: 7 removed
    assert groups_from_ratio(60, 0.5) == 30
    assert resolve_groups(8, groups=3) == 3
    assert resolve_groups(8, ratio=0.75) == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(groups=0), r"--groups 0 is outside 1\.\.7"),
    (dict(groups=8), r"--groups 8 is outside 1\.\.7"),
    (dict(groups=-2), r"outside 1\.\.7"),
    (dict(groups=2.5), r"whole number"),
    (dict(groups=True), r"whole number"),
    (dict(ratio=0.0), r"outside \(0, 1\)"),
    (dict(ratio=1.0), r"outside \(0, 1\)"),
    (dict(ratio=float("nan")), r"fraction of experts removed"),
    (dict(ratio=0.01), r"removes 0 of 8 experts, leaving 8 groups"),
    (dict(ratio=0.99), r"removes 8 of 8 experts, leaving 0 groups"),
    (dict(), r"exactly one of --groups"),
    (dict(groups=2, ratio=0.5), r"exactly one of --groups"),
])
def test_bad_groups_are_one_clear_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        resolve_groups(8, **kwargs)


# ----------------------------------------------------------------------------------------------
# HC-SMoE
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, metric", [(m, d) for m in LINKAGES for d in ("euclidean", "cosine") if (m, d) != ("ward", "cosine")])
def test_hc_smoe_matches_scipy(method, metric):
    rng = np.random.default_rng(7)
    for n, d in ((24, 6), (40, 32)):
        x = rng.normal(size=(n, d)) + rng.normal(size=(4, d)).repeat(n // 4, axis=0)  # a few loose groups
        for g in (1, 2, 5, n // 2, n - 1):
            got = hc_smoe_clusters(x, g, linkage=method, distance=metric)
            np.testing.assert_array_equal(got, scipy_cut(x, g, method, metric))
            assert np.unique(got).size == g
            # without ties in the heights, SciPy's own maxclust cut is the same partition
            np.testing.assert_array_equal(got, canonical_labels(fcluster(linkage(pdist(x, metric), method), g, "maxclust")))


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_average_linkage_matches_plain_loops(metric):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(14, 5))
    for g in range(1, 14):
        assert hc_smoe_clusters(x, g, distance=metric).tolist() == loop_average_linkage(x, g, metric)


def test_ties_merge_lowest_experts_first_and_give_exactly_g():
    line = np.arange(4.0)[:, None]  # 0, 1, 2, 3: three pairs at distance 1
    assert hc_smoe_clusters(line, 3, linkage="single").tolist() == [0, 0, 1, 2]
    assert hc_smoe_clusters(line, 2, linkage="single").tolist() == [0, 0, 0, 1]
    assert hc_smoe_clusters(line, 2, linkage="average").tolist() == [0, 0, 1, 1]  # {0,1}–2 is 1.5, 2–3 is 1
    two_pairs = np.array([[0.0], [10.0], [1.0], [11.0]])  # (0, 2) and (1, 3) tie at 1
    assert hc_smoe_clusters(two_pairs, 3).tolist() == [0, 1, 0, 2]
    # every merge of single linkage on the line ties at height 1: SciPy's maxclust cannot cut
    # between them and returns 1 cluster; the tree cut after E − G merges gives G
    z = linkage(pdist(line), "single")
    assert np.unique(fcluster(z, 3, "maxclust")).size == 1
    grid = np.array(list(itertools.product(range(3), range(3))), dtype=float)  # many equal distances
    for method in LINKAGES:
        for g in range(1, 9):
            labels = hc_smoe_clusters(grid, g, linkage=method)
            assert np.unique(labels).size == g
            assert labels[0] == 0 and list(np.unique(labels, return_index=True)[1]) == sorted(np.unique(labels, return_index=True)[1])
    assert loop_average_linkage(grid, 4) == hc_smoe_clusters(grid, 4).tolist()


def test_clustering_is_deterministic_and_ignores_expert_order():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(32, 16))
    first = hc_smoe_clusters(x, 8)
    np.testing.assert_array_equal(first, hc_smoe_clusters(x.copy(), 8))
    np.testing.assert_array_equal(first, hc_smoe_clusters(torch.tensor(x, dtype=torch.float64), 8))
    order = rng.permutation(32)
    shuffled = hc_smoe_clusters(x[order], 8)
    back = np.empty(32, dtype=np.int64)
    back[order] = shuffled
    np.testing.assert_array_equal(canonical_labels(back), first)  # the same partition


def test_planted_copies_share_a_cluster():
    """Features of an expert and of its neuron-permuted copy are equal (same function), so the
    pair merges first and stays together whatever G."""
    experts = [random_expert(24, 16, seed=e) for e in range(8)]
    experts[6] = apply_permutation(experts[2], torch.randperm(24, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(1))
    features = torch.stack([expert_features(e, x) for e in experts])
    for g in range(1, 8):
        for method in LINKAGES:
            labels = hc_smoe_clusters(features, g, linkage=method)
            assert labels[2] == labels[6]
    assert hc_smoe_clusters(features, 7).tolist() == [0, 1, 2, 3, 4, 5, 2, 6]


def test_canonical_labels_and_most_used():
    assert canonical_labels([5, 5, 2, 9, 2]).tolist() == [0, 0, 1, 2, 1]
    labels = np.array([0, 1, 0, 1, 2])
    assert most_used_members(labels, [0.1, 0.3, 0.4, 0.3, 0.0]).tolist() == [False, True, True, False, True]


def test_hc_smoe_bad_input():
    x = np.ones((4, 3))
    with pytest.raises(ConfigError, match="ward needs --distance euclidean"):
        hc_smoe_clusters(x, 2, linkage="ward", distance="cosine")
    with pytest.raises(ConfigError, match="unknown linkage 'median'"):
        hc_smoe_clusters(x, 2, linkage="median")
    with pytest.raises(ConfigError, match="unknown distance"):
        hc_smoe_clusters(x, 2, distance="manhattan")
    with pytest.raises(ConfigError, match="outside 1..3"):
        hc_smoe_clusters(x, 4)
    zero = np.vstack([np.zeros(3), np.ones((3, 3))])
    with pytest.raises(ConfigError, match="expert 0 has an all-zero feature"):
        hc_smoe_clusters(zero, 2, distance="cosine")
    with pytest.raises(ConfigError, match="NaN"):
        hc_smoe_clusters(np.full((4, 3), np.nan), 2)
    assert feature_distances(zero)[0, 1] == pytest.approx(math.sqrt(3))


# ----------------------------------------------------------------------------------------------
# M-SMoE
# ----------------------------------------------------------------------------------------------
def test_m_smoe_matches_plain_loops():
    rng = np.random.default_rng(5)
    for trial in range(6):
        n = 8 + 4 * trial
        logits = rng.normal(size=(60, n)) + rng.normal(size=(60, 3)).repeat(-(-n // 3), axis=1)[:, :n]
        usage = rng.integers(0, 6, size=n).astype(float)  # many ties in usage
        for g in (1, 3, n - 1):
            got = m_smoe_clusters(logits, usage, g)
            labels, dominant = loop_m_smoe(logits, usage.tolist(), g)
            assert got.labels.tolist() == labels
            assert got.dominant.tolist() == dominant
            assert got.dominant.sum() == g and np.unique(got.labels).size == g


def test_m_smoe_ties_by_construction():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(30, 6))
    logits[:, 4] = logits[:, 1]        # experts 1 and 4: identical columns, a similarity tie
    usage = [0.1, 0.3, 0.1, 0.2, 0.3, 0.0]
    got = m_smoe_clusters(logits, usage, 2)
    assert got.dominant.tolist() == [False, True, False, False, True, False]  # usage tie 1/4 → both kept
    got = m_smoe_clusters(logits, [0.3, 0.1, 0.1, 0.1, 0.1, 0.3], 3)  # dominants 0, 5 and 1 (ties → lower)
    assert np.flatnonzero(got.dominant).tolist() == [0, 1, 5]
    assert got.labels[4] == got.labels[1]  # 4's column equals 1's: cos = 1, the most similar
    # a member equally similar to two dominants joins the lower
    logits = rng.normal(size=(30, 4))
    logits[:, 3] = logits[:, 1]
    got = m_smoe_clusters(logits, [0.0, 0.5, 0.1, 0.4], 2)   # dominants 1 and 3, identical columns
    assert got.labels.tolist() == [0, 0, 0, 1]                # 0 and 2 tie between them: both join 1


def test_m_smoe_accepts_tensors_and_rejects_bad_input():
    logits = torch.randn(20, 5, generator=torch.Generator().manual_seed(0))
    usage = torch.tensor([1.0, 4.0, 2.0, 0.0, 3.0])
    ref = m_smoe_clusters(logits.numpy(), usage.numpy(), 2)
    got = m_smoe_clusters(logits, usage, 2)
    np.testing.assert_array_equal(got.labels, ref.labels)
    with pytest.raises(ConfigError, match="usage has 4 entries"):
        m_smoe_clusters(logits, usage[:4], 2)
    with pytest.raises(ConfigError, match="outside 1..4"):
        m_smoe_clusters(logits, usage, 5)


def test_global_budget_matches_mc_smoe_and_keeps_each_layer():
    rng = np.random.default_rng(2)
    usages = [rng.dirichlet(np.full(16, a)) for a in (0.3, 1.0, 5.0, 50.0)]  # from peaked to flat
    for g in (1, 2, 4, 8, 15):
        budget = global_group_budget(usages, g)
        assert sum(budget) == g * len(usages) and min(budget) >= 1 and max(budget) <= 16
        assert budget == mc_smoe_threshold_budget(usages, g)  # no ties: the same as MC-SMoE's rule
    # a layer whose experts are all rarely used still keeps its most used one
    lopsided = [np.array([10.0, 9.0, 8.0, 7.0]), np.array([1.0, 0.0, 0.0, 0.0]) + 1e-3]
    assert global_group_budget(lopsided, 1) == [1, 1]
    groupings = m_smoe_clusters_global([rng.normal(size=(40, 16)) for _ in usages], usages, 4)
    for grouping, want in zip(groupings, global_group_budget(usages, 4)):
        assert grouping.dominant.sum() == want and np.unique(grouping.labels).size == want
    with pytest.raises(ConfigError, match="outside 1..3"):
        global_group_budget(lopsided, 4)
