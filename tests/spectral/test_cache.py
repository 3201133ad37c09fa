"""The spectrum cache: keyed by content, role, method and dtype; a changed tensor is a miss."""

from __future__ import annotations

import torch

from moelens.spectral import (
    SpectrumCache,
    content_hash,
    cumulative_energies,
    normalize_rows,
    project_experts,
)


def _run(weights, probes, cache, role="gate", method="eigh"):
    out = torch.empty(weights.shape[0], 2, probes.shape[0], dtype=torch.float64)
    sig = []
    for chunk in project_experts(enumerate(weights), normalize_rows(probes), role, method=method, cache=cache):
        out[chunk.experts] = cumulative_energies(chunk.coefficients, [1, 4])
        sig.append(chunk.spectra.sigma)
    return out, torch.cat(sig)


def test_content_hash_sees_every_byte_dtype_and_shape():
    t = torch.randn(4, 6)
    h = content_hash(t)
    assert h == content_hash(t.clone())
    u = t.clone()
    u[3, 5] = torch.nextafter(u[3, 5], torch.tensor(float("inf")))  # one ulp
    assert content_hash(u) != h
    assert content_hash(t.reshape(6, 4)) != h
    assert content_hash(t.to(torch.bfloat16)) != content_hash(t.to(torch.float16))
    assert content_hash(t.t()) == content_hash(t.t().contiguous())


def test_second_run_hits_and_gives_identical_numbers(tmp_path):
    g = torch.Generator().manual_seed(1)
    weights, probes = torch.randn(3, 20, 8, generator=g), torch.randn(3, 8, generator=g)
    cache = SpectrumCache(tmp_path)
    first, s1 = _run(weights, probes, cache)
    assert (cache.hits, cache.misses) == (0, 3)
    second, s2 = _run(weights, probes, cache)
    assert (cache.hits, cache.misses) == (3, 3)
    assert torch.equal(first, second) and torch.equal(s1, s2)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3


def test_changed_tensor_is_never_served_a_stale_spectrum(tmp_path):
    g = torch.Generator().manual_seed(2)
    weights, probes = torch.randn(3, 20, 8, generator=g), torch.randn(3, 8, generator=g)
    cache = SpectrumCache(tmp_path)
    _run(weights, probes, cache)
    changed = weights.clone()
    changed[1] = torch.randn(20, 8, generator=g)
    before = (cache.hits, cache.misses)
    got, sigma = _run(changed, probes, cache)
    assert (cache.hits - before[0], cache.misses - before[1]) == (2, 1)
    fresh, fresh_sigma = _run(changed, probes, None)
    assert torch.equal(got, fresh) and torch.equal(sigma, fresh_sigma)


def test_role_method_and_dtype_are_part_of_the_key(tmp_path):
    g = torch.Generator().manual_seed(3)
    square = torch.randn(2, 8, 8, generator=g)
    probes = torch.randn(2, 8, generator=g)
    cache = SpectrumCache(tmp_path)
    gate, _ = _run(square, probes, cache, role="gate")
    down, _ = _run(square, probes, cache, role="down")  # same bytes, transposed input side
    assert cache.hits == 0
    assert not torch.allclose(gate, down)
    _run(square, probes, cache, role="gate", method="svd")
    assert cache.hits == 0
    keys = {SpectrumCache.key("h", "gate", "eigh", d) for d in ("float32", "float64")}
    assert len(keys) == 2


def test_unreadable_cache_file_is_a_miss_and_is_rewritten(tmp_path):
    g = torch.Generator().manual_seed(4)
    weights, probes = torch.randn(1, 12, 6, generator=g), torch.randn(1, 6, generator=g)
    cache = SpectrumCache(tmp_path)
    ref, _ = _run(weights, probes, cache)
    (path,) = list(tmp_path.rglob("*.safetensors"))
    path.write_bytes(b"not a safetensors file")
    got, _ = _run(weights, probes, cache)
    assert cache.hits == 0 and torch.equal(got, ref)
    again, _ = _run(weights, probes, cache)
    assert cache.hits == 1 and torch.equal(again, ref)


