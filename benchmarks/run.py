"""Router–expert alignment at real shapes: moelens against the slow reference, and the read floor.

For each shape a one-layer checkpoint with random bf16 weights and the real tensor names is
written to a temporary directory (one safetensors shard per expert, as on the Hub):

- ``mixtral``: Mixtral-8x7B, d = 4096, F = 14336, E = 8;
- ``qwen3``: Qwen3-30B-A3B, d = 2048, F = 768, E = 128.

Every measurement runs in its own Python process, which reports its wall time and peak resident
memory (``ru_maxrss``):

- ``read``: read the router and every expert's gate matrix as moelens does (the floor: no
  analysis can be faster than reading its input);
- ``moelens``: ``router_alignment(layers=[0], matrix="gate")`` with the default exact null, no
  spectrum cache;
- ``moelens-cold`` / ``moelens-warm``: ``null="shuffle-sampled"`` (GaleMoE's procedure), first
  filling an empty spectrum cache, then reading it back;
- ``reference``: the GaleMoE procedure — load the layer's tensors, a full float32
  ``torch.linalg.svd`` per expert, then Python loops of matrix–vector products for 200 shuffles
  × every k. At Mixtral size it is measured on ``--ref-experts`` experts and scaled linearly to E
  (its work is linear in E: one SVD and 200·K matrix–vector products per expert); the output
  says so.

The files are written just before being read, so every measurement reads from the page cache;
the machine's load average is printed with each measurement because other processes share it.

    python benchmarks/run.py                      # both shapes (about 20 minutes on 2 cores)
    python benchmarks/run.py --shapes qwen3 --quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "mixtral": {"family": "mixtral", "d": 4096, "f": 14336, "experts": 8, "ref_experts": 2, "label": "Mixtral-8x7B layer"},
    "qwen3": {"family": "qwen3_moe", "d": 2048, "f": 768, "experts": 128, "ref_experts": 128, "label": "Qwen3-30B-A3B layer"},
}
SHUFFLES = 200


# ----------------------------------------------------------------------------------------------
# Checkpoint
# ----------------------------------------------------------------------------------------------
def write_layer(out: Path, shape: dict, seed: int = 0) -> Path:
    import torch

    sys.path.insert(0, str(ROOT))
    from tests.analyses.synthetic import write_checkpoint

    d, f, n = shape["d"], shape["f"], shape["experts"]
    gen = torch.Generator().manual_seed(seed)
    scale = 0.02

    def router(_L: int) -> torch.Tensor:
        return torch.randn(n, d, generator=gen) * scale

    def expert(_L: int, _e: int, role: str) -> torch.Tensor:
        dims = (d, f) if role == "down" else (f, d)
        return torch.randn(*dims, generator=gen) * scale

    return write_checkpoint(out, shape["family"], 1, n, d, f, router, expert, dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Measurements (each in its own process)
# ----------------------------------------------------------------------------------------------
def measure_read(ckpt: Path, _args: argparse.Namespace) -> dict:
    import moelens as ml

    layer = ml.open_model(ckpt).layer(0)
    t0 = time.perf_counter()
    layer.router()
    nbytes = 0
    for _, w in layer.iter_experts("gate"):
        nbytes += w.numel() * w.element_size()
    return {"wall_s": time.perf_counter() - t0, "bytes": nbytes}


def measure_moelens(ckpt: Path, args: argparse.Namespace) -> dict:
    import moelens as ml

    model = ml.open_model(ckpt)
    cache = args.cache_dir is not None
    t0 = time.perf_counter()
    run = ml.router_alignment(
        model, layers=[0], matrix="gate", null=args.null, shuffles=SHUFFLES, seed=0, device="cpu",
        cache=cache, cache_dir=args.cache_dir,
    )
    wall = time.perf_counter() - t0
    if args.table_out:
        run["alignment"].to_parquet(args.table_out)
    return {"wall_s": wall, "cache": run.manifest["spectra_cache"]}


def measure_reference(ckpt: Path, args: argparse.Namespace) -> dict:
    """GaleMoE's procedure on the first ``args.ref_experts`` experts of layer 0."""
    import pandas as pd
    import torch
    from safetensors import safe_open

    sys.path.insert(0, str(ROOT))
    from tests.analyses import slow_reference as ref

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    config = json.loads((ckpt / "config.json").read_text())
    router_name = next(n for n in index if n.endswith(("block_sparse_moe.gate.weight", "mlp.gate.weight")))
    gate_suffix = ".w1.weight" if config["model_type"] == "mixtral" else ".gate_proj.weight"
    n_ref = args.ref_experts
    d = config["hidden_size"]
    ks = [1 << i for i in range(d.bit_length()) if 1 << i <= d]

    t0 = time.perf_counter()
    with safe_open(str(ckpt / index[router_name]), framework="pt") as fh:
        router = fh.get_tensor(router_name)[:n_ref]
    weights = []
    for e in range(n_ref):
        name = next(n for n in index if f".experts.{e}." in n and n.endswith(gate_suffix))
        with safe_open(str(ckpt / index[name]), framework="pt") as fh:
            weights.append(fh.get_tensor(name))
    t_load = time.perf_counter() - t0

    t0 = time.perf_counter()
    routers = ref.normalized_routers(router)
    bases = [ref.input_singular_vectors(w, "gate") for w in weights]
    t_svd = time.perf_counter() - t0

    t0 = time.perf_counter()
    gen = torch.Generator()
    gen.manual_seed(0)
    stats = ref.galemoe_shuffle_stats(routers, bases, ks, SHUFFLES, gen)
    rows = []
    for e in range(n_ref):
        for k in ks:
            a = ref.energy(routers[e], bases[e], k)
            mu, sd = stats[k]
            rows.append({"expert": e, "k": k, "align": a, "shuffle_mean": mu, "shuffle_std": sd})
    t_loop = time.perf_counter() - t0
    if args.table_out:
        pd.DataFrame(rows).to_parquet(args.table_out)
    return {"wall_s": t_load + t_svd + t_loop, "load_s": t_load, "svd_s": t_svd, "loop_s": t_loop, "experts": n_ref,
            "matvecs": SHUFFLES * len(ks) * n_ref + len(ks) * n_ref}


