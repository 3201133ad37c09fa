"""Lazy access to the tensors of a safetensors checkpoint.

Opening a store reads the index and every file's header (a few KB each) and validates them:
a shard the index names but that is missing, a header that is not JSON, or a file shorter than
its header promises is reported at once. Tensor data is read only when asked for, by memory
mapping, and a fused expert tensor can be read one expert (a slice of the first axis) at a time.

Quantised tensors are dequantised on read, transparently, under the name of the weight:
- FP8 e4m3 with ``<name>_scale_inv`` of shape [ceil(out/b), ceil(in/b)] (DeepSeek-V3, b = 128):
  W = W_fp8 * scale_inv broadcast over b x b blocks;
- MXFP4 ``<name>_blocks`` (U8 [..., rows, cols/32, 16]) and ``<name>_scales`` (U8 [..., rows,
  cols/32]) (GPT-OSS): each byte holds two FP4 (e2m1) values, low nibble first, and each block
  of 32 values shares the exponent ``scale - 127``. The result has shape [..., rows, cols],
  blocks running along cols. The blocks follow the reduction axis, so for GPT-OSS this is
  [E, out, in], the transpose of the unquantised tensor of the same name: the family adapter,
  not the store, knows that (transformers transposes after dequantising).

What was read is fingerprinted by content: the first time a tensor (or one entry or part of it)
is read, its raw bytes as stored are hashed (SHA-256, cut to 128 bits) under a key that says what was
read (:func:`read_key`). The digests go to a log that the runner collects per unit
(:func:`take_read_digests`) and records in the run's manifest, and :meth:`TensorStore.verify_reads`
reads and hashes them again to tell whether a checkpoint still holds the bytes a run was made of.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from moelens.errors import CheckpointFormatError, ConfigError

if TYPE_CHECKING:  # torch is imported where tensors are made, not when a family is listed
    import torch

INDEX_NAME = "model.safetensors.index.json"

# e2m1 code points, index = 4-bit code (sign bit is the high bit of the nibble).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

#: A file larger than ``4 * SAMPLE_BYTES`` is fingerprinted by its size, first and last
#: ``SAMPLE_BYTES`` (unless hashed whole); what lies between is covered by the read digests.
SAMPLE_BYTES = 1 << 20

#: Digests of what this process read, per checkpoint directory, not yet collected.
_READ_LOG: dict[str, dict[str, str]] = {}

_KEY = re.compile(r"^(?P<name>.+?)(?:\[(?P<index>\d+|\d*:\d*)\])?(?:@(?P<axis>\d+):(?P<start>\d+):(?P<stop>\d+))?$")

_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E8M0": 1,
}


@dataclass(frozen=True)
class TensorInfo:
    """What a file header says about one tensor."""

    name: str
    file: Path
    dtype: str  # safetensors spelling: "BF16", "F32", "F8_E4M3", "U8", ...
    shape: tuple[int, ...]
    nbytes: int


def read_key(name: str, index: int | slice | None = None, part: tuple[int, int, int] | None = None) -> str:
    """What a read covered, as a string: ``name``, ``name[3]`` (one entry of the first axis),
    ``name[2:5]`` (entries), and ``@axis:start:stop`` when only that part was read."""
    key = name
    if isinstance(index, slice):
        key += f"[{'' if index.start is None else index.start}:{'' if index.stop is None else index.stop}]"
    elif index is not None:
        key += f"[{int(index)}]"
    if part is not None:
        key += "@{}:{}:{}".format(*part)
    return key


def parse_read_key(key: str) -> tuple[str, int | slice | None, tuple[int, int, int] | None]:
    """The inverse of :func:`read_key`."""
    m = _KEY.match(key)
    if m is None:
        raise ValueError(key)
    index: int | slice | None = None
    if m["index"] is not None:
        if ":" in m["index"]:
            a, b = m["index"].split(":")
            index = slice(int(a) if a else None, int(b) if b else None)
        else:
            index = int(m["index"])
    part = (int(m["axis"]), int(m["start"]), int(m["stop"])) if m["axis"] is not None else None
    return m["name"], index, part


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes (as stored: bf16 and fp8 bytes are hashed as such), its
    first 128 bits in hex. SHA-256 rather than BLAKE2b: with the SHA extensions of current x86
    and ARM cores it hashes about 2.4 times faster (``benchmarks/fingerprint.py``)."""
    import torch

    h = hashlib.sha256()
    t = t.detach().contiguous()
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return f"sha256-128:{h.hexdigest()[:32]}"


