"""Expert distance at real shapes: moelens against a plain per-pair SVD reference.

For each shape, random bf16 expert weights (scale 0.02, every role, generated per role from a
fixed seed, so both measurements see the same numbers):

- ``mixtral``: Mixtral-8x7B layer, d = 4096, F = 14336, E = 8;
- ``qwen3``: Qwen3-30B-A3B layer, d = 2048, F = 768, E = 128.

Two pairings per shape: ``base-tuned`` (expert e of A with expert e of B = A + noise of relative
size 1e-2) and ``within`` (every i < j of A). Random matrices have a dense spectrum, so with
γ = 0.3 nearly all min(F, d) singular values are kept: the heaviest case for both paths.

Every measurement runs in its own Python process and reports its wall time (compute only; the
weights are generated before the clock starts) and peak resident memory (``ru_maxrss``):

- ``moelens``: ``role_distances`` for gate, up and down, one role in memory at a time, and
  ``expert_distances`` (pool = mean and ito), for every pair;
- ``reference``: per pair and role, ``torch.linalg.svd`` of both matrices in float64 (the SVDs
  are recomputed for every pair), n from the float64 σ, R = (1/n) Σ_{i,j≤n}(u_iᴬ·u_jᴮ)(v_iᴬ·v_jᴮ)
  evaluated as the sum of the elementwise product of the cross matrices U_nᴬᵀU_nᴮ and V_nᴬᵀV_nᴮ
  (a Python loop over i, j would be n² ≈ 1.7e7 steps at d = 4096), rel_l2 as the norm of the
  difference of the normalised matrices (the concatenation for the expert row). Its work is
  linear in the number of pairs, so at real scale it is measured on ``--ref-pairs`` pairs and
  scaled linearly; the output says so.

Agreement is the largest |Δ| between the two over the pairs the reference computed, per role
and for the expert row (it must be ≤ 1e-5). The machine's load average is printed with each
measurement because other processes share it.

    python benchmarks/distance.py --quick --threads 2       # smaller layers, a few minutes
    python benchmarks/distance.py --shapes qwen3             # real shapes (hours on 2 cores)
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

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("gate", "up", "down")
SHAPES = {
    "mixtral": {"d": 4096, "f": 14336, "experts": 8, "ref_pairs": 1, "label": "Mixtral-8x7B layer"},
    "qwen3": {"d": 2048, "f": 768, "experts": 128, "ref_pairs": 4, "label": "Qwen3-30B-A3B layer"},
}
# --quick: mixtral at 1/8 of d and F (same aspect ratio); qwen3 at its real d and F, 16 experts
QUICK = {
    "mixtral": {"d": 512, "f": 1792, "experts": 8, "ref_pairs": 4, "label": "Mixtral-8x7B-shaped layer (d, F / 8)"},
    "qwen3": {"d": 2048, "f": 768, "experts": 16, "ref_pairs": 6, "label": "Qwen3-30B-A3B layer, 16 of its 128 experts"},
}
PAIRINGS = ("base-tuned", "within")
SCALE = 0.02
TUNE_NOISE = 1e-2
TOL = 1e-5


# ----------------------------------------------------------------------------------------------
# Weights and pairs
# ----------------------------------------------------------------------------------------------
def expert_matrix(shape: dict, role: str, model: str, e: int):
    """Expert e's ``role`` matrix [out, in] in bf16, of model "a" or "b" (b = a + relative noise)."""
    import torch

    d, f = shape["d"], shape["f"]
    dims = (d, f) if role == "down" else (f, d)
    seed = 1000 * ROLES.index(role) + e
    w = torch.randn(*dims, generator=torch.Generator().manual_seed(seed)) * SCALE
    if model == "b":
        w += torch.randn(*dims, generator=torch.Generator().manual_seed(seed + 500)) * (SCALE * TUNE_NOISE)
    return w.to(torch.bfloat16)


def role_stack(shape: dict, role: str, model: str):
    """[E, out, in] bf16, one role of one model (what ``MoELayer.expert_stack`` returns), built
    one expert at a time so that only the stack and one float32 expert are in memory."""
    import torch

    first = expert_matrix(shape, role, model, 0)
    out = torch.empty(shape["experts"], *first.shape, dtype=torch.bfloat16)
    out[0] = first
    for e in range(1, shape["experts"]):
        out[e] = expert_matrix(shape, role, model, e)
    return out


def all_pairs(shape: dict, pairing: str):
    from moelens.metrics import same_index_pairs, within_pairs

    return same_index_pairs(shape["experts"]) if pairing == "base-tuned" else within_pairs(shape["experts"])


def ref_subset(n_pairs: int, k: int) -> list[int]:
    """k pair positions spread over the list (first and last included)."""
    k = max(1, min(k, n_pairs))
    return sorted({round(i * (n_pairs - 1) / max(1, k - 1)) for i in range(k)})