MEASURES = {"read": measure_read, "moelens": measure_moelens, "reference": measure_reference}


def child_main(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = MEASURES[args.measure](Path(args.ckpt), args)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.json_out).write_text(json.dumps(result))


def run_child(measure: str, ckpt: Path, work: Path, args: argparse.Namespace, **extra: object) -> dict:
    json_out = work / f"{measure}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, __file__, "--measure", measure, "--ckpt", str(ckpt), "--json-out", str(json_out)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    for key, value in extra.items():
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    load = os.getloadavg()[0]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    if args.threads:
        # SciPy's BLAS/LAPACK (the CPU Gram and tridiagonal path) has its own thread pool, which
        # torch.set_num_threads does not bound; it reads this at load time.
        env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = str(args.threads)
    subprocess.run(cmd, check=True, env=env)
    result = json.loads(json_out.read_text())
    result["load_before"] = load
    result["load_after"] = os.getloadavg()[0]
    return result


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------
def line(label: str, r: dict, note: str = "") -> str:
    return (f"  {label:<34} {r['wall_s']:9.2f} s   peak RSS {r['peak_rss_mib']:8.0f} MiB"
            f"   load {r['load_before']:.1f}->{r['load_after']:.1f}{'   ' + note if note else ''}")


def bench_shape(name: str, args: argparse.Namespace, work: Path) -> dict:
    import pandas as pd

    shape = dict(SHAPES[name])
    n = shape["experts"]
    n_ref = min(n, args.ref_experts or (shape["ref_experts"] if not args.quick else max(1, shape["ref_experts"] // 4)))
    print(f"\n== {shape['label']}: d={shape['d']}, F={shape['f']}, E={n}, bf16 ==", flush=True)
    t0 = time.perf_counter()
    ckpt = write_layer(work / name, shape)
    size = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    print(f"  wrote {size / 2**30:.2f} GiB (router, gate, up, down) in {time.perf_counter() - t0:.1f} s", flush=True)

    res: dict[str, dict] = {}
    res["read"] = run_child("read", ckpt, work, args)
    print(line("read router + gate (floor)", res["read"], f"{res['read']['bytes'] / 2**30:.2f} GiB"), flush=True)
    mine_table = work / f"{name}-moelens.parquet"
    res["moelens"] = run_child("moelens", ckpt, work, args, null="derangement", table_out=mine_table)
    print(line("moelens (exact null, no cache)", res["moelens"]), flush=True)
    sampled_table = work / f"{name}-sampled.parquet"
    if not args.quick:
        cache_dir = work / f"{name}-cache"
        res["moelens-cold"] = run_child("moelens", ckpt, work, args, null="shuffle-sampled", cache_dir=cache_dir)
        print(line("moelens (sampled null, cache cold)", res["moelens-cold"]), flush=True)
        res["moelens-warm"] = run_child("moelens", ckpt, work, args, null="shuffle-sampled", cache_dir=cache_dir, table_out=sampled_table)
        print(line("moelens (sampled null, cache warm)", res["moelens-warm"]), flush=True)
        shutil.rmtree(cache_dir, ignore_errors=True)
    ref_table = work / f"{name}-reference.parquet"
    res["reference"] = run_child("reference", ckpt, work, args, ref_experts=n_ref, table_out=ref_table)
    r = res["reference"]
    scale = n / n_ref
    scaled = {**r, "wall_s": r["wall_s"] * scale}
    note = (f"svd {r['svd_s']:.1f} s, loops {r['loop_s']:.1f} s ({r['matvecs']} mat-vec), load {r['load_s']:.1f} s")
    if n_ref < n:
        print(line(f"reference, MEASURED on {n_ref}/{n} experts", r, note), flush=True)
        print(line(f"reference, SCALED x{scale:g} to {n} experts", scaled, "(time scaled linearly; RSS as measured)"), flush=True)
    else:
        print(line("reference (GaleMoE procedure)", r, note), flush=True)

    mine = pd.read_parquet(mine_table)
    theirs = pd.read_parquet(ref_table).set_index(["expert", "k"])
    both = mine.set_index(["expert", "k"]).merge(theirs, left_index=True, right_index=True, suffixes=("", "_ref"))
    diff = float((both["align"] - both["align_ref"]).abs().max())
    print(f"  agreement: max |align(moelens eigh) - align(reference svd)| = {diff:.2e} over {len(both)} (expert, k)", flush=True)
    if sampled_table.exists() and n_ref == n:
        s = pd.read_parquet(sampled_table).set_index(["expert", "k"]).merge(theirs, left_index=True, right_index=True, suffixes=("", "_ref"))
        dm = float((s["shuffle_mean"] - s["shuffle_mean_ref"]).abs().max())
        ds = float((s["shuffle_std"] - s["shuffle_std_ref"]).abs().max())
        print(f"  shuffle-sampled vs reference (same seed, same permutations): max |Δmean| = {dm:.2e}, max |Δstd| = {ds:.2e}", flush=True)

    speed = scaled["wall_s"] / res["moelens"]["wall_s"]
    floor = res["moelens"]["wall_s"] / res["read"]["wall_s"]
    print(f"  => moelens is {speed:.1f}x faster than the reference{' (scaled)' if n_ref < n else ''};"
          f" {floor:.1f}x the read floor; peak RSS {res['moelens']['peak_rss_mib'] / r['peak_rss_mib']:.2f}x the reference's"
          f"{' (measured on fewer experts)' if n_ref < n else ''}", flush=True)
    if "moelens-warm" in res:
        print(f"     warm spectrum cache: {res['moelens-cold']['wall_s'] / res['moelens-warm']['wall_s']:.1f}x faster than cold", flush=True)
    shutil.rmtree(ckpt, ignore_errors=True)
    return {"shape": shape, "ref_experts": n_ref, "results": res, "speedup": speed, "over_floor": floor, "max_align_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="qwen3,mixtral", help="comma-separated: qwen3, mixtral")
    parser.add_argument("--ref-experts", type=int, default=None, help="experts the reference is measured on (default: all for qwen3, 2 for mixtral)")
    parser.add_argument("--quick", action="store_true", help="skip the cache runs; reference on a quarter of its default experts")
    parser.add_argument("--threads", type=int, default=0, help="threads in each measurement, torch's and BLAS's (default: the libraries' choice)")
    parser.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="also write every number to this JSON file")
    # child-process options
    parser.add_argument("--measure", choices=sorted(MEASURES), help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    parser.add_argument("--null", default="derangement", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--table-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        child_main(args)
        return
    import torch

    # the measurements run in child processes with --threads; the parent's own pool says nothing
    threads = f"{args.threads} thread{'s' if args.threads != 1 else ''} per measurement" if args.threads else f"{torch.get_num_threads()} threads (the libraries' choice)"
    print(f"moelens router-alignment benchmark: torch {torch.__version__}, {threads}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    base = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="moelens-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    summary = {}
    try:
        for name in [s.strip() for s in args.shapes.split(",") if s.strip()]:
            if name not in SHAPES:
                raise SystemExit(f"unknown shape {name!r}; expected one of {', '.join(SHAPES)}")
            summary[name] = bench_shape(name, args, base)
    finally:
        if not args.workdir:
            shutil.rmtree(base, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
