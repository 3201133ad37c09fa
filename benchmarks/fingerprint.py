"""What fingerprinting by content costs beside the work it guards, at one real-size expert matrix.

A 4096 x 14336 bf16 matrix (Mixtral-8x7B's w1/w3, 112 MiB) is written to a safetensors file and:
- read through the tensor store (page cache warm), as a unit reads it, without and with the read
  digest (SHA-256 of the raw bytes, what a run records per tensor read), and BLAKE2b-128 for
  comparison;
- hashed whole as a file (SHA-256, what an analysis that loads the model through transformers
  records per weight file);
- decomposed as the analyses do: the Gram matrix W^T W in float32 and its eigendecomposition
  (``torch.linalg.eigh``).

    python benchmarks/fingerprint.py [--threads 1] [--repeat 3]

Prints one row per step (best of ``--repeat``) and the digest's share of read + decomposition.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rows", type=int, default=14336)
    ap.add_argument("--cols", type=int, default=4096)
    args = ap.parse_args()

    import torch
    from safetensors.torch import save_file

    from moelens.checkpoint.store import TensorStore, fingerprint_file, tensor_digest

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        w = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        save_file({"w": w}, str(directory / "model.safetensors"))
        mib = w.numel() * 2 / 2**20
        store = TensorStore(directory)
        info = store.infos["w"]
        store.read("w")  # warm the page cache and the handle
        # a unit reads a tensor and converts it to float: the conversion pulls the mapped bytes in
        read_s = best(lambda: store._raw_unhashed(info, None).float(), args.repeat)
        t = store._raw_unhashed(info, None)
        digest_s = best(lambda: tensor_digest(t), args.repeat)
        file_s = best(lambda: fingerprint_file(directory / "model.safetensors", whole=True), args.repeat)
        blake_s = best(lambda: hashlib.blake2b(memoryview(t.reshape(-1).view(torch.uint8).numpy()), digest_size=16).digest(), args.repeat)
        wf = t.float()
        gram_s = best(lambda: torch.linalg.eigh(wf.T @ wf), 1)
    rows = [
        ("read (tensor store, warm)", read_s), ("read digest (SHA-256)", digest_s), ("BLAKE2b-128 of the bytes", blake_s),
        ("file hashed whole (SHA-256)", file_s), ("Gram W^T W + eigh (float32)", gram_s)
    ]
    print(f"{args.rows} x {args.cols} bf16 ({mib:.0f} MiB), {args.threads} thread(s), best of {args.repeat}")
    for label, s in rows:
        print(f"  {label:<32} {s:8.3f} s   {mib / s:8.0f} MiB/s")
    print(f"  read digest / (read + Gram + eigh) = {digest_s / (read_s + gram_s):.1%}")


if __name__ == "__main__":
    main()
