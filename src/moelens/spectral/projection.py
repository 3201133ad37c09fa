"""Project probe vectors onto every expert's input-side singular directions, streaming experts.

For probe rows r̂_p (unit vectors in R^d, e.g. a layer's normalised router rows) and expert j with
input-side matrix X_j = Σ_m σ_m u_m v_mᵀ, the coefficients are

    c_{j, m, p} = v_mᵀ r̂_p            (basis on the input side: V_jᵀ R̂ᵀ)
                = u_mᵀ (X_j r̂_p) / σ_m  (basis on the output side, F < d, never forming V_j)

and are 0 for directions beyond the numerical rank. Experts are read one at a time (their
stored dtype), converted on the compute device, and decomposed in chunks whose bases stay under
``chunk_bytes``: memory is bounded by one chunk, not by the layer.

With ``keep_basis=False``, on the CPU, for ``eigh`` with F ≥ d and no cache (a cache stores
bases, so it needs V), the coefficients come from
:func:`~moelens.spectral.decompose.tridiagonal_projection`, which never forms V; the chunk's
``spectra.basis`` is then None. It is opt-in because its numbers differ from a basis-keeping run
(and so from a cached one) by rounding: both are as close to a float64 reference (≈1e-4 in
float32 energies at d = 4096, set by the float32 Gram), but not bitwise equal to each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from moelens.spectral.cache import SpectrumCache, content_hash
from moelens.spectral.decompose import (
    INPUT_SIDE,
    LAPACK_DTYPES,
    OUTPUT_SIDE,
    SpectrumBatch,
    basis_side,
    check_method,
    eigh_spectra,
    gram,
    input_side,
    refine_thin,
    svd_spectra,
    tridiagonal_projection,
)

DEFAULT_CHUNK_BYTES = 512 * 2**20
CPU = torch.device("cpu")


@dataclass(frozen=True)
class ProjectedChunk:
    """Consecutive experts of a layer: their indices, spectra and coefficients [c, r, P]."""

    experts: list[int]
    spectra: SpectrumBatch
    coefficients: torch.Tensor


@dataclass
class _Pending:
    expert: int
    key: str | None
    item: tuple[torch.Tensor, torch.Tensor | None, int] | None = None
    gram: torch.Tensor | None = None
    probe_image: torch.Tensor | None = None  # X_j R̂ᵀ [F, P], output side only
    x: torch.Tensor | None = None  # X_j, kept for an output-side eigh until its spectrum is checked
    coefficients: torch.Tensor | None = None  # [r, P], when computed without a basis
    fresh: bool = field(default=False)


def normalize_rows(m: torch.Tensor) -> torch.Tensor:
    """r̂ = r / ‖r‖ row by row; an all-zero row stays zero (it has no direction)."""
    return m / m.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)


def coefficients(spectra: SpectrumBatch, probes: torch.Tensor, probe_images: torch.Tensor | None = None) -> torch.Tensor:
    """c [c, r, P] of probes [P, d] on a batch's directions (see the module docstring)."""
    if spectra.basis is None:
        raise ValueError("these spectra carry no basis; their coefficients were computed directly")
    basis_t = spectra.basis.transpose(-1, -2)  # [c, r, n]
    if spectra.side == OUTPUT_SIDE:
        if probe_images is None:
            raise ValueError("an output-side basis needs the probe images X_j R̂ᵀ")
        # a dropped direction (σ = 0) must give 0, not inf·0 = NaN
        valid = spectra.valid()[..., None]
        sigma = torch.where(valid, spectra.sigma[..., None], torch.ones_like(spectra.sigma[..., None]))
        return torch.where(valid, (basis_t @ probe_images) / sigma, torch.zeros((), dtype=sigma.dtype, device=sigma.device))
    c = basis_t @ probes.transpose(0, 1)
    return c * spectra.valid()[..., None].to(c.dtype)


