"""The fields of an analysis config and the checks their ``__post_init__`` shares.

A leaf module (the standard library and :mod:`moelens.errors` only), so that a config, and the
command line's options derived from it, can be built without importing torch, pandas or numpy.
Values that numpy made (``np.int64``, ``np.bool_``) are accepted as their Python kind: numpy
registers its integers as :class:`numbers.Integral`, and a numpy bool can only exist once numpy is
imported, so it is looked up in :data:`sys.modules` instead of importing numpy here.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import sys
from dataclasses import field
from typing import Any, Callable, Mapping, Sequence

from moelens.errors import ConfigError

#: The largest seed: numpy's SeedSequence and torch's generators both take it.
MAX_SEED = 2**63 - 1

#: The dtypes a forward pass may run in: ``auto`` (float32 on the CPU, the checkpoint's own on CUDA) or one named.
FORWARD_DTYPES = ("auto", "float32", "bfloat16", "float16")

#: How a forward pass holds the model: ``auto`` (whole when it fits the device's memory, else one
#: decoder layer at a time), ``on`` (always layer by layer) or ``off`` (whole; refused up front when it
#: does not fit). Tables are the same either way.
STREAM_MODES = ("auto", "on", "off")


def stream_option() -> Any:
    """The ``stream`` field of every analysis that runs forward passes."""
    return option("auto", "auto | on | off: run the model layer by layer, one decoder layer's weights in memory at a time "
                  "(auto: when the whole model does not fit the device's memory; off: refuse such a model).",
                  changes_numbers=False, metavar="auto|on|off")


def check_stream(value: Any) -> str:
    if value not in STREAM_MODES:
        raise ConfigError(f"stream {value!r}: choose one of {', '.join(STREAM_MODES)}")
    return str(value)


def option(
    default: Any,
    help: str,
    *,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    changes_numbers: bool = True,
    recorded: bool = True,
    required: bool = False,
    cli: bool = True,
    kind: type | None = None,
) -> Any:
    """A config field with its documentation.

    ``help`` is the CLI help; ``parse`` turns the CLI's text into the field's value (e.g.
    ``"0,5,10-13"`` -> a tuple of layers), making the CLI option a string; a field that does not
    ``changes_numbers`` (beyond rounding: device, batch sizes, caches) may differ between a run and
    its resumption; a ``recorded`` field is written to the manifest's options as the config holds it
    unless the plan records a resolved value (``recorded=False``: the plan records it, or nothing
    does, e.g. a cache directory); a ``required`` field is an argument the Python function cannot
    do without (it has no default there; the config refuses its None); ``cli=False`` keeps a field out of the command line (an object
    only Python can pass); ``kind`` is the CLI value's type where the default does not tell it (a
    default of None). The field's flag is ``--<name>`` with ``-`` for ``_``
    (:func:`flag_name`)."""
    if kind is None and default is not None and parse is None:
        kind = type(default)
    return field(default=default, metadata={
        "help": help, "parse": parse, "metavar": metavar, "changes_numbers": changes_numbers, "recorded": recorded,
        "required": required, "cli": cli, "kind": kind,
    })


def is_integer(value: Any) -> bool:
    """An int or a numpy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not is_bool(value)


def is_bool(value: Any) -> bool:
    """A bool or a numpy bool."""
    np = sys.modules.get("numpy")
    return isinstance(value, bool) or (np is not None and isinstance(value, np.bool_))


def comma_names(text: str) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``: the CLI's comma-separated list of names."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def positive_int(value: Any, name: str, allow_none: bool = False) -> int | None:
    """``value`` as an int ≥ 1 (or None when ``allow_none``), else one line naming ``name``."""
    if value is None and allow_none:
        return None
    if not is_integer(value) or int(value) < 1:
        raise ConfigError(f"{name}={value!r}: give a whole number ≥ 1")
    return int(value)


