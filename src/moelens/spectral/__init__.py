"""Batched spectra of expert matrices on CPU or CUDA, projection energies, and a content-hash cache.

>>> from moelens.spectral import project_experts, cumulative_energies, normalize_rows
>>> probes = normalize_rows(layer.router().weight.float())
>>> for chunk in project_experts(layer.iter_experts("gate"), probes, "gate"):
...     A = cumulative_energies(chunk.coefficients, [1, 8, 64])   # [experts, K, routers]
"""

from moelens.spectral.cache import SpectrumCache, content_hash, default_cache_dir
from moelens.spectral.decompose import (
    INPUT_SIDE,
    METHODS,
    OUTPUT_SIDE,
    SpectrumBatch,
    eigh_spectra,
    gram,
    input_side,
    spectrum_of,
    svd_spectra,
)
from moelens.spectral.device import full_precision, resolve_device, resolve_dtype
from moelens.spectral.projection import (
    ProjectedChunk,
    coefficients,
    cumulative_energies,
    normalize_rows,
    project_experts,
)

__all__ = [
    "INPUT_SIDE", "METHODS", "OUTPUT_SIDE", "ProjectedChunk", "SpectrumBatch", "SpectrumCache",
    "coefficients", "content_hash", "cumulative_energies", "default_cache_dir", "eigh_spectra",
    "full_precision", "gram", "input_side", "normalize_rows", "project_experts", "resolve_device",
    "resolve_dtype", "spectrum_of", "svd_spectra",
]
