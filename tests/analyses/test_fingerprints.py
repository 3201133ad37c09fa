"""Resume and reuse by content: a run records digests of the tensors it read, and a checkpoint
whose bytes changed where the file fingerprint does not look (the middle of a large file) is
refused; so is a reused run of other weights and a merge-cost resume after its facts changed."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pandas as pd
import pytest

import moelens as ml
from moelens.analyses.calibration import calibrate
from moelens.analyses.clustering import cluster, merge_cost
from moelens.checkpoint import store as store_module
from moelens.errors import ConfigError, RunDirectoryError

from .synthetic import random_layers, write_from_tensors

# Files over 4 x 16 bytes are fingerprinted by size, first and last 16 bytes only: every test
# checkpoint becomes "large", and a change in its middle escapes the file fingerprint.
WINDOW = 16


class Killed(Exception):
    """Stands for the process dying at a chosen moment."""


def _kill_when(task: str, done: int):
    def callback(event):
        if event.task == task and event.done == done:
            raise Killed(f"{task} {done}")
    return callback


@pytest.fixture
def small_window(monkeypatch):
    monkeypatch.setattr(store_module, "SAMPLE_BYTES", WINDOW)


def _tensor_span(path: Path, name: str) -> tuple[int, int]:
    """Absolute byte range of tensor ``name``'s data in the safetensors file ``path``."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    lo, hi = header[name]["data_offsets"]
    return 8 + n + lo, 8 + n + hi


def _flip_middle_of(directory: Path, fragment: str) -> tuple[str, Path, int]:
    """Flip the sign bit of one float in the middle of the first tensor whose name holds
    ``fragment``, in place (size, head and tail of the file unchanged); return the tensor, the
    file and the byte offset changed."""
    for path in sorted(directory.glob("*.safetensors")):
        size = path.stat().st_size
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            names = [k for k in json.loads(fh.read(n)) if k != "__metadata__"]
        for name in sorted(names):
            if fragment not in name:
                continue
            lo, hi = _tensor_span(path, name)
            at = (lo + hi) // 2 // 4 * 4 + 3  # the high byte of a little-endian float32
            if 4 * WINDOW < at < size - 4 * WINDOW:
                with open(path, "r+b") as fh:
                    fh.seek(at)
                    byte = fh.read(1)[0]
                    fh.seek(at)
                    fh.write(bytes([byte ^ 0x80]))
                return name, path, at
    raise AssertionError(f"no tensor with {fragment!r} in the middle of a file of {directory}")


def _flip_back(path: Path, at: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)[0]
        fh.seek(at)
        fh.write(bytes([byte ^ 0x80]))


# ----------------------------------------------------------------------------------------------
# The tensor store
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("index, part", [(None, None), (3, None), (slice(2, 5), None), (slice(None, 4), None), (1, (1, 0, 8)), (None, (0, 2, 6))])
def test_read_keys_round_trip(index, part):
    key = store_module.read_key("model.layers.0.mlp.experts.gate_up_proj", index, part)
    assert store_module.parse_read_key(key) == ("model.layers.0.mlp.experts.gate_up_proj", index, part)


def test_a_hugging_face_blob_is_fingerprinted_by_its_name(tmp_path):
    import hashlib

    content = b"x" * 1000
    digest = hashlib.sha256(content).hexdigest()
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / digest).write_bytes(content)
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "model.safetensors").symlink_to(tmp_path / "blobs" / digest)
    assert store_module.fingerprint_file(tmp_path / "snap" / "model.safetensors") == f"sha256:{digest}"
    # the same as hashing the content whole: a blob and a plain copy of it agree
    (tmp_path / "copy.safetensors").write_bytes(content)
    assert store_module.fingerprint_file(tmp_path / "copy.safetensors", whole=True) == f"sha256:{digest}"


# ----------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def three_layers(tmp_path_factory):
    routers, experts = random_layers(3, 5, 16, 24, seed=7)
    return write_from_tensors(tmp_path_factory.mktemp("ckpt") / "three", "mixtral", routers, experts)


def test_resume_refuses_a_checkpoint_changed_in_the_middle_and_accepts_the_same_bytes(three_layers, tmp_path, small_window):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(three_layers, ckpt)
    opts = {"matrix": "all", "shuffles": 5, "cache": False}
    full = ml.router_alignment(ckpt, **opts)
    out = tmp_path / "run"
    with pytest.raises(Killed):
        ml.router_alignment(ckpt, out=out, progress=_kill_when("layers", 2), **opts)
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(h.startswith("sha256-sampled:") for f, h in manifest["inputs"]["a"]["files"].items() if f.endswith(".safetensors"))
    recorded = manifest["read_digests"]["a"]
    assert any(k.startswith("model.layers.0.") for k in recorded) and all(v.startswith("sha256-128:") for v in recorded.values())
    before = dict(manifest["inputs"]["a"]["files"])

    name, path, at = _flip_middle_of(ckpt, "layers.0.block_sparse_moe.experts.")
    assert ml.open_model(ckpt).file_hashes() == before  # the file fingerprint cannot see it
    with pytest.raises(RunDirectoryError) as err:
        ml.router_alignment(ckpt, out=out, **opts)
    message = str(err.value)
    assert "\n" not in message and name in message and "--out" in message
    assert json.loads((out / "manifest.json").read_text())["completed_units"] == ["L00000", "L00001"]

    _flip_back(path, at)
    resumed = ml.router_alignment(ckpt, out=out, **opts)
    assert resumed.manifest["status"] == "complete"
    for table in full.tables:
        pd.testing.assert_frame_equal(full[table], resumed[table])


