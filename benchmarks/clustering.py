"""Expert clustering and weight-matching permutation at a real layer shape, against plain loops.

One Qwen3-30B-A3B-shaped MoE layer (E = 128 experts, F = 768, d = 2048; bf16 random weights of
scale 0.02, each expert from its own seed) with synthetic calibration records: HC-SMoE features
[E, d] (four loose families of experts plus noise), router logits [N = 4096, E] and usage
frequencies (a Dirichlet draw). G = E/2 groups. Both sides compute:

- HC-SMoE: average linkage on Euclidean distances, cut to G clusters;
- M-SMoE: the G most used experts dominant, the others joined by router-logit cosine;
- permutation: every non-anchor member of every HC-SMoE cluster aligned onto the cluster's most
  used member (docs/methods.md §3's F×F cost, exact assignment).

``moelens``: :func:`hc_smoe_clusters` (Lance–Williams, vectorised over clusters),
:func:`m_smoe_clusters` (one [E, E] similarity product) and :func:`layer_permutations` (one
float64 [F, 3d] × [3d, F] product per member). ``reference``: the straightforward loops a
script would write: average linkage recomputed from all member pairs at every merge, cosine per
pair of experts, and per member the cost row by row from the differences
‖a_p − b_q‖² (a loop over the anchor's F neurons, float64), then the same SciPy assignment.
The reference's permutation is linear in the number of members, so it is measured on
``--ref-members`` members and scaled; the output says so. Agreement: equal labels, equal
dominant experts, equal permutations on the members the reference computed.

Every measurement runs in its own process (wall time of the computation only; weights are
generated before the clock starts) and reports its peak RSS; the load average is printed because
other processes share the machine.

    python benchmarks/clustering.py --quick --threads 2   # E = 128, F and d / 4: under a minute
    python benchmarks/clustering.py --threads 2            # the whole layer (the reference scaled)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import finish_measurement, run_measurement  # noqa: E402
from measure import line as measure_line  # noqa: E402

SHAPE = {"experts": 128, "f": 768, "d": 2048, "tokens": 4096, "ref_members": 2, "label": "Qwen3-30B-A3B layer"}
# --quick: all 128 experts (the clustering at its real size), F and d / 4 (the permutations 64x lighter)
QUICK = {"experts": 128, "f": 192, "d": 512, "tokens": 4096, "ref_members": 4, "label": "Qwen3-30B-A3B-shaped layer, F and d / 4"}
SCALE = 0.02
ROLES = ("gate", "up", "down")


# ----------------------------------------------------------------------------------------------
# Inputs (the same numbers in every process)
# ----------------------------------------------------------------------------------------------
def layer_stacks(shape: dict):
    """gate, up [E, F, d] and down [E, d, F] in bf16, expert e of role r from seed 1000·r + e."""
    import torch

    e, f, d = shape["experts"], shape["f"], shape["d"]
    out = []
    for r, role in enumerate(ROLES):
        dims = (d, f) if role == "down" else (f, d)
        stack = torch.empty(e, *dims, dtype=torch.bfloat16)
        for i in range(e):
            stack[i] = (torch.randn(*dims, generator=torch.Generator().manual_seed(1000 * r + i)) * SCALE).to(torch.bfloat16)
        out.append(stack)
    return tuple(out)


def calibration(shape: dict):
    """(features [E, d], router logits [N, E], usage [E]) as float64 numpy arrays."""
    import numpy as np

    rng = np.random.default_rng(0)
    e, d = shape["experts"], shape["d"]
    families = rng.normal(size=(4, d))
    features = families[np.arange(e) % 4] + 0.8 * rng.normal(size=(e, d))
    logits = rng.normal(size=(shape["tokens"], e)) + rng.normal(size=(shape["tokens"], 8))[:, np.arange(e) % 8]
    usage = rng.dirichlet(np.full(e, 0.5))
    return features, logits, usage


def anchors_of(labels, usage):
    from moelens.metrics.clustering import most_used_members
    from moelens.metrics.permutation import cluster_anchors

    return cluster_anchors(labels, usage, most_used_members(labels, usage))


def ref_subset(anchors, k: int) -> list[int]:
    """k non-anchor members spread over the layer (first and last included)."""
    members = [int(e) for e in range(len(anchors)) if anchors[e] != e]
    k = max(1, min(k, len(members)))
    return [members[round(i * (len(members) - 1) / max(1, k - 1))] for i in range(k)]


# ----------------------------------------------------------------------------------------------
# Measurements (each in its own process)
# ----------------------------------------------------------------------------------------------
def warm_up(device: str = "cpu") -> None:
    """Import and first-call costs (SciPy modules, BLAS pools) stay outside both clocks."""
    import numpy as np
    import torch

    from moelens.metrics.clustering import hc_smoe_clusters, m_smoe_clusters
    from moelens.metrics.permutation import layer_permutations

    x = np.random.default_rng(0).normal(size=(6, 4))
    hc_smoe_clusters(x, 3)
    m_smoe_clusters(x, np.ones(4), 2)
    w = torch.randn(2, 4, 3)
    layer_permutations(w, w, w.transpose(1, 2).contiguous(), [0, 0], device=device)


def measure_moelens(shape: dict, args: argparse.Namespace) -> dict:
    import numpy as np

    from moelens.metrics.clustering import hc_smoe_clusters, m_smoe_clusters
    from moelens.metrics.permutation import layer_permutations

    gate, up, down = layer_stacks(shape)
    features, logits, usage = calibration(shape)
    groups = shape["experts"] // 2
    warm_up(args.device)
    t0 = time.perf_counter()
    labels = hc_smoe_clusters(features, groups)
    t1 = time.perf_counter()
    m = m_smoe_clusters(logits, usage, groups)
    t2 = time.perf_counter()
    anchors = anchors_of(labels, usage)
    perms = layer_permutations(gate, up, down, anchors, device=args.device)
    t3 = time.perf_counter()
    keep = ref_subset(anchors, args.ref_members)
    return {
        "wall_s": t3 - t0, "hc_s": t1 - t0, "m_s": t2 - t1, "perm_s": t3 - t2,
        "members": int((anchors != np.arange(len(anchors))).sum()),
        "labels": labels.tolist(), "m_labels": m.labels.tolist(), "m_dominant": m.dominant.tolist(),
        "perms": {str(e): perms[e].tolist() for e in keep},
    }


def reference_average_linkage(features, groups: int) -> list[int]:
    """Average linkage recomputed from all member pairs at every merge (ties → lowest experts)."""
    import numpy as np

    n = features.shape[0]
    dist = [[float(np.linalg.norm(features[i] - features[j])) for j in range(n)] for i in range(n)]
    clusters = [[i] for i in range(n)]
    while len(clusters) > groups:
        best, pair = math.inf, None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                total = 0.0
                for i in clusters[a]:
                    row = dist[i]
                    for j in clusters[b]:
                        total += row[j]
                d = total / (len(clusters[a]) * len(clusters[b]))
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


def reference_m_smoe(logits, usage, groups: int) -> tuple[list[int], list[bool]]:
    import numpy as np

    n = logits.shape[1]
    cols = [logits[:, e] for e in range(n)]
    ranked = sorted(range(n), key=lambda e: (-usage[e], e))
    dominant = sorted(ranked[:groups])
    anchor = {}
    for e in range(n):
        if e in dominant:
            anchor[e] = e
            continue
        best, arg = -math.inf, None
        for dm in dominant:
            s = float(cols[e] @ cols[dm] / (np.linalg.norm(cols[e]) * np.linalg.norm(cols[dm])))
            if s > best:
                best, arg = s, dm
        anchor[e] = arg
    ids: dict[int, int] = {}
    labels = [ids.setdefault(anchor[e], len(ids)) for e in range(n)]
    return labels, [e in dominant for e in range(n)]


def reference_permutation(gate, up, down, a: int, b: int) -> list[int]:
    """docs/methods.md §3's cost row by row from the differences, float64, then SciPy's assignment."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    ga, ua, da = (t[a].double().numpy() for t in (gate, up, down))
    gb, ub, db = (t[b].double().numpy() for t in (gate, up, down))
    f = ga.shape[0]
    cost = np.empty((f, f))
    for p in range(f):
        cost[p] = ((ga[p] - gb) ** 2).sum(1) + ((ua[p] - ub) ** 2).sum(1) + ((da[:, p][:, None] - db) ** 2).sum(0)
    rows, cols = linear_sum_assignment(cost)
    return cols[np.argsort(rows)].tolist()


