"""The weight-space analyses of one full-shape Mixtral layer on a GPU, against the CPU and the read.

One Mixtral-8x7B layer (d = 4096, F = 14336, E = 8; random bf16 weights with the real tensor
names, one safetensors shard per expert) is written to a temporary directory. Then, in this
process:

- ``read``: the bytes each analysis reads, read as moelens reads them (router and every expert's
  gate for alignment; every expert's gate, up and down for distance), from the page cache (the
  files were just written) and, with ``--drop-caches`` where the kernel lets root drop its
  page cache, from disk;
- ``alignment``: ``router_alignment(matrix="gate")`` (the default derangement null) on ``--device``
  (one warm-up run first: CUDA's context and solver handles) and on the CPU;
- ``distance``: ``expert_distance(pairing="within")`` (28 pairs of experts) on ``--device`` for
  gate, up and down; on the CPU for gate only, scaled by 3 (the three roles are the same work:
  matrices of one shape up to a transpose). The output says so.

Printed: seconds on each device, the speed-up over the CPU, and each time as a multiple of the
time to read the bytes it reads (1.0 would be as fast as reading); the tables of the two devices
are compared (largest |Δ|). ``--json-out`` writes every number.

    python benchmarks/gpu_weight_space.py --device cuda --drop-caches   # an H100/H200 box: ~2-3 minutes
    python benchmarks/gpu_weight_space.py --device cpu --small     # d, F ÷ 16: a check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

FULL = {"d": 4096, "f": 14336, "experts": 8, "label": "Mixtral-8x7B layer"}
SMALL = {"d": 256, "f": 896, "experts": 8, "label": "Mixtral-8x7B-shaped layer, d and F ÷ 16"}
ROLES = ("gate", "up", "down")
SCALE = 0.02


def write_layer(out: Path, shape: dict, seed: int = 0) -> Path:
    import torch

    from tests.analyses.synthetic import write_checkpoint

    d, f, n = shape["d"], shape["f"], shape["experts"]
    gen = torch.Generator().manual_seed(seed)

    def router(_L: int) -> torch.Tensor:
        return torch.randn(n, d, generator=gen) * SCALE

    def expert(_L: int, _e: int, role: str) -> torch.Tensor:
        return torch.randn(*((d, f) if role == "down" else (f, d)), generator=gen) * SCALE

    return write_checkpoint(out, "mixtral", 1, n, d, f, router, expert, dtype=torch.bfloat16)


def drop_page_cache() -> bool:
    """Ask the kernel to drop clean cached pages (root only; not every machine allows it)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def read_bytes(ckpt: Path, roles: tuple[str, ...]) -> tuple[float, int]:
    """Seconds to read the router and every expert's ``roles`` as the analyses do, and the bytes."""
    import moelens as ml

    layer = ml.open_model(ckpt).layer(0)
    t0 = time.perf_counter()
    nbytes = layer.router().weight.numel() * 2
    for role in roles:
        for _, w in layer.iter_experts(role):
            nbytes += w.numel() * w.element_size()
    return time.perf_counter() - t0, nbytes


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t0, out


def alignment(ckpt: Path, device: str):
    import moelens as ml

    return ml.router_alignment(ckpt, matrix="gate", device=device, cache=False)


def distance(ckpt: Path, device: str, roles: tuple[str, ...]):
    import moelens as ml

    return ml.expert_distance(ckpt, pairing="within", matrices=roles, device=device)