# ----------------------------------------------------------------------------------------------
# Measurements (each in its own process)
# ----------------------------------------------------------------------------------------------
def measure_moelens(shape: dict, args: argparse.Namespace) -> dict:
    from moelens.metrics import expert_distances, role_distances

    pairs = all_pairs(shape, args.pairing)
    keep = ref_subset(len(pairs), args.ref_pairs)
    per_role, wall, input_bytes = {}, 0.0, 0
    for role in ROLES:
        a = role_stack(shape, role, "a")
        b = role_stack(shape, role, "b") if args.pairing == "base-tuned" else None
        input_bytes = max(input_bytes, a.numel() * a.element_size() * (1 if b is None else 2))
        t0 = time.perf_counter()
        per_role[role] = role_distances(a, b, pairs, device="cpu")
        wall += time.perf_counter() - t0
        del a, b
    t0 = time.perf_counter()
    pooled = {pool: expert_distances(per_role, pool=pool) for pool in ("mean", "ito")}
    wall += time.perf_counter() - t0
    rows = {role: per_role[role] for role in ROLES} | {f"expert/{p}": r for p, r in pooled.items()}
    out = {name: {"rel_l2": r.rel_l2[keep].tolist(), "sv_align": r.sv_align[keep].tolist(), "n_sv": r.n_sv[keep].tolist()}
           for name, r in rows.items()}
    return {"wall_s": wall, "pairs": len(pairs), "input_mib": input_bytes / 2**20, "rows": out}


def reference_pair(wa, wb, gamma: float = 0.3) -> tuple[float, int, float]:
    """(Σ_{i,j≤n}(u_iᴬ·u_jᴮ)(v_iᴬ·v_jᴮ), n, ‖A/‖A‖ − B/‖B‖‖) in float64, SVDs computed here."""
    import torch

    a, b = wa.double(), wb.double()
    ua, sa, vha = torch.linalg.svd(a, full_matrices=False)
    ub, sb, vhb = torch.linalg.svd(b, full_matrices=False)

    def kept(s) -> int:
        if float(s[0]) == 0.0:
            return 0
        rank = int((s > max(a.shape) * torch.finfo(torch.float32).eps * s[0]).sum())
        return min(int((s >= (gamma - 1e-6) * s[0]).sum()), rank)

    n = min(kept(sa), kept(sb))
    total = float(((ua[:, :n].T @ ub[:, :n]) * (vha[:n] @ vhb[:n].T)).sum())
    rel = float((a / a.norm() - b / b.norm()).norm())
    return total, n, rel


def measure_reference(shape: dict, args: argparse.Namespace) -> dict:
    """The pairs' experts are generated when a pair needs them (outside the clock): the
    reference holds two matrices at a time, as a plain per-pair script would."""
    pairs = all_pairs(shape, args.pairing)
    keep = ref_subset(len(pairs), args.ref_pairs)
    sub = [(int(pairs[p][0]), int(pairs[p][1])) for p in keep]
    other = "b" if args.pairing == "base-tuned" else "a"
    wall = 0.0
    # pass 1: the experts' squared norms summed over roles, for the rel_l2 of the concatenation
    sq_a = {i: 0.0 for i, _ in sub}
    sq_b = {j: 0.0 for _, j in sub}
    for role in ROLES:
        for model, sq in (("a", sq_a), (other, sq_b)):
            for e in sq:
                w = expert_matrix(shape, role, model, e)
                t0 = time.perf_counter()
                sq[e] += float(w.double().pow(2).sum())
                wall += time.perf_counter() - t0
    # pass 2: per role and pair, the SVDs, R, and the normalised difference
    rows = {role: {"rel_l2": [], "sv_align": [], "n_sv": []} for role in ROLES}
    parts: dict[tuple[int, int], list[tuple[float, int]]] = {p: [] for p in sub}
    cat_sq = {p: 0.0 for p in sub}
    for role in ROLES:
        for i, j in sub:
            wa, wb = expert_matrix(shape, role, "a", i), expert_matrix(shape, role, other, j)
            t0 = time.perf_counter()
            total, n, rel = reference_pair(wa, wb)
            diff = wa.double() / math.sqrt(sq_a[i]) - wb.double() / math.sqrt(sq_b[j])
            cat_sq[(i, j)] += float(diff.pow(2).sum())
            wall += time.perf_counter() - t0
            rows[role]["rel_l2"].append(rel)
            rows[role]["sv_align"].append(total / n if n else math.nan)
            rows[role]["n_sv"].append(n)
            parts[(i, j)].append((total, n))
    for pool in ("mean", "ito"):
        rows[f"expert/{pool}"] = {
            "rel_l2": [math.sqrt(cat_sq[p]) for p in sub],
            "n_sv": [sum(n for _, n in parts[p]) for p in sub],
            "sv_align": [sum(t / n for t, n in parts[p]) / len(ROLES) if pool == "mean"
                         else sum(t for t, _ in parts[p]) / sum(n for _, n in parts[p]) for p in sub],
        }
    return {"wall_s": wall, "pairs": len(sub), "rows": rows}


MEASURES = {"moelens": measure_moelens, "reference": measure_reference}