def test_default_directory_follows_moelens_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MOELENS_CACHE", str(tmp_path))
    assert SpectrumCache().directory == tmp_path / "spectra"


def test_cached_and_uncached_paths_agree_within_the_stated_tolerance(tiny_checkpoint, tmp_path):
    """Without a cache the CPU path never forms V (coefficients from the tridiagonal
    eigenvectors); with one it keeps V to store it. The two round differently: align within 5e-6
    and Δ = align − μ within 5e-6, so z = Δ/σ differs by at most 5e-6/σ (a large relative
    difference only where z itself is near 0). README, "Spectrum cache", states the same."""
    import numpy as np

    import moelens as ml

    model = ml.open_model(tiny_checkpoint("qwen3_moe"))
    plain = ml.router_alignment(model, matrix="all", null="shuffle", cache=False)
    cached = ml.router_alignment(model, matrix="all", null="shuffle", cache_dir=tmp_path / "spectra")
    hit = ml.router_alignment(model, matrix="all", null="shuffle", cache_dir=tmp_path / "spectra")
    assert hit.manifest["spectra_cache"]["hits"] > 0 and hit.manifest["spectra_cache"]["misses"] == 0
    a, b = plain["alignment"], cached["alignment"]
    np.testing.assert_allclose(b["align"], a["align"], atol=5e-6, rtol=0)
    np.testing.assert_allclose(b["delta_vs_shuffle"], a["delta_vs_shuffle"], atol=5e-6, rtol=0)
    sigma = a["shuffle_std"].to_numpy()
    informative = sigma > 1e-3
    dz = np.abs(b["z_vs_shuffle"].to_numpy() - a["z_vs_shuffle"].to_numpy())[informative]
    assert np.all(dz <= 5e-6 / sigma[informative] + 1e-9)
    np.testing.assert_array_equal(hit["alignment"]["align"], cached["alignment"]["align"])  # a hit is bit-identical to its fill


def test_temporaries_left_by_a_killed_writer_are_removed_but_live_ones_kept(tmp_path):
    import os
    import time

    shard = tmp_path / "ab"
    shard.mkdir()
    stale, live = shard / ".abcd.safetensors.x1.tmp", shard / ".abcd.safetensors.x2.tmp"
    stale.write_bytes(b"partial")
    live.write_bytes(b"partial")
    old = time.time() - 2 * SpectrumCache.STALE_TEMPORARY_S
    os.utime(stale, (old, old))
    SpectrumCache(tmp_path)
    assert not stale.exists() and live.exists()


def test_tampered_entry_is_recomputed_and_never_served(tmp_path):
    """A well-formed entry whose arrays were changed after writing (its metadata kept) fails the
    content check: the spectrum is recomputed, equals the uncached one, and the entry is rewritten."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    weights, probes = torch.randn(1, 12, 6, generator=g), torch.randn(1, 6, generator=g)
    uncached, uncached_sigma = _run(weights, probes, None)
    cache = SpectrumCache(tmp_path)
    _run(weights, probes, cache)
    (path,) = list(tmp_path.rglob("*.safetensors"))
    with safe_open(str(path), framework="pt") as fh:
        meta, sigma, basis = fh.metadata(), fh.get_tensor("sigma"), fh.get_tensor("basis")
    save_file({"sigma": sigma * 2, "basis": basis.flip(-1).contiguous()}, str(path), metadata=meta)
    got, got_sigma = _run(weights, probes, cache)
    assert cache.hits == 0
    assert torch.equal(got, uncached) and torch.equal(got_sigma, uncached_sigma)
    again, _ = _run(weights, probes, cache)
    assert cache.hits == 1 and torch.equal(again, uncached)
