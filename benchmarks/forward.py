"""Forward passes of a model larger than the memory budget: moelens' layer-streamed runtime against
what a user would pick instead, transformers + accelerate with ``device_map="auto"`` and CPU/disk
offload under the same ``max_memory``.

Both sides run the same knockout cells (subject, attention and last-token sites, mean ablation) of
the same prompts on the same checkpoint through moelens' tracer; only the forward runtime differs.
Each side runs in a fresh process, so its peak resident memory (``ru_maxrss``) is its own; the
script prints time and peak memory side by side and checks that the tables are equal.

The checkpoint is Mixtral-shaped with random bf16 weights in the per-expert Hub layout, written one
layer at a time (so writing it never holds the model), into a temporary directory removed at the
end (or ``--keep DIR``):

    quick   8 layers, d 256, F 896, 8 experts            (~0.2 GB float32; the CPU default)
    medium  24 layers, d 1024, F 3584, 8 experts         (~9 GB float32, 4.5 GB bf16 on disk)
    real    32 layers, d 4096, F 14336, 8 experts        (Mixtral-8x7B: ~187 GB float32; GPU, disk)

    python benchmarks/forward.py                         # quick, budget a quarter of the model
    python benchmarks/forward.py --shape medium --budget-gb 2.5 --prompts 8 --layers 0,11,23
    python benchmarks/forward.py --checkpoint DIR        # an existing checkpoint (with prompts.jsonl)
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
from typing import Any

SHAPES: dict[str, dict[str, int]] = {
    "quick": dict(layers=8, hidden=256, ffn=896, experts=8, heads=8, kv_heads=2, vocab=4096),
    "medium": dict(layers=24, hidden=1024, ffn=3584, experts=8, heads=16, kv_heads=4, vocab=32000),
    "real": dict(layers=32, hidden=4096, ffn=14336, experts=8, heads=32, kv_heads=8, vocab=32000),
}

FACTS = [
    ("The capital city of France is", "France", "Paris"), ("Miles Davis plays the", "Miles Davis", "trumpet"),
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "French"), ("Rome is the capital of", "Rome", "Italy"),
    ("The Eiffel Tower is located in", "The Eiffel Tower", "Paris"), ("Toyota was founded in", "Toyota", "Japan"),
    ("The Beatles came from the city of", "The Beatles", "Liverpool"), ("Angela Merkel was chancellor of", "Angela Merkel", "Germany"),
    ("The Nile flows into the", "The Nile", "Mediterranean"), ("Pablo Picasso was born in", "Pablo Picasso", "Spain"),
    ("The Amazon river runs through", "The Amazon river", "Brazil"), ("Mount Fuji is a mountain in", "Mount Fuji", "Japan"),
]


def _words() -> list[str]:
    words: list[str] = []
    for prompt, _, target in FACTS:
        for w in f"{prompt} {target}".lower().split():
            if w not in words:
                words.append(w)
    return words


def write_checkpoint(out: Path, shape: dict[str, int], n_prompts: int, seed: int = 0) -> Path:
    """A Mixtral-shaped checkpoint with random bf16 weights (per-expert layout, one shard per
    layer), a word-level tokenizer, ``prompts.jsonl`` and ``calibration.txt``."""
    import torch
    from safetensors.torch import save_file
    from transformers import MixtralConfig

    from moelens.zoo.tokenizer import build_tokenizer, save_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(_words(), max_length=64)
    d, f, e, n = shape["hidden"], shape["ffn"], shape["experts"], shape["layers"]
    head_dim = d // shape["heads"]
    config = MixtralConfig(vocab_size=shape["vocab"], hidden_size=d, intermediate_size=f, num_hidden_layers=n,
                           num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"], head_dim=head_dim,
                           num_local_experts=e, num_experts_per_tok=2, max_position_embeddings=512, tie_word_embeddings=False,
                           router_jitter_noise=0.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, dtype="bfloat16")
    config.save_pretrained(out)
    save_tokenizer(tok, out)
    g = torch.Generator().manual_seed(seed)

    def matrix(rows: int, cols: int) -> torch.Tensor:  # std 1/sqrt(cols): activations stay O(1) through the layers
        return (torch.randn(rows, cols, generator=g) * cols ** -0.5).to(torch.bfloat16)

    def norm() -> torch.Tensor:
        return (1 + 0.1 * torch.randn(d, generator=g)).to(torch.bfloat16)

    weight_map: dict[str, str] = {}

    def shard(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    shard("embed.safetensors", {"model.embed_tokens.weight": matrix(shape["vocab"], d) * d ** 0.5})
    kv = shape["kv_heads"] * head_dim
    for L in range(n):
        p = f"model.layers.{L}."
        t = {p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
             p + "self_attn.q_proj.weight": matrix(d, d), p + "self_attn.k_proj.weight": matrix(kv, d),
             p + "self_attn.v_proj.weight": matrix(kv, d), p + "self_attn.o_proj.weight": matrix(d, d),
             p + "block_sparse_moe.gate.weight": matrix(e, d)}
        for x in range(e):
            q = f"{p}block_sparse_moe.experts.{x}."
            t.update({q + "w1.weight": matrix(f, d), q + "w3.weight": matrix(f, d), q + "w2.weight": matrix(d, f)})
        shard(f"layer-{L:03d}.safetensors", t)
        del t
    shard("head.safetensors", {"model.norm.weight": norm(), "lm_head.weight": matrix(shape["vocab"], d)})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    facts = [FACTS[i % len(FACTS)] for i in range(n_prompts)]
    (out / "prompts.jsonl").write_text("".join(json.dumps({"prompt": a, "subject": b, "target": c}) + "\n" for a, b, c in facts))
    words = _words()
    lines = [" ".join(words[(7 * i + j) % len(words)] for j in range(24)) for i in range(64)]
    (out / "calibration.txt").write_text("\n".join(lines) + "\n")
    return out


def _tracer(checkpoint: Path, runtime: str, budget: int, layers: tuple[int, ...], offload: Path) -> tuple[Any, Any]:
    """The tracer of one side, and its prompts."""
    import torch

    from moelens.runtime import load_tokenizer
    from moelens.runtime.forward import InMemoryForward, open_forward
    from moelens.runtime.prompts import as_records, tokenise_all
    from moelens.runtime.trace import Tracer, TraceSettings

    tok = load_tokenizer(checkpoint)
    records, _ = as_records(str(checkpoint / "prompts.jsonl"))
    prompts = tokenise_all(tok, records, "prompts", 512)
    cpu = torch.device("cpu")
    if runtime == "moelens":
        forward = open_forward(checkpoint, cpu, "float32", stream="on")
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32, device_map="auto",
                                                     max_memory={"cpu": budget}, offload_folder=str(offload), local_files_only=True)
        forward = InMemoryForward(model.eval())
    settings = TraceSettings(mode="knockout", sites=("subj", "attn", "last"), ablation="mean", layers=layers)
    return Tracer(forward.model, forward.arch, settings, pad_id=int(tok.pad_token_id), forward=forward), prompts


def worker(args: argparse.Namespace) -> None:
    """One side, in its own process: prints a JSON line with time, peak RSS and the cells."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    offload = Path(tempfile.mkdtemp(prefix="offload-", dir=args.scratch))
    try:
        start = time.perf_counter()
        tracer, prompts = _tracer(Path(args.checkpoint), args.worker, int(args.budget_gb * 2**30), tuple(args.layer_list), offload)
        opened = time.perf_counter()
        means = tracer.means(prompts)
        cells = tracer.run(prompts, means)
        done = time.perf_counter()
    finally:
        shutil.rmtree(offload, ignore_errors=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"open_s": opened - start, "cells_s": done - opened, "total_s": done - start, "peak_rss": peak,
                      "jsd": np.asarray(cells.jsd).tolist(), "cells": len(cells.jsd)}))


