"""Where and in which precision spectral work runs.

``device="auto"`` picks the first CUDA device when one is available, else the CPU. Matrix
products run at full float32 precision whatever the process-wide setting: TF32 (the default of
some CUDA setups) keeps 10 mantissa bits, which would move projection energies by ~1e-3.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from moelens.choices import DEFAULT_DEVICE, check_compute_dtype
from moelens.errors import ConfigError

DTYPES = {"float32": torch.float32, "float64": torch.float64}  # the torch dtype of each of COMPUTE_DTYPES


def resolve_device(device: str | torch.device = DEFAULT_DEVICE) -> torch.device:
    """``"auto"`` -> ``cuda`` if available else ``cpu``; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` as given.

    Raises :class:`ConfigError` for a CUDA device that this machine does not have."""
    if isinstance(device, torch.device):
        device = str(device)
    text = str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} was asked for but torch sees no CUDA device; use --device cpu or auto")
        try:
            dev = torch.device(text)
        except RuntimeError:
            raise ConfigError(f"cannot read device {device!r}; write cpu, cuda, cuda:N or auto") from None
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r} does not exist: torch sees {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    raise ConfigError(f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N")


def resolve_dtype(dtype: str) -> torch.dtype:
    """``"float32"`` or ``"float64"`` -> the torch dtype; anything else is a :class:`ConfigError`."""
    return DTYPES[check_compute_dtype(dtype)]


@contextmanager
def full_precision() -> Iterator[None]:
    """Run the block with TF32 and reduced-precision matmul disabled, restoring the settings after."""
    old_precision = torch.get_float32_matmul_precision()
    old_matmul = torch.backends.cuda.matmul.allow_tf32
    old_cudnn = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old_precision)
        torch.backends.cuda.matmul.allow_tf32 = old_matmul
        torch.backends.cudnn.allow_tf32 = old_cudnn
