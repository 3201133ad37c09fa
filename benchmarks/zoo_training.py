"""Zoo training: seconds per step of the old training path against the new, in one run.

Every path trains its own copy of the same freshly initialised model (the default recipe's
world, tokenizer, batches of 32 rows × 40 tokens and base-phase schedule) on the same batches:

- ``eager``: transformers' per-expert loop (a one-hot mask and a gather per expert), foreach AdamW;
- ``grouped_mm``: transformers' own default on CPU, foreach AdamW (what the zoo trained with
  before the sorted experts);
- ``new``: :mod:`moelens.zoo.experts`' sorted experts, fused AdamW (what ``moelens zoo build`` uses).

A step is the whole of one: batch (pre-built, the sampler is timed apart), forward, loss,
backward, gradient clipping, AdamW. The paths take turns, a few steps each, for several rounds,
and each reports its median, so a machine that others load slows them alike; with one thread the
CPU time of the thread is printed too (what the step costs when it has a core to itself). Also
printed: the first step's losses (the paths compute the same function) and the training time of
the zoo's schedule (base + tuned steps) projected from the new path's median.

    python benchmarks/zoo_training.py                          # 4 and 12 layers, one thread
    python benchmarks/zoo_training.py --layers 12 16 --threads 2 --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

PATHS = {"eager": ("eager", False), "grouped_mm": ("grouped_mm", False), "new": ("moelens_sorted", True)}


def setup(layers: int, family: str, rows: int, n_batches: int, seed: int = 0):
    """(recipe, model, batches, sampler seconds per batch) for the default zoo at ``layers``."""
    from moelens.zoo.build import _training_groups
    from moelens.zoo.corpus import build_world
    from moelens.zoo.models import make_model
    from moelens.zoo.recipe import recipe_for
    from moelens.zoo.tokenizer import build_tokenizer
    from moelens.zoo.train import Curriculum

    recipe = recipe_for(family)
    recipe = replace(recipe, shape=replace(recipe.shape, layers=layers))
    world = build_world(seed, recipe.world)
    tok = build_tokenizer(world.words(), max_length=recipe.shape.max_positions)
    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    model = make_model(family, recipe.shape, len(tok), special, seed)
    base, _ = _training_groups(world, tok, recipe)
    data = Curriculum(base, (), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, random.Random(seed),
                      row_tokens=recipe.row_tokens, answer_weight=recipe.answer_weight)
    start = time.perf_counter()
    batches = [data.batch(s, rows) for s in range(n_batches)]
    return recipe, model, batches, (time.perf_counter() - start) / n_batches


def one_step(model, optimizer, batch, aux_coef: float, clip: float) -> float:
    import torch

    from moelens.zoo.train import _objective

    loss, _, _ = _objective(model, batch, aux_coef)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
    optimizer.step()
    return float(loss.detach())


def bench_shape(layers: int, args: argparse.Namespace) -> dict[str, float]:
    import torch

    from moelens.zoo.experts import training_experts
    from moelens.zoo.train import make_optimizer

    per_round = args.steps
    n_batches = args.warmup + args.rounds * per_round
    recipe, model, batches, sampler_s = setup(layers, args.family, recipe_for_rows(), n_batches)
    aux = float(model.config.router_aux_loss_coef)
    runs = {}
    for name, (impl, fused) in PATHS.items():
        m = copy.deepcopy(model)
        runs[name] = (m, make_optimizer(m, recipe.base, fused=fused), impl, {"wall": [], "cpu": [], "first": None})
    one_thread = torch.get_num_threads() == 1
    for name, (m, opt, impl, rec) in runs.items():
        with training_experts(m, impl):
            for b in batches[:args.warmup]:
                loss = one_step(m, opt, b, aux, recipe.base.clip_norm)
                rec["first"] = loss if rec["first"] is None else rec["first"]
    for r in range(args.rounds):
        chunk = batches[args.warmup + r * per_round: args.warmup + (r + 1) * per_round]
        for name, (m, opt, impl, rec) in runs.items():
            with training_experts(m, impl):
                wall, cpu = time.perf_counter(), time.thread_time()
                for b in chunk:
                    one_step(m, opt, b, aux, recipe.base.clip_norm)
                rec["wall"].append((time.perf_counter() - wall) / per_round)
                rec["cpu"].append((time.thread_time() - cpu) / per_round)
    steps = recipe.base.steps + recipe.tuned.steps
    new = statistics.median(runs["new"][3]["wall"])
    print(f"\n{layers} layers, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"threads {torch.get_num_threads()}, sampler {sampler_s * 1e3:.1f} ms per batch")
    print(f"  {'path':<11} {'s/step':>8} {'cpu s/step':>11} {'old/new':>8}  first loss")
    out = {}
    for name, (_, _, _, rec) in runs.items():
        wall = statistics.median(rec["wall"])
        cpu = f"{statistics.median(rec['cpu']):>11.3f}" if one_thread else f"{'-':>11}"
        print(f"  {name:<11} {wall:>8.3f} {cpu} {wall / new:>7.2f}×  {rec['first']:.6f}")
        out[name] = wall
    print(f"  zoo schedule ({steps} steps) with the new path: about {steps * new:.0f} s of training")
    return out


def recipe_for_rows() -> int:
    from moelens.zoo.recipe import recipe_for

    return recipe_for().base.batch_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 12], help="decoder layers (default: 4 12)")
    parser.add_argument("--family", default="mixtral", choices=("mixtral", "qwen3_moe", "olmoe"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="turns each path takes")
    parser.add_argument("--steps", type=int, default=4, help="steps per turn")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per path first")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.rounds < 1 or args.steps < 1 or args.warmup < 1 or min(args.layers) < 1:
        print("zoo_training: --threads, --rounds, --steps, --warmup and --layers must be at least 1", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    for layers in args.layers:
        bench_shape(layers, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