def project_experts(
    experts: Iterable[tuple[int, torch.Tensor]],
    probes: torch.Tensor,
    role: str,
    *,
    method: str = "eigh",
    dtype: torch.dtype = torch.float32,
    device: torch.device = CPU,
    cache: SpectrumCache | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    keep_basis: bool = True,
) -> Iterator[ProjectedChunk]:
    """Stream ``(e, weight)`` pairs (weight as stored, [out, in]) into :class:`ProjectedChunk` s.

    ``probes`` [P, d] should be unit rows. ``cache`` (optional) is consulted per expert by content
    hash; hits skip the decomposition, misses are stored. ``keep_basis=False`` allows the
    basis-free CPU path (see the module docstring); a cache keeps the basis regardless."""
    check_method(method)
    # the basis-free CPU path: only σ and the coefficients, never V (see the module docstring)
    direct = not keep_basis and cache is None and method == "eigh" and device.type == "cpu" and dtype in LAPACK_DTYPES
    probes = probes.to(device=device, dtype=dtype)
    dtype_name = str(dtype).replace("torch.", "")
    pending: list[_Pending] = []
    pending_bytes = 0
    shape: tuple[int, int] | None = None
    side = ""
    for e, weight in experts:
        x_stored = input_side(weight, role)
        n_rows, n_cols = int(x_stored.shape[-2]), int(x_stored.shape[-1])
        if shape is None:
            shape, side = (n_rows, n_cols), basis_side(n_rows, n_cols, method)
        elif shape != (n_rows, n_cols):
            raise ValueError(f"expert {e} has input-side shape {(n_rows, n_cols)}, the others {shape}")
        entry = _Pending(e, None)
        if cache is not None:
            entry.key = cache.key(content_hash(weight), role, method, dtype_name)
            hit = cache.load(entry.key)
            if hit is not None and hit[3] == side and hit[0].dtype == dtype and hit[1].shape[-1] == min(shape):
                entry.item = (hit[0].to(device), hit[1].to(device), hit[2])
        if direct and side == INPUT_SIDE:
            x = x_stored.to(device).to(dtype)
            sigma, entry.coefficients = tridiagonal_projection(x, probes)
            entry.item = (sigma, None, n_cols)
            del x
        elif entry.item is None or side == OUTPUT_SIDE:
            x = x_stored.to(device).to(dtype)
            if side == OUTPUT_SIDE:
                entry.probe_image = x @ probes.transpose(0, 1)
            if entry.item is None:
                entry.fresh = True
                if method == "eigh":
                    entry.gram = gram(x)
                    if side == OUTPUT_SIDE:
                        entry.x = x
                else:
                    entry.item = svd_spectra(x[None]).item(0)
            del x
        pending.append(entry)
        basis_rows = n_cols if side != OUTPUT_SIDE else n_rows
        pending_bytes += basis_rows * min(shape) * torch.finfo(dtype).bits // 8
        if pending_bytes >= chunk_bytes:
            yield _flush(pending, shape, side, probes, cache)
            pending, pending_bytes = [], 0
    if pending:
        assert shape is not None
        yield _flush(pending, shape, side, probes, cache)


def _flush(pending: list[_Pending], shape: tuple[int, int], side: str, probes: torch.Tensor, cache: SpectrumCache | None) -> ProjectedChunk:
    todo = [p for p in pending if p.gram is not None]
    if todo:
        grams = torch.stack([p.gram for p in todo])
        for p in todo:
            p.gram = None
        batch = eigh_spectra(grams, shape, probes.dtype)
        del grams
        for i, p in enumerate(todo):
            p.item = batch.item(i) if p.x is None else refine_thin(p.x, batch.item(i))
            p.x = None
    if cache is not None:
        for p in pending:
            if p.fresh and p.key is not None and p.item is not None and p.item[1] is not None:
                cache.store(p.key, p.item[0], p.item[1], p.item[2], side)
    spectra = SpectrumBatch.stack([p.item for p in pending if p.item is not None], side)
    if all(p.coefficients is not None for p in pending):
        return ProjectedChunk([p.expert for p in pending], spectra, torch.stack([p.coefficients for p in pending]))  # type: ignore[misc]
    images = torch.stack([p.probe_image for p in pending]) if side == OUTPUT_SIDE else None  # type: ignore[misc]
    return ProjectedChunk([p.expert for p in pending], spectra, coefficients(spectra, probes, images))


def cumulative_energies(coefficients: torch.Tensor, ks: Iterable[int]) -> torch.Tensor:
    """A [c, K, P] = Σ_{m ≤ min(k, r)} c_{·, m, ·}² for each k, summed in float64 and clipped
    to [0, 1] (the exact value lies there; rounding can step past 1 at k = d). On the CPU."""
    r = coefficients.shape[1]
    cum = torch.cumsum(coefficients.to(torch.float64).square(), dim=1)
    idx = torch.tensor([min(int(k), r) - 1 for k in ks], device=cum.device, dtype=torch.int64)
    return cum.index_select(1, idx).clamp_(0.0, 1.0).cpu()