def check_seed(seed: Any) -> int:
    """A seed is an integer in 0..2⁶³−1 (numpy refuses negative seeds)."""
    if not is_integer(seed):
        raise ConfigError(f"seed {seed!r} is not an integer; give a whole number ≥ 0")
    if not 0 <= int(seed) <= MAX_SEED:
        raise ConfigError(f"seed={seed} is outside 0..{MAX_SEED}; give a whole number ≥ 0")
    return int(seed)


def check_forward_dtype(value: Any) -> str:
    """A forward pass's ``dtype`` option: one of :data:`FORWARD_DTYPES`."""
    if value not in FORWARD_DTYPES:
        raise ConfigError(f"dtype {value!r}: choose one of {', '.join(FORWARD_DTYPES)}")
    return value


def name_tuple(value: Any, valid: Sequence[str], what: str, unknown: str = ":") -> tuple[str, ...] | None:
    """None, the CLI's ``"a,b"`` or any iterable of names -> a tuple of names of ``valid``, in the
    order given, each once (or None). A name not in ``valid`` is refused as ``{what} 'name'{unknown}
    choose from …`` (``unknown``: ``" is not a knockout site;"``, say), an empty list by name."""
    if value is None:
        return None
    names = comma_names(value) if isinstance(value, str) else tuple(value)
    bad = [n for n in names if n not in valid]
    if bad:
        raise ConfigError(f"{what} {bad[0]!r}{unknown} choose from {', '.join(valid)}")
    if not names:
        raise ConfigError(f"no {what}s given; name at least one")
    return tuple(dict.fromkeys(names))


def prompts_value(value: Any, missing: str, item: Callable[[Any], Any]) -> str | tuple[Any, ...]:
    """The ``prompts`` field: a path (kept as text, read when the analysis plans) or the prompts
    themselves, each passed through ``item``; None is refused with ``missing``."""
    if value is None:
        raise ConfigError(missing)
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    return tuple(item(p) for p in value)


def as_index_tuple(value: Any, what: str) -> tuple[int, ...] | None:
    """None, an int, ``"0,5,10-13"`` or any iterable of ints -> a tuple of ints (or None)."""
    from moelens.ranges import parse_ranges

    if value is None:
        return None
    if isinstance(value, str):
        items: Sequence[Any] = parse_ranges(value)
    elif is_integer(value):
        items = [value]
    else:
        try:
            items = list(value)
        except TypeError:
            raise ConfigError(f"{what} {value!r} is neither an index nor a list of indices") from None
    out = []
    for v in items:
        if not is_integer(v):
            raise ConfigError(f"{what} {v!r} is not an integer")
        out.append(int(v))
    return tuple(out)


def config_fields(config_type: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(config_type))


def flag_name(field_name: str) -> str:
    """The command line's flag of a config field: ``cache_dir`` -> ``--cache-dir``."""
    return "--" + field_name.replace("_", "-")


def resumable_fields(config_type: type) -> set[str]:
    """Fields a resumed run may change: those that do not change the numbers."""
    return {f.name for f in config_fields(config_type) if not f.metadata.get("changes_numbers", True)}


def recorded_fields(config_type: type) -> list[str]:
    """Fields the manifest's options hold as the config gives them (unless the plan resolves them)."""
    return [f.name for f in config_fields(config_type) if f.metadata.get("recorded", True)]


def cli_fields(config_type: type) -> list[dataclasses.Field]:
    """Fields the command line offers, each as :func:`flag_name`."""
    return [f for f in config_fields(config_type) if f.metadata.get("cli", True)]


def make_config(config_type: type, values: Mapping[str, Any]) -> Any:
    """Build a config from keyword values, naming an unknown keyword instead of a TypeError."""
    names = {f.name for f in config_fields(config_type)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}; {config_type.__name__} takes {', '.join(sorted(names))}")
    return config_type(**values)


__all__ = [
    "FORWARD_DTYPES", "MAX_SEED", "STREAM_MODES", "as_index_tuple", "check_forward_dtype", "check_seed", "check_stream", "cli_fields", "comma_names",
    "config_fields", "flag_name", "is_bool", "is_integer", "make_config", "name_tuple", "option", "positive_int", "recorded_fields",
    "resumable_fields", "stream_option",
]
