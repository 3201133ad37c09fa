"""Fact recall and perplexity layer-streamed against in memory: time and peak resident memory.

The checkpoint is benchmarks/forward.py's Mixtral-shaped one (random bf16 weights, per-expert Hub
layout, written one layer at a time), measured in float32 on the CPU. Each side runs in a fresh
process, so its peak RSS (``ru_maxrss``) is its own: it opens the model (``--stream on`` or
``off``), runs fact recall on the checkpoint's prompts and perplexity on its calibration lines, and
prints the numbers; the script checks that the two sides' numbers are equal.

    python benchmarks/recall_stream.py                   # 12 layers, d 512 (~1.1 GB float32)
    python benchmarks/recall_stream.py --shape quick     # forward.py's 8 layers, d 256
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward import SHAPES, write_checkpoint  # noqa: E402

SHAPES = {**SHAPES, "moderate": dict(layers=12, hidden=512, ffn=1792, experts=8, heads=8, kv_heads=2, vocab=8192)}


def worker(args: argparse.Namespace) -> None:
    """One side in its own process: a JSON line with times, peak RSS, recall and perplexity."""
    import torch

    from moelens.runtime import fact_recall, load_tokenizer
    from moelens.runtime.forward import open_forward
    from moelens.runtime.perplexity import perplexity

    torch.set_num_threads(args.threads)
    checkpoint = Path(args.checkpoint)
    tok = load_tokenizer(checkpoint)
    facts = [json.loads(line) for line in (checkpoint / "prompts.jsonl").read_text().splitlines() if line.strip()]
    lines = [line for line in (checkpoint / "calibration.txt").read_text().splitlines() if line.strip()]
    sequences = [tok(line)["input_ids"] for line in lines]
    start = time.perf_counter()
    forward = open_forward(checkpoint, torch.device("cpu"), "float32", stream=args.worker)
    opened = time.perf_counter()
    recall = fact_recall(forward, tok, facts, batch_size=args.batch)
    recalled = time.perf_counter()
    ppl = perplexity(forward, sequences, int(tok.pad_token_id), batch_tokens=args.batch_tokens)
    done = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"open_s": opened - start, "recall_s": recalled - opened, "ppl_s": done - recalled, "total_s": done - start,
                      "peak_rss": peak, "probs": recall.target_probs.tolist(), "nll": ppl.nll, "n": ppl.n_predicted,
                      "streamed": forward.streamed}))


def side(args: argparse.Namespace, stream: str, checkpoint: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", stream, "--checkpoint", str(checkpoint), "--threads", str(args.threads),
           "--batch", str(args.batch), "--batch-tokens", str(args.batch_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode != 0:
        raise SystemExit(f"stream {stream} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="moderate")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16, help="prompts per recall batch")
    ap.add_argument("--batch-tokens", type=int, default=512, help="padded tokens per perplexity batch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scratch", default=tempfile.gettempdir())
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=("on", "off"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    root = Path(tempfile.mkdtemp(prefix="bench-recall-", dir=args.scratch))
    try:
        checkpoint = root / "ckpt"
        t = time.perf_counter()
        write_checkpoint(checkpoint, SHAPES[args.shape], args.prompts)
        size = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
        print(f"wrote a {args.shape} Mixtral-shaped checkpoint ({size / 1e9:.2f} GB bf16, {2 * size / 1e9:.2f} GB float32) "
              f"in {time.perf_counter() - t:.0f} s; {args.prompts} facts, 64 perplexity lines; {args.threads} thread(s)")
        rows = {stream: side(args, stream, checkpoint) for stream in ("off", "on")}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    off, on = rows["off"], rows["on"]
    print(f"{'runtime':<22}{'open s':>8}{'recall s':>10}{'ppl s':>8}{'total s':>9}{'peak RSS GB':>13}")
    for name, r in (("in memory (off)", off), ("layer-streamed (on)", on)):
        print(f"{name:<22}{r['open_s']:>8.1f}{r['recall_s']:>10.1f}{r['ppl_s']:>8.1f}{r['total_s']:>9.1f}{r['peak_rss'] / 1e9:>13.2f}")
    same = off["probs"] == on["probs"] and off["nll"] == on["nll"] and off["n"] == on["n"]
    print(f"recall target probabilities and perplexity sums {'identical' if same else 'DIFFER'}; "
          f"streamed/in-memory time {on['total_s'] / off['total_s']:.2f}x, peak RSS {on['peak_rss'] / off['peak_rss']:.2f}x")


if __name__ == "__main__":
    main()
