"""The values an option may take, shared by the analysis configs and the numerics that use them.

A leaf module (it imports only :mod:`moelens.errors`): a config checks its options against these
names, and the command line shows them, without importing torch; the modules that compute with
an option (``spectral``, ``metrics``, ``runtime.trace``, ``merge``, ``calibration``) import the
same names from here, so each list is written once.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence

from moelens.errors import ConfigError

# --- where tensors live (moelens.spectral.device) ------------------------------------------------
DEFAULT_DEVICE = "auto"
#: The devices a --device option takes, as its help says them.
DEVICE_HELP = "auto, cpu, cuda or cuda:N"

# --- spectral ----------------------------------------------------------------------------------
#: Decompositions and the arithmetic they run in (moelens.spectral).
SPECTRAL_METHODS = ("eigh", "svd")
COMPUTE_DTYPES = ("float32", "float64")


def check_compute_dtype(dtype: str) -> str:
    """``"float32"`` or ``"float64"``; anything else is a :class:`ConfigError`."""
    if not isinstance(dtype, str) or dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"unknown compute dtype {dtype!r}; expected {' or '.join(COMPUTE_DTYPES)}")
    return dtype


# --- expert distance (moelens.metrics.expert_distance) -----------------------------------------
POOLS = ("mean", "ito")
#: sv_align keeps σ_i ≥ γ·σ_1 of each matrix unless a fixed top-n is asked for.
DEFAULT_GAMMA = 0.3


def check_options(gamma: float, top_sv: int | None, shape: Sequence[int] | None = None) -> None:
    """Raise :class:`ConfigError` unless 0 < γ ≤ 1 and 1 ≤ top_sv ≤ min(out, in)."""
    if isinstance(gamma, bool) or not (isinstance(gamma, numbers.Real) and 0.0 < float(gamma) <= 1.0):
        raise ConfigError(f"gamma must lie in (0, 1], got {gamma!r}; the default {DEFAULT_GAMMA} keeps σ_i ≥ {DEFAULT_GAMMA}·σ_1")
    if top_sv is None:
        return
    if isinstance(top_sv, bool) or not isinstance(top_sv, numbers.Integral) or top_sv < 1:
        raise ConfigError(f"top_sv must be an integer ≥ 1, got {top_sv!r}; or leave it unset to cut at gamma")
    if shape is not None and int(top_sv) > min(int(shape[0]), int(shape[1])):
        raise ConfigError(
            f"top_sv = {top_sv} exceeds min(rows, cols) = {min(int(shape[0]), int(shape[1]))} of the "
            f"{int(shape[0])}×{int(shape[1])} matrices; choose top_sv ≤ {min(int(shape[0]), int(shape[1]))}"
        )


# --- module metrics (moelens.metrics.module) ---------------------------------------------------
PAIR_METRICS = ("corr", "cos", "rel_l2", "cka", "changed_frac")
SINGLE_METRICS = ("fro_norm", "spectral_norm", "stable_rank", "effective_rank", "alpha")
METRIC_KINDS = {"pair": PAIR_METRICS, "single": SINGLE_METRICS}


def check_metric_names(names: str | Iterable[str], kind: str) -> tuple[str, ...]:
    """The metric names of ``kind`` ("pair" or "single") asked for, in the canonical order of
    :data:`PAIR_METRICS` / :data:`SINGLE_METRICS`, duplicates dropped. ``names`` is an iterable
    or one comma-separated string. Raises :class:`ConfigError` for an unknown or empty set."""
    if kind not in METRIC_KINDS:
        raise ConfigError(f"unknown metric kind {kind!r}; expected one of {', '.join(METRIC_KINDS)}")
    known = METRIC_KINDS[kind]
    asked = [str(n).strip() for n in (names.split(",") if isinstance(names, str) else names)]
    asked = [n for n in asked if n]
    for n in asked:
        if n not in known:
            other = "single" if kind == "pair" else "pair"
            hint = f" ({n!r} is a {other} metric)" if n in METRIC_KINDS[other] else ""
            raise ConfigError(f"unknown {kind} metric {n!r}{hint}; expected some of {', '.join(known)}")
    if not asked:
        raise ConfigError(f"no {kind} metric asked for; choose some of {', '.join(known)}")
    return tuple(n for n in known if n in asked)


# --- interventions (moelens.runtime.trace) -----------------------------------------------------
MODES = ("knockout", "restore", "block")
KNOCKOUT_SITES = ("subj", "attn", "last", "router", "moe")
RESTORE_SITES = ("restore_hidden", "restore_mlp", "restore_attn")
BLOCK_SITES = ("block_subj", "block_nonsubj", "block_last")
SITES = {"knockout": KNOCKOUT_SITES, "restore": RESTORE_SITES, "block": BLOCK_SITES}
DEFAULT_SITES = {"knockout": ("subj", "attn", "last"), "restore": RESTORE_SITES, "block": BLOCK_SITES}
DEFAULT_WINDOW = {"knockout": 1, "restore": 10, "block": 9}
#: Knockout sites every model has (the default); an MoE model adds router and moe.
DENSE_KNOCKOUT_SITES = DEFAULT_SITES["knockout"]
#: ROME's token groups (Meng et al. 2022, Fig. 1), plus the tokens before the subject, in ROME's order.
TOKEN_KINDS = ("before_subject", "first_subject", "middle_subject", "last_subject", "first_after", "further", "last")
ABLATIONS = ("mean", "zero")
NOISE_SAMPLES = 10
NOISE_SCALES = ("embedding", "subject")  # or a positive number: the std itself
NOISE_DRAWS = ("per-prompt", "shared")

# --- calibration and clustering (moelens.calibration, moelens.metrics.clustering) --------------
DEFAULT_MAX_TOKENS = 65_536
LINKAGES = ("average", "single", "complete", "ward")
DISTANCES = ("euclidean", "cosine")

# --- merged checkpoints (moelens.merge.export) -------------------------------------------------
EXPORTS = ("compact", "shared")