def max_diff(a, b, columns: tuple[str, ...]) -> float:
    import numpy as np

    worst = 0.0
    for c in columns:
        x, y = a[c].to_numpy(np.float64), b[c].to_numpy(np.float64)
        finite = np.isfinite(x) & np.isfinite(y)
        if finite.any():
            worst = max(worst, float(np.abs(x[finite] - y[finite]).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="the device measured against the CPU: cuda, cuda:N (or cpu, to check the script)")
    parser.add_argument("--small", action="store_true", help="d and F ÷ 16 (seconds; checks the script anywhere)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: every core)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs on the device after the warm-up (the best is kept)")
    parser.add_argument("--drop-caches", action="store_true", help="also time the read from disk, after dropping the kernel's page cache (root; slows every process on the machine for a while)")
    parser.add_argument("--json-out", help="write every number here")
    args = parser.parse_args()

    import torch

    import moelens as ml  # noqa: F401  (imported before the clock starts)

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SMALL if args.small else FULL
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --small to check the script")
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "none"
    result: dict = {
        "shape": shape, "device": device, "gpu": gpu, "torch": torch.__version__, "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
    }
    print(f"{shape['label']}: d={shape['d']}, F={shape['f']}, E={shape['experts']}, bf16; device {device} ({gpu}); "
          f"CPU {torch.get_num_threads()} threads of {os.cpu_count()} cores; torch {torch.__version__}", flush=True)

    with tempfile.TemporaryDirectory(prefix="moelens-gpu-") as tmp:
        t0 = time.perf_counter()
        ckpt = write_layer(Path(tmp) / "layer", shape)
        result["write_s"] = time.perf_counter() - t0
        print(f"  wrote the layer in {result['write_s']:.1f} s", flush=True)

        reads = {}
        for name, roles in (("alignment", ("gate",)), ("distance", ROLES)):
            warm_s, nbytes = read_bytes(ckpt, roles)
            cold_s = read_bytes(ckpt, roles)[0] if args.drop_caches and drop_page_cache() else None
            reads[name] = {"bytes": nbytes, "page_cache_s": warm_s, "disk_s": cold_s}
            cold = f", from disk {cold_s:.2f} s ({nbytes / cold_s / 2**30:.1f} GiB/s)" if cold_s else ", from disk: not measured (--drop-caches)"
            print(f"  read for {name}: {nbytes / 2**30:.2f} GiB from the page cache in {warm_s:.2f} s ({nbytes / warm_s / 2**30:.1f} GiB/s){cold}", flush=True)
        read_bytes(ckpt, ROLES)  # everything back in the page cache, as for the runs below
        result["read"] = reads

        # the device: a warm-up run of each analysis, then the best of --repeats
        runs: dict = {}
        for name, fn in (("alignment", lambda: alignment(ckpt, device)), ("distance", lambda: distance(ckpt, device, ROLES))):
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            first, run = timed(fn, device)
            times = [timed(fn, device)[0] for _ in range(max(0, args.repeats))]
            best = min(times) if times else first
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
            runs[name] = {"first_s": first, "times_s": times, "best_s": best, "peak_gpu_gib": peak, "run": run}
            print(f"  {name} on {device}: first {first:.2f} s, then {', '.join(f'{t:.2f}' for t in times)} s"
                  + (f"; peak GPU memory {peak:.1f} GiB" if peak is not None else ""), flush=True)

        # the CPU: alignment whole; distance for gate only, scaled by 3
        cpu_align_s, cpu_align = timed(lambda: alignment(ckpt, "cpu"), "cpu")
        print(f"  alignment on cpu: {cpu_align_s:.2f} s", flush=True)
        cpu_gate_s, cpu_gate = timed(lambda: distance(ckpt, "cpu", ("gate",)), "cpu")
        cpu_dist_s = 3 * cpu_gate_s
        print(f"  distance on cpu: gate only {cpu_gate_s:.2f} s -> {cpu_dist_s:.2f} s for gate, up and down (scaled by 3)", flush=True)

    align_diff = max_diff(runs["alignment"]["run"]["alignment"], cpu_align["alignment"], ("align", "z_vs_shuffle"))
    gpu_gate = runs["distance"]["run"]["expert_distance"]
    gpu_gate = gpu_gate[gpu_gate["matrix"] == "gate"].reset_index(drop=True)
    cpu_rows = cpu_gate["expert_distance"]
    cpu_rows = cpu_rows[cpu_rows["matrix"] == "gate"].reset_index(drop=True)
    dist_diff = max_diff(gpu_gate, cpu_rows, ("rel_l2", "sv_align"))
    cpu = {"alignment": cpu_align_s, "distance": cpu_dist_s}
    diffs = {"alignment": align_diff, "distance": dist_diff}
    print(f"\n  {'analysis':<10} {device:>9} {'cpu':>9} {'speed-up':>9} {'÷ read (page cache)':>20} {'÷ read (disk)':>14} {'max |Δ| vs cpu':>15}")
    summary = {}
    for name in ("alignment", "distance"):
        fast = runs[name]["best_s"]
        r = reads[name]
        disk = f"{fast / r['disk_s']:13.1f}×" if r["disk_s"] else f"{'—':>14}"
        print(f"  {name:<10} {fast:8.2f}s {cpu[name]:8.2f}s {cpu[name] / fast:8.1f}× {fast / r['page_cache_s']:19.1f}× {disk} {diffs[name]:15.1e}")
        summary[name] = {"device_s": fast, "device_first_s": runs[name]["first_s"], "cpu_s": cpu[name], "speedup": cpu[name] / fast,
                         "times_read_page_cache": fast / r["page_cache_s"], "times_read_disk": fast / r["disk_s"] if r["disk_s"] else None,
                         "max_abs_diff_vs_cpu": diffs[name], "peak_gpu_gib": runs[name]["peak_gpu_gib"]}
    print("  (cpu distance: gate measured, × 3 for the three roles; alignment: gate, as on the device; "
          "'÷ read' = the analysis's time over the time to read the bytes it reads)")
    result["summary"] = summary
    result["cpu_distance_gate_s"] = cpu_gate_s
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
