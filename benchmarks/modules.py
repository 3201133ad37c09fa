"""Module metrics at real shapes: moelens against a plain float64 numpy reference.

One layer of two models A and B (B = A + relative noise 1e-2, random bf16 weights of scale 0.02,
every matrix generated from its own seed, so both measurements see the same numbers):

- ``llama``: Llama-3-8B, d = 4096: attn.q 4096×4096, attn.k/v 1024×4096, attn.o 4096×4096,
  dense MLP gate/up 14336×4096, down 4096×14336;
- ``mixtral``: Mixtral-8x7B: the same attention, a router 8×4096, and 8 experts of gate/up
  14336×4096 and down 4096×14336.

``--quick`` divides every dimension by 8 (same aspect ratios, same expert count).

Every measurement runs in its own Python process, which reports its wall time and peak resident
memory (``ru_maxrss``); weights are generated outside the clock:

- ``moelens``: per module, the stacks a, b [E or 1, out, in] in bf16 (one module of both models
  in memory), ``pair_and_single_metrics(a, b)`` on the CPU: the five pair metrics of A vs B and
  the five single metrics of A and of B (float64 Gram spectra, each Gram formed once);
- ``reference``: per matrix, A and B loaded as float64 numpy arrays, then numpy per metric:
  ``np.corrcoef``, cos and rel_l2 from their formulas, CKA exactly as SPEC §5 writes it (X = Aᵀ,
  Y = Bᵀ centred, ‖YᵀX‖² / (‖XᵀX‖ ‖YᵀY‖), so with out×out products), changed_frac, and for each
  matrix ``np.linalg.svd`` (values only) for the single metrics, with α fitted by a loop over the
  candidate x_min. Its work is linear in the number of experts, so at full size it is measured on
  ``--ref-experts`` experts per role and scaled linearly; the output says so.

Agreement is the largest difference between the two over the matrices the reference computed:
absolute for corr, cos, rel_l2, cka, changed_frac; relative for the norms, ranks and α.

    python benchmarks/modules.py --quick --threads 2     # 1/8 shapes, about a minute or two
    python benchmarks/modules.py --shapes llama          # real shapes (see the docstring's end)
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
SCALE = 0.02
TUNE_NOISE = 1e-2
PAIR = ("corr", "cos", "rel_l2", "cka", "changed_frac")
SINGLE = ("fro_norm", "spectral_norm", "stable_rank", "effective_rank", "alpha")
RELATIVE = set(SINGLE)


def layer_modules(d: int, kv: int, f: int, experts: int) -> dict[str, tuple[int, int, int]]:
    """module name -> (count, out, in)."""
    mods = {"attn.q": (1, d, d), "attn.k": (1, kv, d), "attn.v": (1, kv, d), "attn.o": (1, d, d)}
    if experts:
        mods |= {"router": (1, experts, d), "mlp.gate": (experts, f, d), "mlp.up": (experts, f, d), "mlp.down": (experts, d, f)}
    else:
        mods |= {"mlp.gate": (1, f, d), "mlp.up": (1, f, d), "mlp.down": (1, d, f)}
    return mods


SHAPES = {
    "llama": {"d": 4096, "kv": 1024, "f": 14336, "experts": 0, "ref_experts": 1, "label": "Llama-3-8B layer"},
    "mixtral": {"d": 4096, "kv": 1024, "f": 14336, "experts": 8, "ref_experts": 1, "label": "Mixtral-8x7B layer"},
}
QUICK = {
    "llama": {"d": 512, "kv": 128, "f": 1792, "experts": 0, "ref_experts": 1, "label": "Llama-3-8B-shaped layer (all dims / 8)"},
    "mixtral": {"d": 512, "kv": 128, "f": 1792, "experts": 8, "ref_experts": 8, "label": "Mixtral-8x7B-shaped layer (all dims / 8)"},
}


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------
def matrix(module: str, index: int, out: int, inp: int, model: str):
    """One bf16 matrix [out, in] of model "a" or "b" (b = a + relative noise)."""
    import torch

    seed = 7919 * (sum(map(ord, module)) % 1000) + index
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * SCALE
    if model == "b":
        w += torch.randn(out, inp, generator=torch.Generator().manual_seed(seed + 104729)) * (SCALE * TUNE_NOISE)
    return w.to(torch.bfloat16)


def stack(module: str, count: int, out: int, inp: int, model: str, first: int = 0):
    import torch

    s = torch.empty(count, out, inp, dtype=torch.bfloat16)
    for k in range(count):
        s[k] = matrix(module, first + k, out, inp, model)
    return s


# ----------------------------------------------------------------------------------------------
# Measurements (each in its own process)
# ----------------------------------------------------------------------------------------------
def measure_moelens(shape: dict, args: argparse.Namespace) -> dict:
    from moelens.metrics.module import pair_and_single_metrics

    mods = layer_modules(shape["d"], shape["kv"], shape["f"], shape["experts"])
    wall = 0.0
    rows: dict[str, dict[str, list[float]]] = {}
    for name, (count, out, inp) in mods.items():
        a, b = stack(name, count, out, inp, "a"), stack(name, count, out, inp, "b")
        t0 = time.perf_counter()
        res = pair_and_single_metrics(a, b, device="cpu")
        wall += time.perf_counter() - t0
        keep = min(count, args.ref_experts)
        rows[name] = {m: res.pair[m][:keep].tolist() for m in PAIR}
        rows[name] |= {f"a.{m}": res.a[m][:keep].tolist() for m in SINGLE}
        rows[name] |= {f"b.{m}": res.b[m][:keep].tolist() for m in SINGLE}
        del a, b
    return {"wall_s": wall, "rows": rows}


def ref_alpha(lam, floor: float = 1e-5) -> float:
    """WeightWatcher's default fit by a loop over the candidate x_min (see moelens.metrics.power_law)."""
    import numpy as np

    x = np.sort(lam[lam > floor])
    n_all = len(x)
    if n_all < 2:
        return math.nan
    logx = np.log(x)
    best_d, best_a = math.inf, math.nan
    for i in range(n_all - 1):
        n = n_all - i
        s = float(np.sum(logx[i:]) - n * logx[i])
        if n_all < 20:
            if n < 8 or s <= 1e-12:
                continue
            alpha = 1.0 + (n - 1.0) / s
        else:
            alpha = 1.0 + n / s
        d = float(np.max(np.abs(1.0 - (x[i:] / x[i]) ** (1.0 - alpha) - np.arange(n) / n)))
        if d < best_d:
            best_d, best_a = d, alpha
    if math.isinf(best_d) and n_all < 20:
        s = float(np.sum(logx - logx[0]))
        best_a = 1.0 + (n_all - 1.0) / s if s > 1e-12 else math.nan
    return best_a


