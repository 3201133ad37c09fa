"""Scale-out of the weight-space analyses: the local executor against Ray with 2 workers.

A 4-layer Mixtral-shaped checkpoint (random bf16 weights, the real tensor names, one safetensors
shard per expert as on the Hub) is written to a temporary directory; then, each in its own
Python process (its peak resident memory is its own):

- ``local``: router alignment (gate, the default null) and expert distance (within pairs, gate,
  up and down) of every layer, in this process, one thread;
- ``ray``: the same on a local Ray cluster started in that process (``--workers`` workers of
  ``--threads`` threads each: the same thread count per process as the local run): cluster
  start, worker start (one empty task per worker), then each analysis. Each worker reports its
  own peak RSS through the run's manifest.

The tables of the two executors are compared (largest |Δ|, SPEC §7 asks ≤ 1e-6). From the
measured time per layer, the full model (Mixtral-8x7B: 32 MoE layers) is projected for the local
run and for Ray with the same workers and with one worker per layer. The machine's load average
is printed with each measurement because other processes share it.

    python benchmarks/scale.py --quick        # d and F ÷ 8, a couple of minutes on 2 cores
    python benchmarks/scale.py                # the real d = 4096, F = 14336 (11 GB on disk; long)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import finish_measurement, run_measurement  # noqa: E402
from measure import line as measure_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FULL = {"d": 4096, "f": 14336, "experts": 8, "layers": 4, "label": "Mixtral-8x7B-shaped, 4 layers"}
QUICK = {"d": 512, "f": 1792, "experts": 8, "layers": 4, "label": "Mixtral-8x7B-shaped with d, F ÷ 8, 4 layers"}
FULL_MODEL_LAYERS = 32  # Mixtral-8x7B
ANALYSES = ("align", "distance")
SCALE = 0.02


def write_model(out: Path, shape: dict, seed: int = 0) -> Path:
    import torch

    sys.path.insert(0, str(ROOT))
    from tests.analyses.synthetic import write_checkpoint

    d, f, n = shape["d"], shape["f"], shape["experts"]
    gen = torch.Generator().manual_seed(seed)

    def router(_L: int) -> torch.Tensor:
        return torch.randn(n, d, generator=gen) * SCALE

    def expert(_L: int, _e: int, role: str) -> torch.Tensor:
        return torch.randn(*((d, f) if role == "down" else (f, d)), generator=gen) * SCALE

    return write_checkpoint(out, "mixtral", shape["layers"], n, d, f, router, expert, dtype=torch.bfloat16)


def _analysis(name: str, ckpt: str, executor, progress=None):
    import moelens as ml

    if name == "align":
        return ml.router_alignment(ckpt, matrix="gate", device="cpu", cache=False, executor=executor, progress=progress)
    return ml.expert_distance(ckpt, pairing="within", device="cpu", executor=executor, progress=progress)


# ----------------------------------------------------------------------------------------------
# Measurements (each in its own process)
# ----------------------------------------------------------------------------------------------
def measure_local(args: argparse.Namespace) -> dict:
    out: dict = {"analyses": {}}
    t_all = time.perf_counter()
    for name in args.analyses.split(","):
        t0 = time.perf_counter()
        run = _analysis(name, args.ckpt, None)
        wall = time.perf_counter() - t0
        for table, frame in run.tables.items():
            frame.to_parquet(Path(args.work) / f"local-{name}-{table}.parquet")
        out["analyses"][name] = {"wall_s": wall, "per_unit_s": run.manifest["timings"]["per_unit_s"]}
    out["wall_s"] = time.perf_counter() - t_all
    return out


def measure_ray(args: argparse.Namespace) -> dict:
    import logging

    import ray

    from moelens.analyses.executors.ray_executor import RayExecutor, thread_environment

    t_all = time.perf_counter()
    t0 = time.perf_counter()
    ray.init(num_cpus=args.workers * args.threads, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    cluster_s = time.perf_counter() - t0

    @ray.remote
    def noop() -> int:
        import moelens  # noqa: F401  (what a real task imports first)

        return 0

    t0 = time.perf_counter()
    # workers with the thread environment the analyses' tasks use, so those find them started
    ray.get([noop.options(num_cpus=args.threads, runtime_env={"env_vars": thread_environment(args.threads)}).remote() for _ in range(args.workers)])
    workers_s = time.perf_counter() - t0
    out: dict = {"cluster_start_s": cluster_s, "worker_start_s": workers_s, "analyses": {}}
    executor = RayExecutor(workers=args.workers, threads_per_worker=args.threads)
    for name in args.analyses.split(","):
        t0 = time.perf_counter()
        run = _analysis(name, args.ckpt, executor)
        wall = time.perf_counter() - t0
        for table, frame in run.tables.items():
            frame.to_parquet(Path(args.work) / f"ray-{name}-{table}.parquet")
        info = run.manifest["executor"]
        out["analyses"][name] = {"wall_s": wall, "per_unit_s": run.manifest["timings"]["per_unit_s"], "worker_peak_rss_mib": info["peak_rss_mib"]}
    ray.shutdown()
    out["wall_s"] = time.perf_counter() - t_all
    return out


MEASURES = {"local": measure_local, "ray": measure_ray}


def child_main(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    finish_measurement(MEASURES[args.measure](args), args.json_out)


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------
def max_difference(work: Path, name: str) -> float:
    import numpy as np
    import pandas as pd

    worst = 0.0
    for local_file in sorted(work.glob(f"local-{name}-*.parquet")):
        a = pd.read_parquet(local_file)
        b = pd.read_parquet(work / local_file.name.replace("local-", "ray-", 1))
        assert list(a.columns) == list(b.columns) and len(a) == len(b), local_file.name
        for column in a.columns:
            if pd.api.types.is_float_dtype(a[column]):
                x, y = a[column].to_numpy(np.float64), b[column].to_numpy(np.float64)
                same_nan = np.isnan(x) == np.isnan(y)
                assert same_nan.all(), f"{local_file.name}:{column} NaN in one table only"
                finite = ~np.isnan(x)
                if finite.any():
                    worst = max(worst, float(np.abs(x[finite] - y[finite]).max()))
            else:
                assert (a[column].to_numpy() == b[column].to_numpy()).all(), f"{local_file.name}:{column}"
    return worst


def human(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="d and F ÷ 8 (a couple of minutes on 2 cores)")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="threads per process, local and each Ray worker (default 1)")
    parser.add_argument("--analyses", default=",".join(ANALYSES), help="align,distance")
    parser.add_argument("--shapes", default=None, help=argparse.SUPPRESS)  # make bench passes it to every script
    parser.add_argument("--measure", choices=sorted(MEASURES), help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        child_main(args)
        return
    shape = QUICK if args.quick else FULL
    nbytes = shape["layers"] * shape["experts"] * 3 * shape["d"] * shape["f"] * 2
    print(f"{shape['label']}: d={shape['d']}, F={shape['f']}, E={shape['experts']}, bf16 on disk ({nbytes / 2**30:.2f} GiB); "
          f"{args.workers} Ray workers × {args.threads} thread(s), local run {args.threads} thread(s)", flush=True)
    with tempfile.TemporaryDirectory(prefix="moelens-scale-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        ckpt = write_model(work / "model", shape)
        print(f"  wrote the checkpoint in {time.perf_counter() - t0:.1f} s", flush=True)
        common = ("--ckpt", str(ckpt), "--work", str(work), "--analyses", args.analyses, "--workers", str(args.workers))
        local = run_measurement(__file__, "local", work, args.threads, *common)
        print(measure_line("local (one process)", local), flush=True)
        remote = run_measurement(__file__, "ray", work, args.threads, *common)
        print(measure_line(f"ray ({args.workers} workers; driver's RSS)", remote,
                           f"cluster start {remote['cluster_start_s']:.1f} s, workers start {remote['worker_start_s']:.1f} s"), flush=True)
        layers = shape["layers"]
        print(f"\n  {'analysis':<10} {'local':>9} {'ray':>9} {'speed-up':>9} {'worker peak RSS':>17} {'max |Δ|':>9}")
        for name in args.analyses.split(","):
            lo, ra = local["analyses"][name], remote["analyses"][name]
            rss = max(ra["worker_peak_rss_mib"].values())
            diff = max_difference(work, name)
            print(f"  {name:<10} {lo['wall_s']:8.2f}s {ra['wall_s']:8.2f}s {lo['wall_s'] / ra['wall_s']:8.2f}× {rss:13.0f} MiB {diff:9.1e}")
            assert diff <= 1e-6, f"{name}: Ray and local differ by {diff:.2e} > 1e-6"
        start = remote["cluster_start_s"] + remote["worker_start_s"]
        print(f"\n  projection for the full model ({FULL_MODEL_LAYERS} MoE layers at this shape), from the time per layer above:")
        for name in args.analyses.split(","):
            per_layer = local["analyses"][name]["wall_s"] / layers
            ray_rate = remote["analyses"][name]["wall_s"] / layers  # seconds of the Ray run per layer with all workers busy
            one_worker_layer = max(remote["analyses"][name]["per_unit_s"].values())
            print(f"    {name:<9} local {human(FULL_MODEL_LAYERS * per_layer)}; ray with {args.workers} workers "
                  f"{human(start + FULL_MODEL_LAYERS * ray_rate)} (start {start:.0f} s included); "
                  f"with {FULL_MODEL_LAYERS} workers (one layer each, on enough nodes) ≈ {human(start + one_worker_layer)}")


if __name__ == "__main__":
    main()