def measure_reference(shape: dict, args: argparse.Namespace) -> dict:
    gate, up, down = layer_stacks(shape)
    features, logits, usage = calibration(shape)
    groups = shape["experts"] // 2
    warm_up()
    t0 = time.perf_counter()
    labels = reference_average_linkage(features, groups)
    t1 = time.perf_counter()
    m_labels, m_dominant = reference_m_smoe(logits, usage, groups)
    t2 = time.perf_counter()
    import numpy as np

    anchors = anchors_of(np.array(labels), usage)
    keep = ref_subset(anchors, args.ref_members)
    perms = {str(e): reference_permutation(gate, up, down, int(anchors[e]), e) for e in keep}
    t3 = time.perf_counter()
    return {"wall_s": t3 - t0, "hc_s": t1 - t0, "m_s": t2 - t1, "perm_s": t3 - t2, "perm_members": len(keep),
            "labels": labels, "m_labels": m_labels, "m_dominant": m_dominant, "perms": perms}


MEASURES = {"moelens": measure_moelens, "reference": measure_reference}


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="E = 128 with F = 192, d = 512 (a quarter of each)")
    parser.add_argument("--ref-members", type=int, default=None, help="members the reference permutes (default 2; quick 4)")
    parser.add_argument("--threads", type=int, default=0, help="threads in each measurement, torch's and BLAS's")
    parser.add_argument("--device", default="cpu", help="where moelens computes the permutation costs (cpu, cuda); the reference runs on the CPU")
    parser.add_argument("--json", default=None, help="also write every number to this JSON file")
    parser.add_argument("--measure", choices=sorted(MEASURES), help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = QUICK if args.quick else SHAPE
    if args.ref_members is None:
        args.ref_members = shape["ref_members"]
    if args.measure:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        finish_measurement(MEASURES[args.measure](shape, args), args.json_out)
        return
    import torch

    print(f"moelens clustering benchmark: torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, moelens's permutation costs on {args.device}")
    print(f"== {shape['label']}: E={shape['experts']}, F={shape['f']}, d={shape['d']}, bf16, G={shape['experts'] // 2}, "
          f"N={shape['tokens']} calibration tokens ==", flush=True)
    with tempfile.TemporaryDirectory(prefix="moelens-bench-") as tmp:
        extra = ["--ref-members", str(args.ref_members), "--device", args.device, *(["--quick"] if args.quick else [])]
        mine = run_measurement(__file__, "moelens", Path(tmp), args.threads, *extra)
        print(measure_line("moelens (clustering + all permutations)", mine,
                           f"HC {mine['hc_s']:.3f} s, M {mine['m_s']:.3f} s, permutations {mine['perm_s']:.2f} s ({mine['members']} members)"), flush=True)
        ref = run_measurement(__file__, "reference", Path(tmp), args.threads, *extra)
        scale = mine["members"] / ref["perm_members"]
        ref_perm = ref["perm_s"] * scale
        scaled = {**ref, "wall_s": ref["hc_s"] + ref["m_s"] + ref_perm}
        print(measure_line(f"reference, permutations MEASURED on {ref['perm_members']}", ref,
                           f"HC {ref['hc_s']:.2f} s, M {ref['m_s']:.3f} s, permutations {ref['perm_s']:.2f} s"), flush=True)
        print(measure_line(f"reference, SCALED x{scale:g} to {mine['members']} members", scaled, "(permutation time scaled linearly)"), flush=True)
    same = {
        "hc_labels": mine["labels"] == ref["labels"],
        "m_smoe": mine["m_labels"] == ref["m_labels"] and mine["m_dominant"] == ref["m_dominant"],
        "perms": all(mine["perms"][k] == v for k, v in ref["perms"].items()),
    }
    ratios = {"hc": ref["hc_s"] / mine["hc_s"], "m": ref["m_s"] / mine["m_s"], "perm": ref_perm / mine["perm_s"],
              "total": scaled["wall_s"] / mine["wall_s"]}
    print(f"  agreement: HC-SMoE labels equal {same['hc_labels']}, M-SMoE labels and dominant equal {same['m_smoe']}, "
          f"permutations equal on {ref['perm_members']} members {same['perms']}")
    print(f"  => moelens is faster than the reference: HC-SMoE {ratios['hc']:.0f}x, M-SMoE {ratios['m']:.0f}x, "
          f"permutations {ratios['perm']:.1f}x (scaled), total {ratios['total']:.1f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"moelens": mine, "reference": ref, "agreement": same, "ratios": ratios}, indent=2))
    if not all(same.values()):
        raise SystemExit("moelens and the reference disagree")


if __name__ == "__main__":
    main()