def take_read_digests() -> dict[str, dict[str, str]]:
    """The digests read since the last call, per checkpoint directory; the log is emptied."""
    out = {d: dict(v) for d, v in _READ_LOG.items() if v}
    _READ_LOG.clear()
    return out


def read_header(path: Path) -> dict[str, Any]:
    """Parse and validate a safetensors header: 8-byte little-endian length, then JSON.

    Raises :class:`CheckpointFormatError` for a truncated or corrupt file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointFormatError(f"{path} is truncated ({size} bytes): not a safetensors file; re-download it")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointFormatError(
                    f"{path} is corrupt or truncated: its header claims {n} bytes but the file has {size}; re-download it"
                )
            raw = fh.read(n)
    except OSError as exc:
        raise CheckpointFormatError(f"cannot read {path}: {exc.strerror}") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointFormatError(f"{path} has a corrupt header (not JSON): not a valid safetensors file; re-download it") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path} has a corrupt header: not a valid safetensors file; re-download it")
    data_len = size - 8 - n
    end = 0
    for name, meta in header.items():
        if name != "__metadata__":
            end = max(end, _check_entry(path, name, meta))
    if end > data_len:
        raise CheckpointFormatError(
            f"{path} is truncated: its tensors need {end} data bytes but the file holds {data_len}; re-download it"
        )
    return header


def _check_entry(path: Path, name: str, meta: Any) -> int:
    """Validate one header entry (dtype known, shape of non-negative ints, data_offsets whose span
    is exactly the tensor's size) and return where its data ends."""

    def corrupt(why: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"{path} has a corrupt header entry for {name!r} ({why}); re-download it")

    if not isinstance(meta, dict):
        raise corrupt("not an object")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if dtype not in _DTYPE_BYTES:
        raise corrupt(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise corrupt(f"shape {shape!r} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise corrupt(f"data_offsets {offsets!r} are not two increasing offsets")
    if offsets[1] - offsets[0] != math.prod(shape) * _DTYPE_BYTES[dtype]:
        raise corrupt(f"{offsets[1] - offsets[0]} bytes for a {dtype} tensor of shape {shape}")
    return offsets[1]


class TensorStore:
    """Every tensor of a checkpoint directory, by name, read lazily."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.files = self._list_files()
        self.infos: dict[str, TensorInfo] = {}
        for file in self.files:
            header = read_header(file)
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                shape = tuple(int(s) for s in meta["shape"])
                lo, hi = meta["data_offsets"]
                self.infos[name] = TensorInfo(name, file, meta["dtype"], shape, hi - lo)
        self._check_index_names()
        self._handles: dict[Path, Any] = {}
        self._digests: dict[str, str] = {}

    # -- discovery ---------------------------------------------------------------------------
    def _list_files(self) -> list[Path]:
        index = self.directory / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                    raise TypeError
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
                raise CheckpointFormatError(
                    f"{index} is not a valid safetensors index (expected a 'weight_map' of tensor name -> shard file); re-download it"
                ) from None
            self._index_map = dict(weight_map)
            files = []
            for shard in sorted(set(weight_map.values())):
                path = self.directory / shard
                if not path.is_file():
                    raise CheckpointFormatError(
                        f"shard {shard} named by {INDEX_NAME} is missing from {self.directory}; download every shard"
                    )
                files.append(path)
            return files
        self._index_map = {}
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise CheckpointFormatError(
                f"{self.directory} has no *.safetensors files; moelens reads safetensors checkpoints only "
                "(convert .bin/.pt weights with transformers' save_pretrained)"
            )
        return files

    def _check_index_names(self) -> None:
        for name, shard in self._index_map.items():
            info = self.infos.get(name)
            if info is None:
                raise CheckpointFormatError(
                    f"{INDEX_NAME} places {name!r} in {shard}, but that file has no such tensor; the shard is corrupt or stale"
                )

    # -- queries -------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.infos or f"{name}_blocks" in self.infos

    def names(self) -> list[str]:
        return list(self.infos)

    def shape(self, name: str) -> tuple[int, ...]:
        """Logical shape (after dequantisation) of a tensor."""
        if name in self.infos:
            return self.infos[name].shape
        if f"{name}_blocks" in self.infos:
            *lead, rows, nblocks, bsize = self.infos[f"{name}_blocks"].shape
            return (*lead, rows, nblocks * bsize * 2)
        raise self._missing(name)

    def dtype(self, name: str) -> str:
        if name in self.infos:
            return self.infos[name].dtype
        if f"{name}_blocks" in self.infos:
            return "MXFP4"
        raise self._missing(name)

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def _missing(self, name: str) -> CheckpointFormatError:
        return CheckpointFormatError(
            f"tensor {name!r} is missing from {self.directory}; the checkpoint is incomplete or not the layout its config names"
        )

    def _handle(self, file: Path):
        from safetensors import safe_open

        h = self._handles.get(file)
        if h is None:
            try:
                h = safe_open(str(file), framework="pt")
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointFormatError(f"cannot open {file}: {exc}; re-download it") from None
            self._handles[file] = h
        return h

    def release(self) -> None:
        """Close the open files: their memory maps go, and with them the pages read through them,
        which otherwise count as the process's resident memory until the kernel reclaims them. The
        next read opens the file again (a header parse, milliseconds)."""
        self._handles.clear()

    # -- reads -----------------------------------------------------------------------------------
    def read(self, name: str, index: int | slice | None = None) -> torch.Tensor:
        """Read a tensor, or ``tensor[index]`` along its first axis, dequantised if stored so.

        Only the bytes of the requested slice are copied out of the memory map."""
        if name in self.infos:
            info = self.infos[name]
            t = self._raw(info, index)
            scale_name = f"{name}_scale_inv"
            if info.dtype.startswith("F8") and scale_name in self.infos:
                scale = self._raw(self.infos[scale_name], index)
                t = dequantize_fp8_blocks(t, scale)
            return t
        if f"{name}_blocks" in self.infos:
            blocks = self._raw(self.infos[f"{name}_blocks"], index)
            scales = self._raw(self.infos[f"{name}_scales"], index)
            return dequantize_mxfp4(blocks, scales)
        raise self._missing(name)

    def read_part(self, name: str, index: int | None, axis: int, start: int, stop: int) -> torch.Tensor:
        """``read(name, index)`` narrowed to ``[start:stop]`` along ``axis`` of the result.

        For a plain (unquantised) tensor only those bytes are read: one role out of a fused
        gate_up tensor costs half the I/O of the whole. Quantised tensors are read whole and
        narrowed, since their scales cover blocks across the cut."""
        info = self.infos.get(name)
        if info is None or info.dtype.startswith("F8") or index is not None and not 0 <= index < info.shape[0]:
            return self.read(name, index).narrow(axis, start, stop - start)
        # ``axis`` counts in the result, which has no entry axis when one entry is read
        lead = (slice(index, index + 1),) if index is not None else ()
        key = lead + (slice(None),) * axis + (slice(start, stop),)
        try:
            t = self._handle(info.file).get_slice(info.name)[key]
        except Exception as exc:
            raise CheckpointFormatError(f"cannot read {info.name!r} from {info.file}: {exc}; the file may be corrupt") from None
        self._note(read_key(info.name, index, (axis, start, stop)), t)
        return t[0] if index is not None else t

    def _note(self, key: str, t: torch.Tensor) -> None:
        """Hash what was just read, the first time it is read."""
        if key not in self._digests:
            digest = self._digests[key] = tensor_digest(t)
            _READ_LOG.setdefault(str(self.directory), {})[key] = digest

    def _raw(self, info: TensorInfo, index: int | slice | None) -> torch.Tensor:
        t = self._raw_unhashed(info, index)
        self._note(read_key(info.name, index), t)
        return t

    def _raw_unhashed(self, info: TensorInfo, index: int | slice | None) -> torch.Tensor:
        try:
            h = self._handle(info.file)
            if index is None:
                return h.get_tensor(info.name)
            sl = h.get_slice(info.name)
            if isinstance(index, int):
                if not 0 <= index < info.shape[0]:
                    # the caller checked the index against the router: the files disagree
                    raise CheckpointFormatError(
                        f"{info.name!r} in {info.file.name} holds {info.shape[0]} entries along its first axis, "
                        f"but entry {index} was asked for; the checkpoint's tensors disagree with each other"
                    )
                return sl[index : index + 1][0]
            return sl[index]
        except CheckpointFormatError:
            raise
        except Exception as exc:
            raise CheckpointFormatError(f"cannot read {info.name!r} from {info.file}: {exc}; the file may be corrupt") from None

    def verify_reads(self, recorded: Mapping[str, str], trusted_files: Iterable[str] = ()) -> str:
        """Read and hash again what ``recorded`` (read key -> digest) says was read; return a
        line naming the first tensor whose bytes differ or that is gone ("" when all match).

        Tensors in ``trusted_files`` (file names whose whole content is already known to be the
        same, e.g. by their full hash) are not read again."""
        trusted = set(trusted_files)
        for key, digest in recorded.items():
            try:
                name, index, part = parse_read_key(key)
            except ValueError:
                return f"the recorded read {key!r} is not a tensor read"
            info = self.infos.get(name)
            if info is None:
                return f"tensor {name!r} is no longer in {self.directory}"
            if info.file.name in trusted:
                continue
            if part is None:
                t = self._raw_unhashed(info, index)
            else:
                axis, start, stop = part
                lead = (slice(index, index + 1),) if isinstance(index, int) else ()
                t = self._handle(info.file).get_slice(info.name)[lead + (slice(None),) * axis + (slice(start, stop),)]
                t = t[0] if isinstance(index, int) else t
            if tensor_digest(t) != digest:
                return f"tensor {key} in {info.file.name} holds other bytes than when the run read it"
        return ""

    def file_hashes(self, algorithm: str = "sha256", max_bytes: int | None = None, whole_files: Iterable[str] = ()) -> dict[str, str]:
        """Content hashes of the config and weight files, for a run's manifest.

        A checkpoint of hundreds of GB cannot be hashed on every run, so by default a file is
        fingerprinted by its size, its header and its first and last MiB (the tensors a run reads
        are fingerprinted as they are read); ``max_bytes=-1`` hashes whole files, and so does
        naming them in ``whole_files``. A file in the Hugging Face cache is a link to
        ``blobs/<sha256 of its content>``: that name is its whole hash, known without reading."""
        out: dict[str, str] = {}
        whole = set(whole_files)
        paths = [p for p in (self.directory / "config.json", self.directory / INDEX_NAME) if p.is_file()] + self.files
        for p in paths:
            out[p.name] = fingerprint_file(p, algorithm, whole=max_bytes == -1 or p.name in whole)
        return out


def is_sampled(fingerprint: str) -> bool:
    """Whether a :func:`fingerprint_file` value covers only part of the file."""
    return fingerprint.split(":", 1)[0].endswith("-sampled")


def hub_blob_sha256(path: Path) -> str | None:
    """The SHA-256 of a Hugging Face cache file, from its blob's name (``blobs/<64 hex>``: the
    hub stores large files under their content's SHA-256), or None for other files."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    name = target.name
    if target.parent.name == "blobs" and len(name) == 64 and all(c in "0123456789abcdef" for c in name):
        return name
    return None


def fingerprint_file(path: Path, algorithm: str = "sha256", whole: bool = False, chunk: int | None = None) -> str:
    """Hash of a file: whole, or of (size, first ``chunk``, last ``chunk``) for large files
    (``chunk`` = :data:`SAMPLE_BYTES` by default). A Hugging Face cache blob gives its SHA-256
    whole, by name."""
    chunk = SAMPLE_BYTES if chunk is None else chunk
    if algorithm == "sha256":
        blob = hub_blob_sha256(path)
        if blob is not None:
            return f"sha256:{blob}"
    h = hashlib.new(algorithm)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if whole or size <= 4 * chunk:
            for block in iter(lambda: fh.read(chunk), b""):
                h.update(block)
            return f"{algorithm}:{h.hexdigest()}"
        h.update(str(size).encode())
        h.update(fh.read(chunk))
        fh.seek(size - chunk)
        h.update(fh.read(chunk))
    return f"{algorithm}-sampled:{h.hexdigest()}"


def dequantize_fp8_blocks(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None = None
) -> torch.Tensor:
    """W[r, c] = W_fp8[r, c] * scale_inv[r // b_r, c // b_c]; works on [out, in] or with a
    leading batch axis.

    ``block`` is the config's ``weight_block_size`` (128 x 128 for DeepSeek-V3). Without it the
    block is inferred as the smallest power of two covering ``ceil(out / scale rows)``: the last
    block of a dimension may be partial (DeepSeek-V3's ``kv_a_proj_with_mqa`` has 576 rows = 4.5
    blocks), so plain ``ceil(576 / 5) = 116`` would be wrong."""
    out_dim, in_dim = weight.shape[-2:]
    if block is None:
        block = (_pow2_at_least(math.ceil(out_dim / scale_inv.shape[-2])), _pow2_at_least(math.ceil(in_dim / scale_inv.shape[-1])))
    b_r, b_c = block
    s = scale_inv.float().repeat_interleave(b_r, dim=-2)[..., :out_dim, :]
    s = s.repeat_interleave(b_c, dim=-1)[..., :in_dim]
    return weight.float() * s


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 -> float32. blocks U8 [..., rows, G, 16], scales U8 [..., rows, G] -> [..., rows, G*32]."""
    import torch

    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    blocks = blocks.to(torch.uint8)
    lo = (blocks & 0x0F).long()
    hi = (blocks >> 4).long()
    vals = torch.stack((lut[lo], lut[hi]), dim=-1).flatten(-2)  # [..., rows, G, 32], low nibble first
    exp = scales.to(torch.int32) - 127
    vals = torch.ldexp(vals, exp.unsqueeze(-1).to(torch.float32))
    return vals.flatten(-2)


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float -> MXFP4, the inverse of :func:`dequantize_mxfp4`: [..., rows, cols] -> blocks U8
    [..., rows, cols/32, 16] and scales U8 [..., rows, cols/32], blocks of 32 along the last axis.

    Each block's scale is the smallest power of two 2^k with max|w| / 2^k <= 6 (so nothing is
    clipped, as the reference GPT-OSS quantiser rounds its scales up), and each value is rounded
    to the nearest e2m1 code point, ties to the even code. The error of one value is then at most
    max(2^k, |w|) / 4. Used to write quantised test checkpoints; moelens itself only reads."""
    import torch

    *lead, rows, cols = weight.shape
    if cols % 32:
        raise ConfigError(f"MXFP4 packs blocks of 32 values along the last axis, which has {cols}; pad it to a multiple of 32")
    w = weight.detach().float().contiguous().reshape(*lead, rows, cols // 32, 32)
    amax = w.abs().amax(dim=-1)
    mantissa, exponent = torch.frexp(amax / 6.0)  # amax/6 = m * 2^e with m in [0.5, 1)
    k = torch.where(mantissa == 0.5, exponent - 1, exponent)  # ceil(log2(amax / 6))
    k = torch.where(amax > 0, k, torch.full_like(k, -127)).clamp(-127, 127)
    scaled = torch.ldexp(w, (-k).unsqueeze(-1).float())
    grid = torch.tensor(FP4_VALUES[:8], dtype=torch.float32)
    mag = scaled.abs().clamp(max=6.0)
    upper = torch.bucketize(mag, grid).clamp(max=7)  # first code point >= mag
    lower = (upper - 1).clamp(min=0)
    d_up, d_low = grid[upper] - mag, mag - grid[lower]
    take_upper = (d_up < d_low) | ((d_up == d_low) & (upper % 2 == 0))
    codes = torch.where(take_upper, upper, lower) | (torch.signbit(scaled).long() << 3)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)  # low nibble first
    scales = (k + 127).to(torch.uint8)
    return blocks, scales
