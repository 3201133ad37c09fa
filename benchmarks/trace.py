"""Interventions: cells per second of moelens's batched tracer against a plain loop.

The plain loop is how ROME's causal tracing and TransformerLens's activation patching run: one
forward pass of one prompt per cell, with one forward hook that writes the knocked-out value
(mean ablation) into the site. moelens lays many cells out as rows of one batch and writes every
row's edit with masked tensor operations in hooks registered once. Both compute the same cells
(knockout of subj, attn, last, moe at every layer) and the largest JSD difference is printed.

Models are random Mixtral-layout checkpoints built in memory (weights N(0, 0.02), a word-level
tokenizer over synthetic words; speed does not depend on the values):

- ``small``: d = 256, 4 layers, 8 experts of F = 512, top-2, vocabulary 8,000;
- ``medium`` (default on CPU): d = 1024, 8 layers, 16 heads (4 KV), 8 experts of F = 1,408,
  top-2, vocabulary 32,000 (about 0.35 B parameters);
- ``mixtral8``: Mixtral-8x7B's layer shape (d = 4096, 32 heads, 8 KV, 8 experts of F = 14,336,
  vocabulary 32,000) with 8 layers, bf16 (about 11.7 B parameters: for a GPU).

    python benchmarks/trace.py --quick --threads 2              # small shape, a minute
    python benchmarks/trace.py --shape medium --prompts 16      # the CPU figures of the README
    python benchmarks/trace.py --shape mixtral8 --device cuda   # the GPU figures

``--restore`` times causal tracing instead (restore_hidden, restore_mlp, restore_attn at every layer
and token, window 10) at S = 10, 100 and 1,000 noise samples against ROME's loop
(``trace_with_patch`` of kmeng01/rome's ``experiments/causal_trace.py``): per prompt one corrupted
forward pass, then one forward pass of S + 1 rows per (token, layer, site) cell, row 0 clean and
rows 1..S with the noise, a hook copying row 0's state at the token into rows 1..S (the layer's
output, or the MLP / attention output in every layer of the window), all logits computed, p_restored
the mean over rows 1..S. The noise is the same draw for both (seed + prompt_id, s = 3σ of the
embedding matrix). moelens's previous path (every cell running the whole prompt, batched) is timed
too, and the largest |Δ indirect effect| against the loop is printed. The loop runs the cells of
``--loop-prompts`` prompts at ``--loop-layers`` layers (every token and site): rates are per cell.

    python benchmarks/trace.py --restore --quick --threads 1    # small shape, a couple of minutes
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moelens.metrics.jsd import js_divergence  # noqa: E402
from moelens.runtime.architecture import describe, first_tensor, replace_first  # noqa: E402
from moelens.runtime.prompts import PromptRecord, tokenise  # noqa: E402
from moelens.runtime.trace import (  # noqa: E402
    DEFAULT_WINDOW,
    RESTORE_SITES,
    SITE_POINT,
    Tracer,
    TraceSettings,
    noise_std,
    window,
)

SHAPES = {
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, intermediate_size=512, vocab=8000),
    "medium": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, intermediate_size=1408, vocab=32000),
    "mixtral8": dict(hidden_size=4096, num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, vocab=32000),
}
SITES = ("subj", "attn", "last", "moe")


def build(shape: str, device: torch.device, dtype: torch.dtype, layers: int | None = None):
    from transformers import MixtralConfig, MixtralForCausalLM

    from moelens.zoo.tokenizer import build_tokenizer

    s = dict(SHAPES[shape])
    if layers:
        s["num_hidden_layers"] = layers
    vocab = s.pop("vocab")
    words = [f"w{i}" for i in range(vocab - 4)]
    tok = build_tokenizer(words, max_length=256)
    config = MixtralConfig(vocab_size=len(tok), num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
                           tie_word_embeddings=False, pad_token_id=tok.pad_token_id, **s)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no float32 copy of a large model
    try:
        with torch.device(device):
            model = MixtralForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval(), tok, words


def prompts(tok, words, n: int) -> list:
    out = []
    for i in range(n):
        subject = f"{words[(7 * i) % 500]} {words[(7 * i + 3) % 500]}"
        text = f"{words[1000 + i % 50]} of {subject} {words[2000 + i % 20]} {words[2100 + i % 30]}"
        out.append(tokenise(tok, PromptRecord(i, text, subject)))
    return out


def loop(model, arch, ps, means, layers, device) -> tuple[list[float], float]:
    """One forward pass per cell, with one hook writing the site's mean (ROME / TransformerLens style)."""
    jsd = []
    t0 = time.perf_counter()
    for p in ps:
        ids = torch.tensor([p.input_ids], device=device)
        with torch.no_grad():
            clean = torch.softmax(model(input_ids=ids, use_cache=False).logits[0, -1].float(), -1)
        for L in layers:
            for site in SITES:
                module = {"layer": arch.layers[L].layer, "attn": arch.layers[L].attention, "mlp": arch.layers[L].mlp}[SITE_POINT[site]]
                positions = list(p.subject_positions) if site == "subj" else [p.last]
                value = means[(L, site)]

                def hook(mod, args, output, positions=positions, value=value):
                    t = first_tensor(output).clone()
                    t[0, positions] = value.to(t.dtype)
                    return replace_first(output, t)

                h = module.register_forward_hook(hook)
                try:
                    with torch.no_grad():
                        out = torch.softmax(model(input_ids=ids, use_cache=False).logits[0, -1].float(), -1)
                finally:
                    h.remove()
                jsd.append(float(js_divergence(clean, out)))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return jsd, time.perf_counter() - t0


