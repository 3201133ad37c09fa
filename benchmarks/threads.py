"""Thread count: moelens's automatic choice against one thread and against every core.

``moelens distance`` base→tuned (the whole analysis through the runner, no run directory) on
random weights of two shapes, each measurement in its own process with no ``OMP_NUM_THREADS``
(so that the choice is :mod:`moelens.threads`'s own):

- ``zoo``: the default zoo's shape (d = 96, F = 128, 8 experts, 4 layers): the automatic choice
  is one thread, and must cost no more than 1.5× the one-thread time even on a busy machine;
- ``large``: d = 1024, F = 2048, 2 experts, 1 layer: large enough for every core.

Modes: ``auto`` (the choice), ``one`` (``set_threads(1)``) and ``all`` (``set_threads(cores)``,
which is what torch's own default amounts to). Prints seconds, the count each mode used, the
ratios to ``one`` and the load average (other processes share the machine).

    python benchmarks/threads.py                 # both shapes, three repeats (minutes on 2 cores)
    python benchmarks/threads.py --shapes zoo --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "zoo": {"d": 96, "f": 128, "experts": 8, "layers": 4},
    "large": {"d": 1024, "f": 2048, "experts": 2, "layers": 1},
}
MODES = ("auto", "one", "all")


def write_pair(root: Path, d: int, f: int, experts: int, layers: int) -> tuple[Path, Path]:
    """A base checkpoint and a tuned one (base + 1 % noise), Mixtral layout."""
    sys.path.insert(0, str(ROOT))
    import torch

    from tests.analyses.synthetic import write_checkpoint

    g = torch.Generator().manual_seed(0)
    weights = {(L, e, r): 0.02 * torch.randn((d, f) if r == "down" else (f, d), generator=g)
               for L in range(layers) for e in range(experts) for r in ("gate", "up", "down")}
    routers = {L: torch.randn(experts, d, generator=g) for L in range(layers)}
    base = write_checkpoint(root / "base", "mixtral", layers, experts, d, f, router=routers.__getitem__,
                            expert=lambda L, e, r: weights[L, e, r])
    tuned = write_checkpoint(root / "tuned", "mixtral", layers, experts, d, f, router=routers.__getitem__,
                             expert=lambda L, e, r: weights[L, e, r] * (1 + 0.01 * torch.randn(weights[L, e, r].shape, generator=g)))
    return base, tuned


def measure(mode: str, base: str, tuned: str) -> dict:
    """One child: open both, run the analysis once, report seconds and the count it used."""
    from moelens.analyses.expert_distance import expert_distance
    from moelens.checkpoint import open_model
    from moelens.threads import available_cpus, set_threads

    set_threads({"auto": None, "one": 1, "all": available_cpus()}[mode])
    a, b = open_model(base), open_model(tuned)
    t0 = time.perf_counter()
    run = expert_distance(a, b)
    return {"seconds": time.perf_counter() - t0, "threads": run.manifest["threads"]}


def child(mode: str, base: Path, tuned: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT / "src")
    out = subprocess.run([sys.executable, __file__, "--measure", mode, str(base), str(tuned)],
                         check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="zoo,large")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per mode (the best is kept)")
    parser.add_argument("--measure", nargs=3, metavar=("MODE", "BASE", "TUNED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    sys.path.insert(0, str(ROOT / "src"))
    from moelens.threads import available_cpus

    print(f"cores this process may use: {available_cpus()} (os.cpu_count() = {os.cpu_count()})")
    print(f"{'shape':<6} {'mode':<5} {'threads':>7} {'best s':>8} {'× one':>6}  load")
    for shape in args.shapes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            base, tuned = write_pair(Path(tmp), **SHAPES[shape])
            best = {}
            for _ in range(args.repeats):
                for mode in MODES:  # interleaved, so that a change of load touches every mode alike
                    r = child(mode, base, tuned)
                    if mode not in best or r["seconds"] < best[mode]["seconds"]:
                        best[mode] = r
            for mode in MODES:
                r = best[mode]
                ratio = r["seconds"] / best["one"]["seconds"]
                print(f"{shape:<6} {mode:<5} {r['threads']:>7} {r['seconds']:>8.3f} {ratio:>6.2f}  {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
