"""Router edits: moelens's batched runner against a plain loop, as ratios in one run.

The plain loop is how router edits are usually run (GaleMoE's project-out experiments): for every
cell, write the edited row into the router's weight, run the model on the prompts (one padded
batch), read the top-k sets at the layer from a hook, and restore the weight. moelens lays every
(prompt, cell) out as a row of large batches, each row carrying its own edited router row at the
interventions' router site, and starts each pass at the edited layer from the clean states. Both
compute the same cells (project_out and keep_aligned at each k, random × samples, zero) and the
largest differences of their measures are printed.

The model is the demo zoo's base (``.demo/zoo``, 12 layers, d = 96, 8 experts, top-2) when it
exists, else the small zoo built into a temporary directory.

    python benchmarks/router_edits.py --threads 1                   # the README's figures
    python benchmarks/router_edits.py --prompts 64 --layers 0 6 11
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from moelens.analyses.router_edits.analysis import edit_rows, top_directions  # noqa: E402
from moelens.metrics.jsd import js_divergence  # noqa: E402
from moelens.runtime.architecture import describe, router_weight  # noqa: E402
from moelens.runtime.batching import right_padded  # noqa: E402
from moelens.runtime.router_edits import Cell, RouterEditRunner, kl_bits  # noqa: E402


def zoo_paths(zoo_dir: str | None = None) -> tuple[Path, Path]:
    demo = Path(zoo_dir) if zoo_dir else ROOT / ".demo" / "zoo"
    if (demo / "base").is_dir():
        return demo / "base", demo / "facts.jsonl"
    from moelens import zoo

    z = zoo.build(out=Path(tempfile.mkdtemp()) / "zoo", seed=0, small=True)
    return Path(z.base), Path(z.facts)


def plain_loop(model, arch, prompts, layer, cells, top_k, clean_probs, clean_topk):
    """Per cell: edit the weight, run the prompts, read the top-k at ``layer``, restore."""
    ids, mask = right_padded(prompts, 0, torch.device("cpu"))
    last = mask.sum(1) - 1
    real = mask.bool()
    experts = arch.layers[layer].mlp.experts
    seen = {}
    h = experts.register_forward_pre_hook(lambda m, a, k: seen.__setitem__("i", a[1] if len(a) > 1 else k["top_k_index"]), with_kwargs=True)
    weight = router_weight(arch.layers[layer].router)
    out = []
    try:
        for c in cells:
            saved = weight[c.expert].clone()
            with torch.no_grad():
                weight[c.expert] = c.row.to(weight.dtype)
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            weight.data[c.expert] = saved
            q = torch.softmax(logits[torch.arange(len(prompts)), last].float(), -1)
            sel = seen["i"].view(len(prompts), -1, top_k)
            after = int(((sel == c.expert).any(-1) & real).sum())
            changed = int(((sel.sort(-1).values != clean_topk.sort(-1).values).any(-1) & real).sum())
            out.append((after, changed, float(js_divergence(clean_probs, q).sum()), float(kl_bits(clean_probs, q).sum())))
    finally:
        h.remove()
    return np.array(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 6, 11])
    ap.add_argument("--k", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--zoo", default=None, help="A zoo directory (base/, facts.jsonl); default .demo/zoo, else the small zoo.")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moelens.checkpoint import open_model
    from moelens.textfiles import read_jsonl

    base, facts = zoo_paths(args.zoo)
    tok = AutoTokenizer.from_pretrained(base)
    texts = [obj["prompt"] for _, obj in read_jsonl(facts, "prompts")][:args.prompts]
    prompts = [tuple(tok(t)["input_ids"]) for t in texts]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    arch = describe(model)
    top_k = model.config.num_experts_per_tok
    moe = open_model(base)
    print(f"{base}: {len(prompts)} prompts, layers {args.layers}, k {args.k}, {args.samples} random samples, {args.threads} thread(s)")
    total_ours = total_plain = 0.0
    for L in args.layers:
        router = router_weight(arch.layers[L].router)
        dirs = {e: top_directions(w, "gate", max(args.k)) for e, w in moe.layer(L).iter_experts("gate")}
        specs = edit_rows(router, dirs, list(dirs), ("project_out", "keep_aligned", "random", "zero"), args.k, args.samples, 0, L, [])
        cells = [Cell(L, s.expert, s.row) for s in specs]
        runner = RouterEditRunner(model, arch, [L], top_k)
        with runner.installed(prompts[0]):
            clean = runner.clean(prompts)
            t0 = time.perf_counter()
            totals = runner.run(prompts, cells, clean)
            ours = time.perf_counter() - t0
        width = clean.width
        t0 = time.perf_counter()
        ref = plain_loop(model, arch, prompts, L, cells, top_k, clean.probs, clean.topk[L][:, :width])
        plain = time.perf_counter() - t0
        total_ours += ours
        total_plain += plain
        diff = max(abs(totals.routed_after - ref[:, 0]).max(), abs(totals.changed - ref[:, 1]).max())
        dj = abs(totals.jsd - ref[:, 2]).max() / len(prompts)
        print(f"layer {L:2d}: {len(cells)} cells × {len(prompts)} prompts: moelens {ours:6.2f} s, plain loop {plain:6.2f} s, "
              f"ratio {plain / ours:5.1f}×; largest count difference {diff}, JSD difference {dj:.1e} bits")
    print(f"all layers: moelens {total_ours:.2f} s, plain loop {total_plain:.2f} s, ratio {total_plain / total_ours:.1f}×")


if __name__ == "__main__":
    main()