def rome_loop(model, arch, ps, layers, sites, samples: int, sigma: float, seed: int, device) -> tuple[dict, float]:
    """ROME's causal tracing, one forward pass of S + 1 rows per cell (see the module docstring):
    {(prompt_id, layer, site, position): indirect effect}, and the seconds it took."""
    width = DEFAULT_WINDOW["restore"]
    out = {}
    t0 = time.perf_counter()
    embed = arch.embedding
    for p in ps:
        ids = torch.tensor([p.input_ids] * (samples + 1), device=device)
        g = torch.Generator().manual_seed(seed + p.prompt_id)
        noise = (torch.randn(samples, len(p.subject_positions), embed.weight.shape[1], generator=g) * sigma).to(device)
        subject = list(p.subject_positions)

        def add_noise(mod, args, output, noise=noise, subject=subject):
            t = output.clone()
            t[1:, subject] += noise.to(t.dtype)
            return t

        def run(patches, ids=ids, add_noise=add_noise) -> torch.Tensor:
            handles = [embed.register_forward_hook(add_noise)]
            handles += [module.register_forward_hook(hook) for module, hook in patches]
            try:
                with torch.no_grad():
                    logits = model(input_ids=ids, use_cache=False).logits  # every position, as ROME
            finally:
                for h in handles:
                    h.remove()
            return torch.softmax(logits[1:, -1].float(), -1).mean(0)

        base = run([])
        with torch.no_grad():
            target = int(model(input_ids=ids[:1], use_cache=False).logits[0, -1].argmax())
        low = float(base[target])
        for site in sites:
            point = SITE_POINT[site]
            for L in layers:
                lo, hi = (L, L) if site == "restore_hidden" else window(L, width, arch.n_layers)
                span = range(lo, hi + 1)
                modules = [{"layer": arch.layers[k].layer, "attn": arch.layers[k].attention, "mlp": arch.layers[k].mlp}[point] for k in span]
                for t in range(p.length):
                    def patch(mod, args, output, t=t):
                        h = first_tensor(output).clone()
                        h[1:, t] = h[0, t]
                        return replace_first(output, h)

                    out[(p.prompt_id, L, site, t)] = float(run([(m, patch) for m in modules if m is not None])[target]) - low
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def restore_main(a, model, tok, words, arch, device, dtype) -> None:
    """moelens's restore against ROME's loop and against moelens's previous path, at each S: moelens
    runs every cell of its prompts; the loop and the previous path run the cells of the first
    ``--loop-prompts`` prompts at ``--loop-layers`` (every token; every site, or restore_hidden
    alone at S ≥ 1000 with ``--quick``), and rates are compared per cell."""
    n = a.prompts or (1 if a.quick else (16 if device.type == "cuda" else 4))
    ps = prompts(tok, words, n)
    layers = tuple(range(arch.n_layers))
    loop_layers = tuple(a.loop_layers or (arch.n_layers // 2,))
    loop_n = a.loop_prompts or 1
    sigma = noise_std(arch.embedding, "embedding")
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    print(f"  restore: {n} prompts of {ps[0].length} tokens (subject at {list(ps[0].subject_positions)}), "
          f"sites {', '.join(RESTORE_SITES)}, window {DEFAULT_WINDOW['restore']}, every layer and token; "
          f"loop and previous path: {loop_n} prompt(s), layers {list(loop_layers)}")

    def timed_run(settings, shortcuts, subset):
        tracer = Tracer(model, arch, settings, pad_id=tok.pad_token_id, shortcuts=shortcuts)
        tracer.run(subset[:1])  # warm-up (kernels, allocator)
        sync()
        t0 = time.perf_counter()
        table = tracer.run(subset).columns()
        sync()
        keys = zip(table["prompt_id"], table["layer"], table["site"], table["position"])
        return dict(zip(keys, table["indirect_effect"])), time.perf_counter() - t0

    for samples in a.samples:
        sites = ("restore_hidden",) if (a.quick and samples >= 1000) else RESTORE_SITES
        common = dict(mode="restore", window=DEFAULT_WINDOW["restore"], noise_samples=samples, seed=0)
        ours, ours_s = timed_run(TraceSettings(sites=RESTORE_SITES, layers=layers, **common), True, ps)
        prev, prev_s = timed_run(TraceSettings(sites=sites, layers=loop_layers, **common), False, ps[:loop_n])
        ref, loop_s = rome_loop(model, arch, ps[:loop_n], loop_layers, sites, samples, sigma, 0, device)
        diff = max(abs(ours[k] - v) for k, v in ref.items())
        diff_prev = max(abs(prev[k] - v) for k, v in ref.items())
        rate, rate_prev, rate_loop = len(ours) / ours_s, len(prev) / prev_s, len(ref) / loop_s
        print(f"  S = {samples:5d}: moelens {rate:9.2f} cells/s ({len(ours)} cells, {ours_s:.1f} s)   "
              f"previous path {rate_prev:9.2f} cells/s ({len(prev)} cells, {prev_s:.1f} s)   "
              f"ROME loop {rate_loop:9.2f} cells/s ({len(ref)} cells{'' if sites == RESTORE_SITES else ', restore_hidden'}, {loop_s:.1f} s)")
        print(f"             speed-up {rate / rate_loop:.1f}x over the loop, {rate / rate_prev:.1f}x over the previous path;  "
              f"largest |Δ indirect effect| against the loop {diff:.2e} (moelens), {diff_prev:.2e} (previous path)"
              f"{'  (bf16)' if dtype == torch.bfloat16 else ''}")
        if not (math.isfinite(diff) and math.isfinite(diff_prev)):
            raise SystemExit("non-finite indirect effect")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=None, help="prompts (default 16; 64 on CUDA)")
    ap.add_argument("--loop-prompts", type=int, default=None, help="prompts the plain loop runs (its rate is per cell)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--depth", type=int, default=None, help="decoder layers (default: the shape's)")
    ap.add_argument("--quick", action="store_true", help="the small shape and 8 prompts (restore: 1, the loop at S = 1000 on restore_hidden)")
    ap.add_argument("--restore", action="store_true", help="causal tracing against ROME's loop instead of knockout")
    ap.add_argument("--samples", type=int, nargs="+", default=[10, 100, 1000], help="restore: noise samples S")
    ap.add_argument("--loop-layers", type=int, nargs="+", default=None, help="restore: the layers ROME's loop runs (default: the middle one)")
    a, ignored = ap.parse_known_args()  # make bench passes one BENCH_ARGS to every benchmark
    if ignored:
        print(f"(ignoring options for other benchmarks: {' '.join(ignored)})")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    shape = a.shape or ("small" if a.quick else ("mixtral8" if device.type == "cuda" else "medium"))
    n = a.prompts or (8 if a.quick else (64 if device.type == "cuda" else 16))
    dtype = torch.bfloat16 if (device.type == "cuda") else torch.float32
    t0 = time.perf_counter()
    model, tok, words = build(shape, device, dtype, a.depth)
    arch = describe(model)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"interventions: {shape} Mixtral layout ({params:.2f} B parameters, {dtype}), {arch.n_layers} layers, device {device}, "
          f"{torch.get_num_threads()} threads; built in {time.perf_counter() - t0:.1f} s")
    if a.restore:
        restore_main(a, model, tok, words, arch, device, dtype)
        return
    ps = prompts(tok, words, n)
    layers = tuple(range(arch.n_layers))
    settings = TraceSettings(mode="knockout", sites=SITES, ablation="mean", layers=layers)
    tracer = Tracer(model, arch, settings, pad_id=tok.pad_token_id)
    means = tracer.means(ps)
    tracer.run(ps[:2], means)  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = tracer.run(ps, means)
    if device.type == "cuda":
        torch.cuda.synchronize()
    batched_s = time.perf_counter() - t0
    cells = len(result.jsd)
    loop_n = a.loop_prompts or max(1, min(n, 4 if device.type == "cpu" else 8))
    ref, loop_s = loop(model, arch, ps[:loop_n], means, layers, device)
    ours = result.jsd[:len(ref)]
    diff = max(abs(x - y) for x, y in zip(ours, ref))
    rate_b, rate_l = cells / batched_s, len(ref) / loop_s
    print(f"  prompts {n}, cells {cells} ({arch.n_layers} layers × {len(SITES)} sites × {n} prompts), "
          f"rows per forward pass {tracer.rows_per_batch(max(p.length for p in ps))}")
    print(f"  moelens batched   {batched_s:9.2f} s   {rate_b:10.1f} cells/s")
    print(f"  plain loop        {loop_s:9.2f} s   {rate_l:10.1f} cells/s   ({len(ref)} cells of {loop_n} prompts)")
    print(f"  speed-up {rate_b / rate_l:.1f}x   largest |ΔJSD| {diff:.2e} bits{'  (bf16)' if dtype == torch.bfloat16 else ''}")
    if not math.isfinite(diff):
        raise SystemExit("non-finite JSD")


if __name__ == "__main__":
    main()
