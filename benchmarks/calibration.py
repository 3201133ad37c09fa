"""The calibration pass's per-layer work at a real layer shape, against a per-expert loop.

One Qwen3-30B-A3B-shaped MoE layer (E = 128 experts, top-8, F = 768, d = 2048; bf16 random
weights of scale 0.02 and a router of scale 0.02) and N block inputs x_t ~ N(0, 1) (what a
normalised hidden state looks like). Given the block inputs, both sides compute what a
calibration unit records for the layer (docs/methods.md §3):

- router logits [N, E], top-8 choices (ties to the lower index) and usage counts;
- every expert's mean output over ALL N tokens (HC-SMoE's feature), float32 products.

``moelens``: :class:`moelens.calibration.ExpertFeatures`: the tokens meet all E gate and up
matrices at once, one [n, d] × [d, E·F] product per chunk, and the down projection is applied
once per expert to the mean activation ((1/N) Σ_t W_down h(x_t) = W_down (1/N) Σ_t h(x_t)).
``reference``: the straightforward loop a script would write: for each expert, its full SwiGLU
output on every token (gate, up, down products of [N, d] by [d, F]), then the mean. Both sides
share the routing code. Agreement: the largest difference of the features relative to the
largest feature value, and equal top-k.

The forward pass up to the layer, which a calibration unit also runs, is the model's own and is
not measured here: calibrating every layer of an n-layer model costs about (n + 1)/2 forward
passes, because each layer's pass stops at its router (``--zoo DIR`` measures that on a zoo
model: the whole calibration pass against one plain forward pass over the same tokens).

Every measurement runs in its own process (weights and inputs are made before the clock starts)
and reports its peak RSS and the load average, since other processes share the machine.

    python benchmarks/calibration.py --quick --threads 2     # F and d / 4, N = 1024: a minute
    python benchmarks/calibration.py --threads 2             # the whole layer, N = 256
    python benchmarks/calibration.py --device cuda --tokens 65536
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import finish_measurement, run_measurement  # noqa: E402
from measure import line as measure_line  # noqa: E402

SHAPE = {"experts": 128, "top_k": 8, "f": 768, "d": 2048, "tokens": 256, "label": "Qwen3-30B-A3B layer"}
QUICK = {"experts": 128, "top_k": 8, "f": 192, "d": 512, "tokens": 1024, "label": "Qwen3-30B-A3B-shaped layer, F and d / 4"}
SCALE = 0.02


def inputs(shape: dict, device: str):
    """gate, up [E, F, d], down [E, d, F] (bf16), router [E, d] and x [N, d] (float32), made on
    ``device`` from fixed seeds: the same numbers in every process."""
    import torch

    e, f, d, n = shape["experts"], shape["f"], shape["d"], shape["tokens"]
    g = torch.Generator(device).manual_seed(0)

    def normal(*dims: int, scale: float = 1.0, dtype=torch.float32):
        return (torch.randn(*dims, generator=g, device=device) * scale).to(dtype)

    gate, up = normal(e, f, d, scale=SCALE, dtype=torch.bfloat16), normal(e, f, d, scale=SCALE, dtype=torch.bfloat16)
    down = normal(e, d, f, scale=SCALE, dtype=torch.bfloat16)
    return gate, up, down, normal(e, d, scale=SCALE), normal(n, d)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def routing(x, router, top_k: int):
    """Logits [N, E], top-k [N, k] (ties to the lower index) and usage counts [E], as a unit records them."""
    from moelens.calibration.capture import topk_of_logits
    from moelens.calibration.layer import usage_counts

    logits = x @ router.T
    topk = topk_of_logits(logits, top_k)
    return logits.cpu().numpy(), topk.cpu().numpy(), usage_counts(topk.cpu().numpy(), router.shape[0])


def measure_moelens(shape: dict, args: argparse.Namespace) -> dict:
    import torch

    from moelens.calibration.activation import ExpertActivation
    from moelens.calibration.features import ExpertFeatures

    gate, up, down, router, x = inputs(shape, args.device)
    silu = ExpertActivation("silu glu", torch.nn.functional.silu)
    warm = ExpertFeatures(gate[:2], up[:2], down[:2], silu, device=args.device)  # kernels and allocator warm
    warm.add(x[:8])
    warm.result()
    _sync(args.device)
    t0 = time.perf_counter()
    logits, topk, counts = routing(x, router, shape["top_k"])
    features = ExpertFeatures(gate, up, down, silu, device=args.device)
    features.add(x)
    result = features.result()
    _sync(args.device)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "tokens_per_s": shape["tokens"] / wall, "chunk_tokens": features.chunk_tokens,
            "features": result.tolist(), "topk": topk[:64].tolist(), "counts": counts.tolist()}


def measure_reference(shape: dict, args: argparse.Namespace) -> dict:
    import torch

    gate, up, down, router, x = inputs(shape, args.device)
    _sync(args.device)
    t0 = time.perf_counter()
    logits, topk, counts = routing(x, router, shape["top_k"])
    features = []
    for e in range(shape["experts"]):  # every expert on every token, one expert at a time
        h = torch.nn.functional.silu(x @ gate[e].float().T) * (x @ up[e].float().T)   # [N, F]
        out = h @ down[e].float().T                                                    # [N, d]
        features.append(out.double().mean(0))
    result = torch.stack(features).cpu().numpy()
    _sync(args.device)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "tokens_per_s": shape["tokens"] / wall, "features": result.tolist(), "topk": topk[:64].tolist(),
            "counts": counts.tolist()}


def measure_zoo(shape: dict, args: argparse.Namespace) -> dict:
    """The whole calibration pass of a zoo model against one plain forward pass over its tokens."""
    import torch

    from moelens.analyses.calibration import calibrate
    from moelens.analyses.calibration.analysis import plan_calibration
    from moelens.calibration.capture import right_padded
    from moelens.calibration.layer import batches
    from moelens.checkpoint import open_model

    model = open_model(Path(args.zoo) / "base")
    texts = Path(args.zoo) / "calibration.txt"
    planned = plan_calibration(model, str(texts), 65536, None, 4096, args.device, "auto")
    lm, _ = planned.setup.loaded()
    seqs = planned.setup.tokens.sequences
    calibrate(model, [list(seqs[0])], device=args.device)  # kernels, allocator and imports warm on both sides
    with torch.no_grad():
        lm(input_ids=torch.tensor([list(seqs[0])], device=planned.setup.device), use_cache=False)
    _sync(args.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for rows in batches(seqs, 4096):
            ids, mask = right_padded([seqs[i] for i in rows], planned.setup.pad_id, planned.setup.device)
            lm(input_ids=ids, attention_mask=mask, use_cache=False)
    _sync(args.device)
    forward = time.perf_counter() - t0
    t1 = time.perf_counter()
    run = calibrate(model, str(texts), device=args.device)
    wall = time.perf_counter() - t1
    n = int(run.manifest["options"]["tokens"])
    return {"wall_s": wall, "forward_s": forward, "tokens": n, "layers": len(run.layers), "tokens_per_s": n / wall}


MEASURES = {"moelens": measure_moelens, "reference": measure_reference, "zoo": measure_zoo}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="F = 192, d = 512 (a quarter of each), N = 1024")
    parser.add_argument("--tokens", type=int, default=None, help="calibration tokens N (default 256; quick 1024)")
    parser.add_argument("--threads", type=int, default=0, help="threads in each measurement, torch's and BLAS's")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where both sides compute")
    parser.add_argument("--zoo", default=None, help="a zoo directory (moelens zoo build): also time its whole calibration pass")
    parser.add_argument("--json", default=None, help="also write every number to this JSON file")
    parser.add_argument("--measure", choices=sorted(MEASURES), help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = dict(QUICK if args.quick else SHAPE)
    if args.tokens:
        shape["tokens"] = args.tokens
    if args.measure:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        finish_measurement(MEASURES[args.measure](shape, args), args.json_out)
        return
    import numpy as np
    import torch

    print(f"moelens calibration benchmark: torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, both sides on {args.device}")
    print(f"== {shape['label']}: E={shape['experts']}, top-{shape['top_k']}, F={shape['f']}, d={shape['d']}, bf16 weights, "
          f"float32 products, N={shape['tokens']} tokens ==", flush=True)
    with tempfile.TemporaryDirectory(prefix="moelens-bench-") as tmp:
        extra = ["--device", args.device, "--tokens", str(shape["tokens"]), *(["--quick"] if args.quick else [])]
        mine = run_measurement(__file__, "moelens", Path(tmp), args.threads, *extra)
        print(measure_line("moelens (batched over experts)", mine, f"{mine['tokens_per_s']:,.0f} tokens/s, chunks of {mine['chunk_tokens']} tokens"), flush=True)
        ref = run_measurement(__file__, "reference", Path(tmp), args.threads, *extra)
        print(measure_line("reference (per-expert loop)", ref, f"{ref['tokens_per_s']:,.0f} tokens/s"), flush=True)
        zoo = run_measurement(__file__, "zoo", Path(tmp), args.threads, *extra, "--zoo", args.zoo) if args.zoo else None
    a, b = np.asarray(mine["features"]), np.asarray(ref["features"])
    agreement = {"features_max_rel": float(np.abs(a - b).max() / np.abs(b).max()), "topk_equal": mine["topk"] == ref["topk"],
                 "counts_equal": mine["counts"] == ref["counts"]}
    ratio = ref["wall_s"] / mine["wall_s"]
    print(f"  agreement: features within {agreement['features_max_rel']:.1e} of the largest value, top-k equal {agreement['topk_equal']}, "
          f"usage equal {agreement['counts_equal']}")
    print(f"  => moelens calibrates {ratio:.2f}x the tokens per second of the per-expert loop "
          f"({mine['tokens_per_s']:,.0f} vs {ref['tokens_per_s']:,.0f} tokens/s for this layer's records)", flush=True)
    if zoo is not None:
        print(f"== the zoo's whole calibration pass ({zoo['layers']} layers, {zoo['tokens']} tokens) ==")
        print(f"  calibration {zoo['wall_s']:.2f} s ({zoo['tokens_per_s']:,.0f} tokens/s), one plain forward pass {zoo['forward_s']:.2f} s: "
              f"{zoo['wall_s'] / zoo['forward_s']:.1f} forward passes' time (early-stopped passes cost about (n + 1)/2 = {(zoo['layers'] + 1) / 2:g})")
    if args.json:
        Path(args.json).write_text(json.dumps({"moelens": {k: v for k, v in mine.items() if k != "features"},
                                               "reference": {k: v for k, v in ref.items() if k != "features"},
                                               "zoo": zoo, "agreement": agreement, "ratio": ratio}, indent=2))
    if agreement["features_max_rel"] > 1e-4 or not agreement["topk_equal"] or not agreement["counts_equal"]:
        raise SystemExit("moelens and the reference disagree")


if __name__ == "__main__":
    main()
