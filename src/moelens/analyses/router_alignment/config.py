"""The options of router–expert alignment (docs/methods.md §1): a frozen config, checked when made.

Torch-free (the standard library and moelens' leaf modules only), so that the command line shows
and checks these options without importing the analysis.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moelens.analyses.fields import as_index_tuple, check_seed, is_integer, option
from moelens.choices import DEFAULT_DEVICE, DEVICE_HELP, check_compute_dtype
from moelens.choices import SPECTRAL_METHODS as METHODS
from moelens.errors import ConfigError
from moelens.module_names import ROLES
from moelens.ranges import parse_ranges

#: The null models (moelens.analyses.router_alignment.nulls).
NULLS = ("derangement", "shuffle", "shuffle-sampled")
#: The fewest Monte Carlo draws of the layer permutation test.
MIN_P_DRAWS = 10_000
MATRICES = (*ROLES, "all")


def check_null(null: str) -> str:
    if null not in NULLS:
        raise ConfigError(f"unknown null model {null!r}; expected one of {', '.join(NULLS)}")
    return null


@dataclass(frozen=True)
class RouterAlignmentConfig:
    """Options of :func:`router_alignment` (each field's help says what it does)."""

    layers: tuple[int, ...] | None = option(None, "MoE layers, e.g. 0,5,10-13 (default: every MoE layer).", parse=parse_ranges, metavar="LIST")
    matrix: str = option("gate", "Expert matrix: gate, up, down or all.")
    k: tuple[int, ...] | None = option(None, "Subspace sizes, e.g. 1,2,4,8 (default: powers of two up to d, and d).", parse=parse_ranges, metavar="LIST")
    null: str = option("derangement", "Null model: derangement, shuffle (exact) or shuffle-sampled (GaleMoE's).")
    shuffles: int = option(200, "Permutations per k for --null shuffle-sampled.")
    seed: int = option(0, "Seed of every random draw (≥ 0); shuffle-sampled restarts it in every layer, as GaleMoE's runs do.")
    method: str = option("eigh", "eigh (Gram eigendecomposition) or svd (slower; reproduces GaleMoE's z to 3e-6).")
    device: str = option(DEFAULT_DEVICE, f"{DEVICE_HELP}.", changes_numbers=False)
    dtype: str = option("float32", "Arithmetic: float32 or float64.")
    p_draws: int = option(MIN_P_DRAWS, "Monte Carlo draws of the layer permutation test when E > 8.")
    cache: bool | None = option(None, "Keep spectra on disk, keyed by tensor content, and reuse them (a basis is d·min(F,d)·4 bytes per expert: 16 GiB per matrix for Mixtral-8x7B).", kind=bool, changes_numbers=False, recorded=False)
    cache_dir: str | None = option(None, "Spectrum cache directory; implies --cache (default $MOELENS_CACHE/spectra or ~/.cache/moelens/spectra).", kind=Path, changes_numbers=False, recorded=False)
    chunk_bytes: int | None = option(None, "Bytes of spectra held at once (default: one expert on the CPU, 512 MiB on CUDA).", kind=int, changes_numbers=False, recorded=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", as_index_tuple(self.layers, "layer"))
        object.__setattr__(self, "k", as_index_tuple(self.k, "k"))
        if self.k is not None and not self.k:
            raise ConfigError("the k list is empty; give at least one k, e.g. 1,8,64")
        if self.matrix not in MATRICES:
            raise ConfigError(f"unknown matrix {self.matrix!r}; expected one of {', '.join(MATRICES)}")
        check_null(self.null)
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        check_compute_dtype(self.dtype)
        for name in ("shuffles", "p_draws"):
            value = getattr(self, name)
            if not is_integer(value):
                raise ConfigError(f"{name}={value!r} is not an integer")
        if int(self.shuffles) < 1:
            raise ConfigError(f"shuffles={self.shuffles}: need at least 1 shuffle")
        if int(self.p_draws) < MIN_P_DRAWS:
            raise ConfigError(f"p_draws={self.p_draws} is too few for a Monte Carlo p-value; use at least {MIN_P_DRAWS}")
        if self.chunk_bytes is not None and (isinstance(self.chunk_bytes, bool) or int(self.chunk_bytes) < 1):
            raise ConfigError(f"chunk_bytes={self.chunk_bytes!r}: give a positive number of bytes")
        object.__setattr__(self, "shuffles", int(self.shuffles))
        object.__setattr__(self, "seed", check_seed(self.seed))
        object.__setattr__(self, "p_draws", int(self.p_draws))
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", str(Path(self.cache_dir)))



__all__ = ["MATRICES", "METHODS", "MIN_P_DRAWS", "NULLS", "RouterAlignmentConfig", "check_null"]