def ref_single(w) -> dict[str, float]:
    import numpy as np

    s = np.linalg.svd(w, compute_uv=False)
    fro = float(np.linalg.norm(w))
    kept = s[s > max(w.shape) * np.finfo(np.float32).eps * s[0]]
    p = kept / kept.sum()
    return {"fro_norm": fro, "spectral_norm": float(s[0]), "stable_rank": fro**2 / float(s[0]) ** 2,
            "effective_rank": float(np.exp(-np.sum(p * np.log(p)))),
            "alpha": ref_alpha(s * s) if min(w.shape) >= 8 else math.nan}


def ref_pair(a, b, tol: float = 1e-3) -> dict[str, float]:
    import numpy as np

    fa, fb = a.ravel(), b.ravel()
    na, nb = np.linalg.norm(fa), np.linalg.norm(fb)
    x = a.T - a.T.mean(axis=0)
    y = b.T - b.T.mean(axis=0)
    cka = np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
    return {"corr": float(np.corrcoef(fa, fb)[0, 1]), "cos": float(fa @ fb / (na * nb)),
            "rel_l2": float(np.linalg.norm(a / na - b / nb)), "cka": float(cka),
            "changed_frac": float(np.mean(np.abs(a - b) > tol * a.std()))}


def measure_reference(shape: dict, args: argparse.Namespace) -> dict:
    """The matrices are generated when needed (outside the clock): two matrices at a time."""
    mods = layer_modules(shape["d"], shape["kv"], shape["f"], shape["experts"])
    wall = {"load": 0.0, "pair": 0.0, "single": 0.0}
    rows: dict[str, dict[str, list[float]]] = {}
    scale_to: dict[str, float] = {}
    for name, (count, out, inp) in mods.items():
        keep = min(count, args.ref_experts)
        scale_to[name] = count / keep
        rows[name] = {}
        for k in range(keep):
            wa, wb = matrix(name, k, out, inp, "a"), matrix(name, k, out, inp, "b")
            t0 = time.perf_counter()
            a, b = wa.double().numpy(), wb.double().numpy()
            t1 = time.perf_counter()
            pm = ref_pair(a, b)
            t2 = time.perf_counter()
            sa, sb = ref_single(a), ref_single(b)
            t3 = time.perf_counter()
            wall["load"] += (t1 - t0) * scale_to[name]
            wall["pair"] += (t2 - t1) * scale_to[name]
            wall["single"] += (t3 - t2) * scale_to[name]
            for m in PAIR:
                rows[name].setdefault(m, []).append(pm[m])
            for m in SINGLE:
                rows[name].setdefault(f"a.{m}", []).append(sa[m])
                rows[name].setdefault(f"b.{m}", []).append(sb[m])
            del a, b
    measured = sum(count == min(count, args.ref_experts) for count, _, _ in mods.values()) == len(mods)
    return {"wall_s": sum(wall.values()), "load_s": wall["load"], "pair_s": wall["pair"], "single_s": wall["single"],
            "scaled": not measured, "rows": rows}


