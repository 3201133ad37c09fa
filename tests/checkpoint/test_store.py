"""The lazy safetensors store: slices, quantised names, and the header and index checks."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moelens.checkpoint.store import INDEX_NAME, TensorStore, quantize_mxfp4
from moelens.errors import CheckpointFormatError


def write_raw(path: Path, header: dict, data: bytes) -> None:
    """A safetensors file from a header dict and data bytes, as the format lays them out."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.fixture
def store_dir(tmp_path) -> Path:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 6, 64, generator=g)
    blocks, scales = quantize_mxfp4(w)
    save_file({"dense": torch.randn(4, 6, 5, generator=g), "q_blocks": blocks, "q_scales": scales}, tmp_path / "a.safetensors")
    save_file({"flat": torch.arange(24.0).reshape(12, 2)}, tmp_path / "b.safetensors")
    return tmp_path


def test_slices_read_only_what_is_asked(store_dir):
    store = TensorStore(store_dir)
    full = store.read("dense")
    torch.testing.assert_close(store.read("dense", index=2), full[2], rtol=0, atol=0)
    torch.testing.assert_close(store.read("dense", index=slice(1, 3)), full[1:3], rtol=0, atol=0)
    torch.testing.assert_close(store.read("flat", index=slice(4, 8)), torch.arange(8.0, 16.0).reshape(4, 2), rtol=0, atol=0)
    with pytest.raises(CheckpointFormatError, match="entries along its first axis"):
        store.read("dense", index=4)


def test_mxfp4_is_served_under_the_weight_name(store_dir):
    store = TensorStore(store_dir)
    assert "q" in store and "q_blocks" in store
    assert store.dtype("q") == "MXFP4" and store.shape("q") == (4, 6, 64)
    full = store.read("q")
    assert full.shape == (4, 6, 64) and full.dtype == torch.float32
    torch.testing.assert_close(store.read("q", index=3), full[3], rtol=0, atol=0)


def test_missing_tensor_is_named(store_dir):
    store = TensorStore(store_dir)
    for query in (store.read, store.shape, store.dtype):
        with pytest.raises(CheckpointFormatError, match="'nope' is missing"):
            query("nope")


@pytest.mark.parametrize("entry, phrase", [
    ({"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}, "unknown dtype"),
    ({"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}, "shape"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "data_offsets"),
    ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "8 bytes for a F32 tensor of shape [3]"),
    ([1, 2], "not an object"),
])
def test_corrupt_header_entries(tmp_path, entry, phrase):
    write_raw(tmp_path / "model.safetensors", {"t": entry}, b"\0" * 16)
    with pytest.raises(CheckpointFormatError, match="corrupt header entry for 't'") as info:
        TensorStore(tmp_path)
    assert phrase in str(info.value)


def test_header_longer_than_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(CheckpointFormatError, match="header claims 10000 bytes"):
        TensorStore(tmp_path)


def test_data_shorter_than_header_promises(tmp_path):
    write_raw(tmp_path / "model.safetensors", {"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    with pytest.raises(CheckpointFormatError, match="need 16 data bytes but the file holds 8"):
        TensorStore(tmp_path)


def test_no_safetensors_files(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(CheckpointFormatError, match="no \\*.safetensors files"):
        TensorStore(tmp_path)


@pytest.mark.parametrize("index", ["{", "[]", '{"weight_map": [1]}', '{"weight_map": {"t": 3}}', '{"metadata": {}}'])
def test_invalid_index(store_dir, index):
    (store_dir / INDEX_NAME).write_text(index)
    with pytest.raises(CheckpointFormatError, match="not a valid safetensors index"):
        TensorStore(store_dir)


def test_index_naming_a_tensor_its_shard_lacks(store_dir):
    (store_dir / INDEX_NAME).write_text(json.dumps({"weight_map": {"dense": "a.safetensors", "ghost": "b.safetensors"}}))
    with pytest.raises(CheckpointFormatError, match="'ghost' in b.safetensors"):
        TensorStore(store_dir)


def test_file_hashes_follow_content(store_dir):
    before = TensorStore(store_dir).file_hashes()
    assert set(before) == {"a.safetensors", "b.safetensors"}
    save_file({"flat": torch.zeros(12, 2)}, store_dir / "b.safetensors")
    after = TensorStore(store_dir).file_hashes()
    assert after["a.safetensors"] == before["a.safetensors"] and after["b.safetensors"] != before["b.safetensors"]


def test_read_part_reads_a_block_of_one_entry_or_of_all(tmp_path):
    from safetensors.torch import save_file

    full = torch.arange(2 * 6 * 4, dtype=torch.float32).reshape(2, 6, 4)
    save_file({"gu": full, "gu_t": full.transpose(1, 2).contiguous()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    store = TensorStore(tmp_path)
    torch.testing.assert_close(store.read_part("gu", 1, 0, 3, 6), full[1, 3:6], rtol=0, atol=0)
    torch.testing.assert_close(store.read_part("gu", None, 1, 0, 3), full[:, 0:3], rtol=0, atol=0)
    torch.testing.assert_close(store.read_part("gu_t", 0, 1, 3, 6), full[0].T[:, 3:6], rtol=0, atol=0)
    with pytest.raises(CheckpointFormatError, match="entries along its first axis"):
        store.read_part("gu", 2, 0, 0, 3)