def child_main(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = (QUICK if args.quick else SHAPES)[args.shape]
    result = MEASURES[args.measure](shape, args)
    finish_measurement(result, args.json_out)


def run_child(measure: str, name: str, pairing: str, ref_pairs: int, work: Path, args: argparse.Namespace) -> dict:
    extra = ["--shape", name, "--pairing", pairing, "--ref-pairs", str(ref_pairs), *(["--quick"] if args.quick else [])]
    return run_measurement(__file__, measure, work, args.threads, *extra)


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------
def line(label: str, r: dict, note: str = "") -> str:
    return measure_line(label, r, note, width=40)


def agreement(mine: dict, theirs: dict) -> dict[str, dict[str, float]]:
    out = {}
    for row, ref in theirs["rows"].items():
        got = mine["rows"][row]
        out[row] = {m: max((abs(x - y) for x, y in zip(got[m], ref[m]) if not (math.isnan(x) and math.isnan(y))), default=0.0)
                    for m in ("rel_l2", "sv_align")}
        out[row]["n_equal"] = float(got["n_sv"] == ref["n_sv"])
    return out


def bench_pairing(name: str, pairing: str, args: argparse.Namespace, work: Path) -> dict:
    shape = (QUICK if args.quick else SHAPES)[name]
    n_pairs = len(all_pairs(shape, pairing))
    n_ref = min(n_pairs, args.ref_pairs or shape["ref_pairs"])
    print(f"  -- {pairing}: {n_pairs} pairs", flush=True)
    mine = run_child("moelens", name, pairing, n_ref, work, args)
    print(line("moelens (all pairs, 3 roles + expert row)", mine, f"inputs of one role {mine['input_mib']:.0f} MiB"), flush=True)
    ref = run_child("reference", name, pairing, n_ref, work, args)
    scale = n_pairs / ref["pairs"]
    scaled = {**ref, "wall_s": ref["wall_s"] * scale}
    if ref["pairs"] < n_pairs:
        print(line(f"reference, MEASURED on {ref['pairs']}/{n_pairs} pairs", ref), flush=True)
        print(line(f"reference, SCALED x{scale:g} to {n_pairs} pairs", scaled, "(time scaled linearly; RSS as measured)"), flush=True)
    else:
        print(line("reference (per-pair float64 SVD)", ref), flush=True)
    agree = agreement(mine, ref)
    worst = max(max(v["rel_l2"], v["sv_align"]) for v in agree.values())
    detail = ", ".join(f"{row} {v['rel_l2']:.1e}/{v['sv_align']:.1e}" for row, v in agree.items())
    n_same = all(v["n_equal"] for v in agree.values())
    print(f"  agreement over {ref['pairs']} pairs, max |Δ| rel_l2/sv_align: {detail}", flush=True)
    print(f"  => max |Δ| = {worst:.2e} ({'OK' if worst <= TOL else 'ABOVE'} 1e-5; n equal: {n_same});"
          f" moelens is {scaled['wall_s'] / mine['wall_s']:.1f}x faster than the reference{' (scaled)' if scale > 1 else ''};"
          f" peak RSS {mine['peak_rss_mib'] / ref['peak_rss_mib']:.2f}x the reference's", flush=True)
    return {"pairs": n_pairs, "ref_pairs": ref["pairs"], "moelens": mine, "reference": ref, "agreement": agree,
            "max_abs_diff": worst, "speedup": scaled["wall_s"] / mine["wall_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="qwen3,mixtral", help="comma-separated: qwen3, mixtral")
    parser.add_argument("--pairings", default=",".join(PAIRINGS), help="comma-separated: base-tuned, within")
    parser.add_argument("--ref-pairs", type=int, default=None, help="pairs the reference is measured on (default: 1 for mixtral, 4 for qwen3; quick: 4 and 6)")
    parser.add_argument("--quick", action="store_true", help="smaller shapes of the same aspect ratios (see QUICK)")
    parser.add_argument("--threads", type=int, default=0, help="threads in each measurement, torch's and BLAS's (default: the libraries' choice)")
    parser.add_argument("--json", default=None, help="also write every number to this JSON file")
    # child-process options
    parser.add_argument("--measure", choices=sorted(MEASURES), help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--pairing", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        child_main(args)
        return
    import torch

    print(f"moelens expert-distance benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}{', QUICK shapes' if args.quick else ''}")
    summary: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="moelens-bench-") as tmp:
        for name in [s.strip() for s in args.shapes.split(",") if s.strip()]:
            if name not in SHAPES:
                raise SystemExit(f"unknown shape {name!r}; expected one of {', '.join(SHAPES)}")
            shape = (QUICK if args.quick else SHAPES)[name]
            print(f"\n== {shape['label']}: d={shape['d']}, F={shape['f']}, E={shape['experts']}, bf16 ==", flush=True)
            for pairing in [p.strip() for p in args.pairings.split(",") if p.strip()]:
                if pairing not in PAIRINGS:
                    raise SystemExit(f"unknown pairing {pairing!r}; expected one of {', '.join(PAIRINGS)}")
                summary[f"{name}/{pairing}"] = bench_pairing(name, pairing, args, Path(tmp))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