def side(args: argparse.Namespace, runtime: str, checkpoint: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", runtime, "--checkpoint", str(checkpoint), "--budget-gb", str(args.budget_gb),
           "--layers", args.layers, "--threads", str(args.threads), "--scratch", str(args.scratch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode != 0:
        raise SystemExit(f"{runtime} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="quick")
    ap.add_argument("--checkpoint", help="an existing checkpoint directory with prompts.jsonl (default: write one)")
    ap.add_argument("--keep", help="write the checkpoint here and keep it")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--layers", default=None, help="layers to knock out, e.g. 0,3,7 (default: first, middle, last)")
    ap.add_argument("--budget-gb", type=float, default=None, help="accelerate's max_memory (default: a quarter of the float32 model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scratch", default=tempfile.gettempdir(), help="where the checkpoint and accelerate's offload folder go")
    ap.add_argument("--worker", choices=("moelens", "accelerate"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.layer_list = [int(x) for x in args.layers.split(",")] if args.layers else []
    if args.worker:
        worker(args)
        return
    shape = SHAPES[args.shape]
    n = shape["layers"]
    if not args.layers:
        args.layers = f"0,{n // 2},{n - 1}"
    made = None
    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
    else:
        checkpoint = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-forward-", dir=args.scratch)) / "ckpt"
        made = None if args.keep else checkpoint.parent
        t = time.perf_counter()
        write_checkpoint(checkpoint, shape, args.prompts)
        print(f"wrote a {args.shape} Mixtral-shaped checkpoint ({sum(p.stat().st_size for p in checkpoint.glob('*.safetensors')) / 1e9:.2f} GB bf16) "
              f"in {time.perf_counter() - t:.0f} s")
    try:
        fp32 = 2 * sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
        if args.budget_gb is None:
            args.budget_gb = round(fp32 / 4 / 2**30, 3)
        print(f"float32 model {fp32 / 1e9:.2f} GB; budget {args.budget_gb:.2f} GiB; knockout subj,attn,last (mean) at layers {args.layers}; "
              f"{args.threads} thread(s)")
        rows = {name: side(args, name, checkpoint) for name in ("moelens", "accelerate")}
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
    import numpy as np

    a, b = np.array(rows["moelens"]["jsd"]), np.array(rows["accelerate"]["jsd"])
    print(f"{'runtime':<34}{'open s':>9}{'cells s':>10}{'total s':>10}{'peak RSS GB':>13}")
    labels = {"moelens": "moelens, layer-streamed", "accelerate": "transformers + accelerate offload"}
    for name, r in rows.items():
        print(f"{labels[name]:<34}{r['open_s']:>9.1f}{r['cells_s']:>10.1f}{r['total_s']:>10.1f}{r['peak_rss'] / 1e9:>13.2f}")
    print(f"{rows['moelens']['cells']} cells; max |JSD difference| {np.abs(a - b).max():.2e} bits; "
          f"speed-up {rows['accelerate']['total_s'] / rows['moelens']['total_s']:.1f}x")


if __name__ == "__main__":
    main()