MEASURES = {"moelens": measure_moelens, "reference": measure_reference}


def child_main(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = (QUICK if args.quick else SHAPES)[args.shape]
    result = MEASURES[args.measure](shape, args)
    finish_measurement(result, args.json_out)


def run_child(measure: str, name: str, ref_experts: int, work: Path, args: argparse.Namespace) -> dict:
    extra = ["--shape", name, "--ref-experts", str(ref_experts), *(["--quick"] if args.quick else [])]
    return run_measurement(__file__, measure, work, args.threads, *extra)


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------
def line(label: str, r: dict, note: str = "") -> str:
    return measure_line(label, r, note, width=44)


def agreement(mine: dict, ref: dict) -> dict[str, float]:
    """metric -> largest difference over every module and matrix the reference computed."""
    worst: dict[str, float] = {}
    for module, cols in ref["rows"].items():
        for col, values in cols.items():
            metric = col.split(".", 1)[1] if col.startswith(("a.", "b.")) else col
            for x, y in zip(mine["rows"][module][col], values):
                if math.isnan(x) and math.isnan(y):
                    diff = 0.0
                elif math.isnan(x) or math.isnan(y):
                    diff = math.inf
                else:
                    diff = abs(x - y) / abs(y) if metric in RELATIVE and y != 0 else abs(x - y)
                worst[metric] = max(worst.get(metric, 0.0), diff)
    return worst


def bench_shape(name: str, args: argparse.Namespace, work: Path) -> dict:
    shape = (QUICK if args.quick else SHAPES)[name]
    mods = layer_modules(shape["d"], shape["kv"], shape["f"], shape["experts"])
    n_ref = min(shape["experts"] or 1, args.ref_experts or shape["ref_experts"])
    n_matrices = sum(c for c, _, _ in mods.values())
    print(f"\n== {shape['label']}: d={shape['d']}, kv={shape['kv']}, F={shape['f']}, experts={shape['experts'] or '-'}; "
          f"{n_matrices} matrices per model, bf16 ==", flush=True)
    mine = run_child("moelens", name, n_ref, work, args)
    print(line("moelens (5 pair + 2×5 single metrics)", mine), flush=True)
    ref = run_child("reference", name, n_ref, work, args)
    note = f"load {ref['load_s']:.1f} s, pair {ref['pair_s']:.1f} s, svd+single {ref['single_s']:.1f} s"
    if ref["scaled"]:
        print(line(f"reference, MEASURED on {n_ref}/{shape['experts']} experts, SCALED", ref,
                   note + " (times scaled linearly to every expert; RSS as measured)"), flush=True)
    else:
        print(line("reference (float64 numpy, np.linalg.svd)", ref, note), flush=True)
    agree = agreement(mine, ref)
    detail = ", ".join(f"{m} {v:.1e}" for m, v in agree.items())
    print(f"  agreement (max |Δ|; relative for norms, ranks, α): {detail}", flush=True)
    speed = ref["wall_s"] / mine["wall_s"]
    print(f"  => moelens is {speed:.1f}x faster than the reference{' (scaled)' if ref['scaled'] else ''};"
          f" peak RSS {mine['peak_rss_mib'] / ref['peak_rss_mib']:.2f}x the reference's", flush=True)
    return {"shape": shape, "ref_experts": n_ref, "moelens": mine, "reference": ref, "agreement": agree, "speedup": speed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama,mixtral", help="comma-separated: llama, mixtral")
    parser.add_argument("--ref-experts", type=int, default=None, help="experts per role the reference is measured on (default: 1 at full size, all 8 with --quick)")
    parser.add_argument("--quick", action="store_true", help="every dimension / 8 (see QUICK)")
    parser.add_argument("--threads", type=int, default=0, help="threads in each measurement, torch's and BLAS's (default: the libraries' choice)")
    parser.add_argument("--json", default=None, help="also write every number to this JSON file")
    # child-process options
    parser.add_argument("--measure", choices=sorted(MEASURES), help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        child_main(args)
        return
    import torch

    threads = f"{args.threads} thread{'s' if args.threads != 1 else ''} per measurement" if args.threads else f"{torch.get_num_threads()} threads (the libraries' choice)"
    print(f"moelens module-metrics benchmark: torch {torch.__version__}, {threads}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}{', QUICK shapes' if args.quick else ''}")
    summary: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="moelens-bench-") as tmp:
        for name in [s.strip() for s in args.shapes.split(",") if s.strip()]:
            if name not in SHAPES:
                raise SystemExit(f"unknown shape {name!r}; expected one of {', '.join(SHAPES)}")
            summary[name] = bench_shape(name, args, Path(tmp))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