def test_a_change_in_a_layer_no_finished_unit_read_does_not_block_the_resume(three_layers, tmp_path, small_window):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(three_layers, ckpt)
    out = tmp_path / "run"
    with pytest.raises(Killed):
        ml.router_alignment(ckpt, out=out, layers=[0, 1], cache=False, shuffles=5, progress=_kill_when("layers", 1))
    assert not any(".layers.1." in k for k in json.loads((out / "manifest.json").read_text())["read_digests"]["a"])
    _flip_middle_of(ckpt, "layers.1.block_sparse_moe.experts.")
    resumed = ml.router_alignment(ckpt, out=out, layers=[0, 1], cache=False, shuffles=5)
    fresh = ml.router_alignment(ckpt, layers=[0, 1], cache=False, shuffles=5)
    pd.testing.assert_frame_equal(resumed["alignment"], fresh["alignment"])


# ----------------------------------------------------------------------------------------------
# Reuse: a calibration of model A given to cluster model B; merge-cost resumed after an edit
# ----------------------------------------------------------------------------------------------
def test_a_calibration_of_other_weights_is_refused_even_where_only_the_middle_differs(lm_dir, lm_files, tmp_path, small_window):
    cal = tmp_path / "cal"
    calibrate(lm_dir, lm_files["text"], out=cal)
    files_a = json.loads((cal / "manifest.json").read_text())["inputs"]["a"]["files"]
    assert not any(h.startswith("sha256-sampled:") for h in files_a.values())  # a forward pass reads every byte
    twin = tmp_path / "twin"
    shutil.copytree(lm_dir, twin)
    name, path, at = _flip_middle_of(twin, "experts.")
    with pytest.raises(ConfigError, match="was made from") as err:
        cluster(twin, cal, method="m-smoe", groups=3, out=tmp_path / "never")
    assert "\n" not in str(err.value) and path.name in str(err.value)
    assert not (tmp_path / "never").exists()
    _flip_back(path, at)
    assert cluster(twin, cal, method="m-smoe", groups=3)["clusters"].shape[0] > 0


def test_merge_cost_resumed_after_its_facts_changed_is_refused(lm_dir, lm_files, tmp_path):
    run = cluster(lm_dir, lm_files["text"], method="m-smoe", groups=3, out=tmp_path / "m")
    facts = tmp_path / "facts.jsonl"
    shutil.copy(lm_files["facts"], facts)
    out = tmp_path / "cost"
    with pytest.raises(Killed):
        merge_cost(lm_dir, [run.path], facts=facts, out=out, permute="off", progress=_kill_when("variants", 1))
    assert json.loads((out / "manifest.json").read_text())["completed_units"] == ["original"]
    records = [json.loads(line) for line in facts.read_text().splitlines()]
    records[0]["target"] = records[1]["target"]
    facts.write_text("".join(json.dumps(r) + "\n" for r in records))  # same path, other content
    with pytest.raises(RunDirectoryError, match="facts_sha256") as err:
        merge_cost(lm_dir, [run.path], facts=facts, out=out, permute="off")
    assert "\n" not in str(err.value)
    shutil.copy(lm_files["facts"], facts)
    done = merge_cost(lm_dir, [run.path], facts=facts, out=out, permute="off")
    assert done["merge_cost"]["variant"].tolist() == ["original", "00-m-smoe"]


def test_atlas_does_not_reuse_a_finished_run_whose_weights_changed_in_the_middle(three_layers, tmp_path, small_window):
    from moelens.atlas import _finished

    ckpt = tmp_path / "ckpt"
    shutil.copytree(three_layers, ckpt)
    out = tmp_path / "run"
    ml.router_alignment(ckpt, out=out, layers=[0], cache=False, shuffles=5)
    assert _finished(out) is not None
    _, path, at = _flip_middle_of(ckpt, "layers.0.block_sparse_moe.experts.")
    assert _finished(out) is None
    with pytest.raises(RunDirectoryError, match="other"):
        ml.router_alignment(ckpt, out=out, layers=[0], cache=False, shuffles=5)
    _flip_back(path, at)
    assert _finished(out) is not None


def test_a_calibration_resumed_on_weights_changed_in_the_middle_is_refused_naming_the_file(lm_dir, lm_files, tmp_path, small_window):
    model = tmp_path / "model"
    shutil.copytree(lm_dir, model)
    out = tmp_path / "cal"
    with pytest.raises(Killed):
        calibrate(model, lm_files["text"], out=out, progress=_kill_when("layers", 1))
    assert json.loads((out / "manifest.json").read_text())["completed_units"]
    _, path, at = _flip_middle_of(model, "experts.")
    with pytest.raises(RunDirectoryError) as err:
        calibrate(model, lm_files["text"], out=out)
    assert "\n" not in str(err.value) and path.name in str(err.value) and "--out" in str(err.value)
    _flip_back(path, at)
    assert calibrate(model, lm_files["text"], out=out).manifest["status"] == "complete"
