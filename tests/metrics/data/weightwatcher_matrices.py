"""The matrices whose WeightWatcher α is recorded in ``weightwatcher_alpha.json``.

Each is rebuilt from its name alone (numpy's PCG64 generator with a fixed seed, or a stored
tiny-llama tensor), as float32 [out, in] — the dtype WeightWatcher reads a torch ``Linear`` in.
Imported by the tests and by ``record_weightwatcher.py``; needs only numpy and safetensors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TINY = HERE / "tiny_llama_matrices.safetensors"


def _orthonormal(rng: np.random.Generator, n: int, r: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, r)))
    return q


def gaussian(seed: int, shape: tuple[int, int], scale: float) -> np.ndarray:
    """i.i.d. N(0, scale²) entries: a Marchenko–Pastur spectrum."""
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def student_t(seed: int, shape: tuple[int, int], df: float, scale: float) -> np.ndarray:
    """i.i.d. Student-t entries (heavy-tailed): a spectrum with a power-law tail."""
    return (np.random.default_rng(seed).standard_t(df, shape) * scale).astype(np.float32)


def pareto_spectrum(seed: int, shape: tuple[int, int], a: float, lam_min: float) -> np.ndarray:
    """U diag(√λ) Vᵀ with eigenvalues λ of WᵀW drawn from a Pareto law, density ∝ λ^(−a) on
    λ ≥ lam_min (λ = lam_min · (1 − u)^(−1/(a − 1)), u uniform), random orthonormal U, V."""
    rng = np.random.default_rng(seed)
    r = min(shape)
    lam = lam_min * (1.0 - rng.random(r)) ** (-1.0 / (a - 1.0))
    u = _orthonormal(rng, shape[0], r)
    v = _orthonormal(rng, shape[1], r)
    return ((u * np.sqrt(lam)) @ v.T).astype(np.float32)


def low_rank_plus_noise(seed: int, shape: tuple[int, int], rank: int, signal: float, noise: float) -> np.ndarray:
    """A rank-``rank`` signal (σ_k = signal·(k+1)^(−1/2)) plus i.i.d. N(0, noise²) entries."""
    rng = np.random.default_rng(seed)
    u = _orthonormal(rng, shape[0], rank)
    v = _orthonormal(rng, shape[1], rank)
    s = signal / np.sqrt(np.arange(1, rank + 1))
    return ((u * s) @ v.T + rng.standard_normal(shape) * noise).astype(np.float32)


def bf16_rounded(w: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even), returned as float32."""
    bits = w.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def tiny_llama(name: str) -> np.ndarray:
    from safetensors.numpy import load_file

    return load_file(str(TINY))[name].astype(np.float32)


# name -> (construction, in words for the JSON)
RECIPES = {
    "gaussian_256x512": (lambda: gaussian(1, (256, 512), 0.02), "gaussian(seed=1, shape=(256, 512), scale=0.02)"),
    "gaussian_1024x512": (lambda: gaussian(2, (1024, 512), 0.02), "gaussian(seed=2, shape=(1024, 512), scale=0.02)"),
    "gaussian_1024x512_bf16": (lambda: bf16_rounded(gaussian(2, (1024, 512), 0.02)),
                               "bf16_rounded(gaussian(seed=2, shape=(1024, 512), scale=0.02))"),
    "gaussian_512x256_below_floor": (lambda: gaussian(3, (512, 256), 2e-4),
                                     "gaussian(seed=3, shape=(512, 256), scale=2e-4): part of the spectrum ≤ 1e-5"),
    "student_t3_512x1024": (lambda: student_t(4, (512, 1024), 3.0, 0.02), "student_t(seed=4, shape=(512, 1024), df=3, scale=0.02)"),
    "student_t2_1024x256": (lambda: student_t(5, (1024, 256), 2.0, 0.02), "student_t(seed=5, shape=(1024, 256), df=2, scale=0.02)"),
    "pareto_a2.5_1024x512": (lambda: pareto_spectrum(6, (1024, 512), 2.5, 0.01),
                             "pareto_spectrum(seed=6, shape=(1024, 512), a=2.5, lam_min=0.01)"),
    "pareto_a4_256x512": (lambda: pareto_spectrum(7, (256, 512), 4.0, 0.05),
                          "pareto_spectrum(seed=7, shape=(256, 512), a=4.0, lam_min=0.05)"),
    "low_rank_plus_noise_768x256": (lambda: low_rank_plus_noise(8, (768, 256), 16, 5.0, 0.01),
                                    "low_rank_plus_noise(seed=8, shape=(768, 256), rank=16, signal=5.0, noise=0.01)"),
    "gaussian_64x12_small_n": (lambda: gaussian(9, (64, 12), 0.1), "gaussian(seed=9, shape=(64, 12), scale=0.1): 12 eigenvalues, small-sample fit"),
    "rank5_64x12_whole_sample": (lambda: low_rank_plus_noise(10, (64, 12), 5, 1.0, 1e-5),
                                 "low_rank_plus_noise(seed=10, shape=(64, 12), rank=5, signal=1.0, noise=1e-5): 5 eigenvalues above the floor, no tail of 8"),
    "rank1_64x16_no_fit": (lambda: low_rank_plus_noise(11, (64, 16), 1, 1.0, 0.0),
                           "low_rank_plus_noise(seed=11, shape=(64, 16), rank=1, signal=1.0, noise=0.0): one eigenvalue above the floor, no fit"),
}
for _name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
              "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight",
              "model.layers.1.self_attn.o_proj.weight"):
    RECIPES[f"tiny_llama/{_name}"] = (
        (lambda n=_name: tiny_llama(n)),
        f"tiny_llama_matrices.safetensors[{_name!r}] (moelens tiny llama, seed 0, float32)",
    )


def build(name: str) -> np.ndarray:
    """The float32 matrix [out, in] recorded under ``name``."""
    return RECIPES[name][0]()
