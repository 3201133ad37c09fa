"""Every analysis of a model (and its fine-tune) in one call, and one report of them all.

``atlas(model, out, tuned=B | base=A, prompts=..., calibration=...)`` runs each analysis that
applies, with its defaults, as its own run under ``out/runs/`` (a finished run is read back, an
unfinished one resumed), then writes ``out/report.html`` (one table of contents, a first screen
with one line of numbers per analysis, a "how to reproduce" box) and every figure of the report
as PNG and SVG under ``out/figures/``, named after the figure (and its run, layer or option).

| analysis                | when                                    | runs                                 |
|-------------------------|-----------------------------------------|--------------------------------------|
| router alignment        | MoE models                              | ``alignment-<model>`` per model       |
| expert distance         | MoE models                              | ``distance-base-tuned`` (two models), ``distance-within`` |
| module metrics          | always                                  | ``modules`` (A vs B, or one model)    |
| interventions           | prompts given, or a zoo model           | ``trace-block-<model>`` (attention knockout, seed 003), ``trace-knockout-<model>`` per model; ``trace-restore-<first model>`` |
| router edits            | MoE models with prompts                 | ``route-<first model>`` on the first :data:`ROUTE_PROMPTS` prompts |
| clustering and merging  | MoE models with calibration text        | ``cluster-hc-smoe``, ``cluster-m-smoe``, their distances, ``merge-cost`` |
| router norms            | MoE models                              | ``router-norms-<model>`` per model    |

Each analysis's declaration names what the atlas runs of it (``atlas``: a function of
:class:`AtlasInputs` returning :class:`Call` s); the real call and its reproduce command are both
made from the call by :func:`step_of`.

The runs go to worker processes, several at once on the CPU (``jobs``, :mod:`moelens.atlas_pool`),
each run written by one of them; the parent reads the finished runs and writes the report.

``--base A`` means MODEL is the fine-tune and A its base; ``--tuned B`` that MODEL is the base
and B its fine-tune. A dense model gets module metrics and interventions, and a note on what was
skipped and why. A zoo model (a checkpoint inside a directory built by ``moelens zoo build``)
brings its own ``facts.jsonl`` and ``calibration.txt``.

Interventions: the seed-003 figure is attention knockout (``--mode block``), over a window of
round(9/48 × layers) layers (Geva et al. block 9 of GPT-2 XL's 48; at least 1); mean knockout
of every site is drawn beside it; causal tracing (restore) runs on the first model only, on its
first ``restore_limit`` prompts (default :data:`RESTORE_PROMPTS`; 0 skips it), since each prompt
costs some 13 times a block prompt (12-layer zoo, measured).

Router edits run on the first model only, on its first :data:`ROUTE_PROMPTS` prompts (or fewer
with ``--trace-limit``): every prompt is run once per (layer, expert, edit, k, sample), some 180
times per layer with the defaults.
"""

from __future__ import annotations

import inspect
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moelens.choices import DEFAULT_DEVICE, DENSE_KNOCKOUT_SITES, KNOCKOUT_SITES
from moelens.errors import ConfigError, RunDirectoryError
from moelens.progress import ProgressCallback, report
from moelens.results.manifest import read_manifest
from moelens.results.run import Run, load_run

#: Geva et al. (2023) block attention over a window of 9 of GPT-2 XL's 48 layers; the atlas keeps
#: that share of the model's depth (:func:`block_window`).
GEVA_WINDOW, GEVA_LAYERS = 9, 48
#: Prompts of the atlas's causal-tracing (restore) run: each prompt costs every token position ×
#: 3 sites × every layer × 10 noise samples of forward rows: 13 times a block prompt on a 12-layer zoo.
RESTORE_PROMPTS = 12
#: Prompts of the atlas's router-edits run (each runs once per cell: ~180 cells per layer by default).
ROUTE_PROMPTS = 16


@dataclass(frozen=True)
class Step:
    """One analysis run of the atlas: its directory name, what it is, the equivalent command."""

    name: str
    analysis: str
    command: str
    run: Callable[[Path, ProgressCallback | None], Run] = field(repr=False)
    #: runs this one reads (it starts after they finish)
    needs: tuple[str, ...] = ()
    #: its rough cost relative to the others (seconds on the 12-layer zoo), to start long runs first
    cost: float = 1.0


@dataclass
class Atlas:
    """What :func:`atlas` did: the runs it holds (in report order), the report, the figures, notes."""

    out: Path
    runs: dict[str, Run]
    report: Path
    figures: list[Path]
    notes: list[str]
    reused: list[str]


def _zoo_file(model_path: Path, name: str) -> Path | None:
    """A zoo's ``facts.jsonl`` / ``calibration.txt`` beside a zoo model (``zoo.json`` marks a zoo)."""
    parent = model_path.parent
    if (parent / "zoo.json").is_file() and (parent / name).is_file():
        return parent / name
    return None


def shell_quote(value: Any) -> str:
    """``value`` as one shell word: bare when safe, in single quotes, or in double quotes when
    it holds a single quote and nothing a double-quoted word would expand (``"$`\\!``)."""
    text = str(value)
    quoted = shlex.quote(text)
    if "'" in text and not any(c in text for c in '"$`\\!'):
        return f'"{text}"'
    return quoted


_q = shell_quote


def _check_pair(base: Any, tuned: Any) -> None:
    checks = [("family", base.family, tuned.family), ("number of layers", base.n_layers, tuned.n_layers),
              ("hidden size", base.hidden_size, tuned.hidden_size), ("experts", base.n_experts, tuned.n_experts)]
    for what, a, b in checks:
        if a != b:
            raise ConfigError(f"{base.name} and {tuned.name} differ in {what} ({a} vs {b}); an atlas of two models needs a model and its fine-tune")


def plan_atlas(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    tuned: str | os.PathLike[str] | None = None,
    base: str | os.PathLike[str] | None = None,
    prompts: str | os.PathLike[str] | None = None,
    calibration: str | os.PathLike[str] | None = None,
    executor: Any = None,
    device: str = DEFAULT_DEVICE,
    trace_limit: int | None = None,
    restore_limit: int | None = RESTORE_PROMPTS,
    checks: bool = True,
) -> tuple[list[Step], list[str]]:
    """The runs the atlas will make, and notes on what does not apply; every input is checked here,
    before anything is written (``checks=False``: the weights, prompts and calibration text are
    not read again, for a worker process planning what its parent has checked)."""
    from moelens.calibration.texts import read_lines
    from moelens.checkpoint import open_model
    from moelens.runtime.checks import check_checkpoint_finite
    from moelens.runtime.prompts import read_prompts
    from moelens.spectral import resolve_device

    for flag, value, low in (("--trace-limit", trace_limit, 1), ("--restore-limit", restore_limit, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ConfigError(f"{flag} {value}: give a whole number ≥ {low}")
    if tuned is not None and base is not None:
        raise ConfigError("give --tuned B (MODEL is the base) or --base A (MODEL is the fine-tune), not both")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory for the atlas")
    check_atlas_out(out)
    main = open_model(model)
    other = open_model(tuned if tuned is not None else base) if (tuned is not None or base is not None) else None
    if other is None:
        models = {"model": main}
        base_m, tuned_m = main, None
    elif tuned is not None:
        base_m, tuned_m = main, other
        models = {"base": main, "tuned": other}
    else:
        base_m, tuned_m = other, main
        models = {"base": other, "tuned": main}
    if tuned_m is not None:
        _check_pair(base_m, tuned_m)
    for m in models.values() if checks else ():
        m.check()
    moe = bool(main.moe_layers)
    resolve_device(device)  # an unknown device is refused before any directory is made
    prompts_path = Path(prompts) if prompts is not None else _zoo_file(main.path, "facts.jsonl")
    calibration_path = Path(calibration) if calibration is not None else _zoo_file(main.path, "calibration.txt")
    if prompts_path is not None and checks:
        records = read_prompts(prompts_path)  # a bad prompts file is named now, line and all
        _check_forward_inputs(models.values(), prompts_path, records[:trace_limit] if trace_limit else records,
                              moe and calibration_path is not None)
    if calibration_path is not None and checks:
        read_lines(calibration_path)  # a missing, empty or undecodable file is named now
    for m in models.values() if checks else ():
        check_checkpoint_finite(m)  # NaN weights named now, not after the first runs are written
    inputs = AtlasInputs(models, main, base_m, tuned_m, moe, prompts_path, calibration_path, trace_limit, restore_limit, out)
    notes: list[str] = []
    if not moe:
        notes.append(f"{main.name} is a dense model: router alignment, expert distance and clustering need experts and were skipped")
    if any(getattr(m.family_adapter, "forward_only", False) for m in models.values()):
        notes.append(f"{main.name} is a {main.family} checkpoint opened for forward passes only: module metrics were skipped")
    if prompts_path is None:
        notes.append("no prompts were given (--prompts FACTS.jsonl): interventions were skipped")
    if moe and calibration_path is None:
        notes.append("no calibration text was given (--calibration TEXT): clustering and merge costs were skipped")
    from moelens.analyses.declaration import load
    from moelens.analyses.registry import declarations

    steps = [step_of(call, executor, device) for d in declarations().values() if d.atlas for call in load(d.atlas)(inputs)]
    return steps, notes


def block_window(n_layers: int) -> int:
    """The attention-knockout window of the atlas: Geva et al.'s 9 of 48 layers scaled to the
    model's depth, round(9/48 × layers), at least 1 (4 layers → 1, 12 → 2, 16 → 3, 32 → 6, 48 → 9)."""
    return max(1, int(GEVA_WINDOW * n_layers / GEVA_LAYERS + 0.5))


@dataclass(frozen=True)
class AtlasInputs:
    """What the atlas was given, for each analysis's declared ``atlas`` function: the models by
    role (``model``, or ``base`` and ``tuned``), the first model, the base and the fine-tune, whether
    they are MoE models, the prompts and calibration text (None when not given) and the limits."""

    models: dict[str, Any]
    main: Any
    base: Any
    tuned: Any
    moe: bool
    prompts: Path | None
    calibration: Path | None
    trace_limit: int | None
    restore_limit: int | None
    out: Path

    @property
    def forward_only(self) -> bool:
        """A checkpoint opened for forward passes only (its weights cannot be read one by one)."""
        return any(getattr(m.family_adapter, "forward_only", False) for m in self.models.values())


@dataclass(frozen=True)
class RunRef:
    """Another run of this atlas, by its name: ``runs/<name>`` in a command, its directory when run."""

    name: str


@dataclass(frozen=True)
class Call:
    """One run of the atlas in the terms of its analysis's declaration: its directory name, the
    analysis, the models by the function's parameter names (``model``, ``model_a``, ``model_b``),
    the options it sets (config fields; a :class:`RunRef` for another run of the atlas), the runs it reads, and its rough cost (seconds on the 12-layer
    zoo). :func:`step_of` makes both the real call and its reproduce command from it."""

    name: str
    analysis: str
    models: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    needs: tuple[str, ...] = ()
    cost: float = 1.0


def _flag_value(value: Any) -> str:
    """An option's value as the command line writes it (a list comma-separated)."""
    if isinstance(value, RunRef):
        return f"runs/{value.name}"
    if isinstance(value, (tuple, list)):
        return ",".join(_flag_value(v) for v in value)
    return str(value)


def _run_value(value: Any, runs: Path) -> Any:
    """An option's value as the Python function takes it (a :class:`RunRef` as its directory)."""
    if isinstance(value, RunRef):
        return runs / value.name
    if isinstance(value, list):
        return [_run_value(v, runs) for v in value]
    return value


def reproduce_command(call: Call, executor: Any = None, device: str = DEFAULT_DEVICE) -> str:
    """The command that makes ``call``'s run, from its analysis's declaration: ``moelens COMMAND
    MODEL… [--model-option PATH] [--option VALUE…] --out runs/NAME [--device D] [--executor E]``."""
    from moelens.analyses.fields import config_fields, flag_name
    from moelens.analyses.registry import declaration

    d = declaration(call.analysis)
    fields = {f.name: f for f in config_fields(d.config_type)}
    words = ["moelens", d.command.name]
    for i in d.inputs:
        model = call.models.get(i.name)
        if model is not None:
            words += [i.flag, _q(model.path)] if i.flag else [_q(model.path)]
    for name, value in call.options.items():
        f = fields[name]  # a KeyError here is a call that names no field of its config
        if value is None or (isinstance(value, bool) and value == f.default):
            continue  # what the command line leaves out means the same
        if isinstance(value, bool):
            words.append(flag_name(name) if value else f"--no-{flag_name(name)[2:]}")
        else:
            words += [flag_name(name), _q(_flag_value(value))]
    words += ["--out", f"runs/{call.name}"]
    if device != DEFAULT_DEVICE and "device" in fields:
        words += ["--device", _q(device)]
    name = None if executor is None else str(getattr(executor, "name", executor))
    if name not in (None, "local"):
        words += ["--executor", _q(name)]
    return " ".join(words)


def step_of(call: Call, executor: Any = None, device: str = DEFAULT_DEVICE) -> Step:
    """The atlas's step of ``call``: the analysis's Python function on its models and options (with
    the atlas's device and executor, where the analysis takes them), and the equivalent command."""
    from moelens.analyses.api import api_function
    from moelens.analyses.fields import config_fields
    from moelens.analyses.registry import declaration

    d = declaration(call.analysis)
    where: dict[str, Any] = {"executor": executor}
    if "device" in {f.name for f in config_fields(d.config_type)}:
        where["device"] = device  # the atlas's device, for every analysis that has one

    def run(directory: Path, progress: ProgressCallback | None) -> Run:
        options = {name: _run_value(value, directory.parent) for name, value in call.options.items()}
        function = api_function(d.function)
        return function(**call.models, **options, out=directory, progress=progress, **where)

    label = d.title[0].lower() + d.title[1:]
    return Step(call.name, label, reproduce_command(call, executor, device), run, call.needs, call.cost)


# ----------------------------------------------------------------------------------------------
# What the atlas runs of each analysis (named by each declaration's ``atlas``)
# ----------------------------------------------------------------------------------------------
def alignment_calls(given: AtlasInputs) -> list[Call]:
    """Router alignment of every MoE model."""
    if not given.moe:
        return []
    return [Call(f"alignment-{key}", "router_alignment", {"model": m}, cost=3) for key, m in given.models.items()]


def distance_calls(given: AtlasInputs) -> list[Call]:
    """Expert distance base→tuned (two models) and within the base's layers."""
    if not given.moe:
        return []
    calls = []
    if given.tuned is not None:
        calls.append(Call("distance-base-tuned", "expert_distance", {"model_a": given.base, "model_b": given.tuned}, cost=3))
    calls.append(Call("distance-within", "expert_distance", {"model_a": given.base}, cost=2))
    return calls


def modules_calls(given: AtlasInputs) -> list[Call]:
    """Module metrics of the base and the fine-tune (or of the one model)."""
    if given.forward_only:
        return []
    if given.tuned is not None:
        return [Call("modules", "module_metrics", {"model_a": given.base, "model_b": given.tuned}, cost=4)]
    return [Call("modules", "module_metrics", {"model_a": given.main}, cost=2)]


def trace_calls(given: AtlasInputs) -> list[Call]:
    """Per model: attention knockout (block, the seed-003 figure, with a window scaled to the
    depth) and knockout of every site beside it; causal tracing (restore) of the first model on
    the first ``restore_limit`` prompts (0: none)."""
    if given.prompts is None:
        return []
    knockout_sites = KNOCKOUT_SITES if given.moe else DENSE_KNOCKOUT_SITES
    window = block_window(given.main.n_layers)
    prompts, limit = str(given.prompts), given.trace_limit
    calls: list[Call] = []
    for key, m in given.models.items():
        block, knockout = f"trace-block-{key}", f"trace-knockout-{key}"
        for name in (block, knockout):
            _check_kept_limit(given.out / "runs" / name, limit)
        calls.append(Call(block, "interventions", {"model": m}, {"prompts": prompts, "mode": "block", "window": window, "limit": limit}, cost=12))
        calls.append(Call(knockout, "interventions", {"model": m}, {"prompts": prompts, "sites": knockout_sites, "limit": limit}, cost=22))
    if given.restore_limit:
        key = next(iter(given.models))
        restore = min(given.restore_limit, limit) if limit else given.restore_limit
        name = f"trace-restore-{key}"
        _check_kept_limit(given.out / "runs" / name, restore, "--restore-limit")
        calls.append(Call(name, "interventions", {"model": given.models[key]}, {"prompts": prompts, "mode": "restore", "limit": restore},
                          cost=5 * restore))  # some 13 block prompts' worth each
    return calls


def route_calls(given: AtlasInputs) -> list[Call]:
    """Router edits of the first model on the first :data:`ROUTE_PROMPTS` prompts (fewer with a smaller ``trace_limit``)."""
    if given.prompts is None or not given.moe:
        return []
    key = next(iter(given.models))
    limit = min(ROUTE_PROMPTS, given.trace_limit) if given.trace_limit else ROUTE_PROMPTS
    name = f"route-{key}"
    _check_kept_limit(given.out / "runs" / name, limit, "--trace-limit")
    return [Call(name, "router_edits", {"model": given.models[key]}, {"prompts": str(given.prompts), "limit": limit})]


def clustering_calls(given: AtlasInputs) -> list[Call]:
    """Clustering of the base model by HC-SMoE and M-SMoE (half the experts), and the distances
    within their clusters with and without permutation."""
    if not given.moe or given.calibration is None:
        return []
    groups = max(1, given.base.n_experts // 2)
    calls: list[Call] = []
    for method in ("hc-smoe", "m-smoe"):
        name = f"cluster-{method}"
        calls.append(Call(name, "clustering", {"model": given.base},
                          {"calibration": str(given.calibration), "method": method, "groups": groups}, cost=12))
        for permute in (False, True):
            calls.append(Call(f"distance-{method}{'-permuted' if permute else ''}", "expert_distance", {"model_a": given.base},
                              {"clusters": RunRef(name), "permute": permute}, needs=(name,), cost=2))
    return calls


def merge_cost_calls(given: AtlasInputs) -> list[Call]:
    """What merging by both clusterings costs: fact recall (the prompts) and held-out perplexity."""
    if not given.moe or given.calibration is None:
        return []
    options = {"clusters": [RunRef("cluster-hc-smoe"), RunRef("cluster-m-smoe")],
               "facts": None if given.prompts is None else str(given.prompts), "texts": str(given.calibration)}
    return [Call("merge-cost", "merge_cost", {"model": given.base}, options, needs=("cluster-hc-smoe", "cluster-m-smoe"), cost=15)]


def _check_forward_inputs(models: Any, prompts: Path, records: list[Any], facts: bool) -> None:
    """What the trace and merge-cost runs would refuse, refused before the first run: a tokenizer
    that does not fit a model's embedding, a prompt longer than its positions, a target outside its
    vocabulary (merge cost reads the prompts file as facts: every line then needs a target)."""
    from moelens.analyses.clustering.merge_cost import check_facts, read_fact_lines
    from moelens.runtime import load_tokenizer
    from moelens.runtime.checks import check_vocabulary, embedding_rows, max_positions, quiet_transformers
    from moelens.runtime.prompts import tokenise_all

    for m in models:
        tokenizer = load_tokenizer(m.path, m.revision)
        check_vocabulary(tokenizer, embedding_rows(m.config), m.name)
        with quiet_transformers():
            tokenise_all(tokenizer, records, str(prompts), max_positions(m.config))
        if facts and m.moe_layers:
            check_facts(str(prompts), read_fact_lines(str(prompts)), tokenizer, max_positions(m.config))


def _check_kept_limit(run_dir: Path, trace_limit: int | None, option: str = "--trace-limit") -> None:
    """A finished trace run is reused, so it must hold the prompts this call asks for: the same
    ``--trace-limit`` (and ``--restore-limit`` for the restore run), the options of the atlas that
    change a run's numbers."""
    manifest = run_dir / "manifest.json"
    if not manifest.is_file():
        return
    try:
        kept = (read_manifest(manifest).get("options") or {}).get("limit")
    except RunDirectoryError:
        return  # not a readable run: resuming the trace run says what is wrong, in one line
    if kept != trace_limit:
        raise ConfigError(f"{run_dir} was written with {option} {kept if kept is not None else '(none)'} but this call asks for "
                          f"{trace_limit if trace_limit is not None else '(none)'}; give the same {option}, or choose another --out directory")


#: The file that marks a directory as an atlas moelens wrote (so a later call may update it).
ATLAS_MARKER = ".moelens-atlas"
#: What an atlas directory holds; an atlas written before the marker existed is known by these.
_ATLAS_ENTRIES = {"runs", "report.html", "figures", ATLAS_MARKER}


def is_atlas_directory(out: Path) -> bool:
    """Whether ``out`` is an atlas moelens wrote: it has the marker, or (an atlas written before
    the marker existed) holds nothing but ``runs/`` with run directories, the report and figures."""
    from moelens.locks import LOCK_NAME

    marker = out / ATLAS_MARKER
    if marker.is_file() and not marker.is_symlink():
        return True
    names = {p.name for p in out.iterdir()} - {LOCK_NAME}
    runs = out / "runs"
    return (names <= _ATLAS_ENTRIES and runs.is_dir() and not runs.is_symlink()
            and any((r / "manifest.json").is_file() for r in runs.iterdir()))


def check_atlas_out(out: Path) -> None:
    """``--out`` of an atlas must be missing, empty, or an atlas moelens wrote: a report and
    figures are never written over, nor runs among, somebody else's files; and it holds no link
    (which would have files outside it written or deleted)."""
    from moelens.errors import OutputExistsError
    from moelens.locks import LOCK_NAME
    from moelens.safe_files import refuse_links_inside

    if not out.is_dir() or not any(p.name != LOCK_NAME for p in out.iterdir()):
        return
    if not is_atlas_directory(out):
        raise OutputExistsError(f"--out {out} holds files that are not an atlas (no {ATLAS_MARKER}); "
                                "choose an empty or new directory for the atlas")
    refuse_links_inside(out)


def _finished(path: Path) -> Run | None:
    """The complete run in ``path`` when its inputs still hold the bytes it was computed from;
    otherwise None, and the step runs again into ``path``, where the runner refuses other
    weights in one line."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        content = read_manifest(manifest)
        if content.get("status") != "complete" or _weights_changed(content):
            return None
        return load_run(path)
    except (OSError, ValueError, ConfigError, RunDirectoryError):
        return None  # computed again: the runner refuses a damaged directory in one line


def _weights_changed(manifest: dict[str, Any]) -> bool:
    """Whether an input's files or the tensors the run read differ from what it recorded."""
    from moelens.checkpoint.store import TensorStore, is_sampled
    from moelens.errors import MoelensError

    reads = manifest.get("read_digests") or {}
    for name, info in (manifest.get("inputs") or {}).items():
        files = info.get("files") if isinstance(info, dict) else None
        if not isinstance(files, dict) or not info.get("path"):
            continue
        try:
            store = TensorStore(Path(info["path"]))
            exact = [f for f, h in files.items() if isinstance(h, str) and not is_sampled(h)]
            if store.file_hashes(whole_files=exact) != files or store.verify_reads(reads.get(name) or {}, exact):
                return True
        except (MoelensError, OSError):
            return True
    return False


def write_figure_files(files: list[Any], out: Path) -> list[Path]:
    """The report's figures (as kept by :func:`moelens.report.embed.collecting_files`) as PNG and
    SVG files under ``out``, named ``<figure>[--<run, layer or option>].<png|svg>``."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for item in files:
        for fmt in ("png", "svg"):
            path = out / f"{item.stem}.{fmt}"
            path.write_bytes(item.data[fmt])
            written.append(path)
    return written


def _up_to_date(report_path: Path, figure_dir: Path, runs: dict[str, Run], out: Path) -> bool:
    """The report and figures were written after every run finished."""
    if not report_path.is_file() or not figure_dir.is_dir() or not any(figure_dir.iterdir()):
        return False
    written = report_path.stat().st_mtime
    return all((out / "runs" / name / "manifest.json").stat().st_mtime <= written for name in runs)


def reproduce_box(steps: list[Step], runs: dict[str, Run], atlas_command: str | None) -> dict[str, Any]:
    """The exact commands (the atlas's own, then one per run) and the versions the manifests record."""
    versions: dict[str, str] = {}
    for run in runs.values():
        for k, v in (run.manifest.get("versions") or {}).items():
            versions.setdefault(k, str(v))
    return {"atlas": atlas_command, "commands": [s.command for s in steps if s.name in runs], "versions": versions}


def _workers_for(requested: int | None, pending: list[Step], plan: dict[str, Any]) -> int:
    """Worker processes for the ``pending`` runs (:func:`moelens.atlas_pool.choose_workers`):
    several only with the local executor (another executor places the work itself); by default
    only on the CPU, where each run gets its share of the cores."""
    from moelens.atlas_pool import choose_workers

    executor = plan["executor"]
    if executor is not None and str(getattr(executor, "name", executor)) != "local":
        return 1
    if requested is not None or len(pending) < 2:
        return choose_workers(requested, len(pending), True)
    from moelens.checkpoint import open_model
    from moelens.spectral import resolve_device

    if resolve_device(plan["device"]).type != "cpu":
        return 1
    paths = [plan[k] for k in ("model", "tuned", "base") if plan[k] is not None]
    largest = max(open_model(p).size_on_disk() for p in paths)
    return choose_workers(None, len(pending), True, largest)


def _report_jobs(jobs: int | None) -> int:
    """Worker processes drawing the report's sections: ``jobs`` as given, else one per core (the
    report draws on the CPU whatever device the runs used)."""
    from moelens.threads import available_cpus

    return jobs if jobs is not None else available_cpus()


def atlas(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    title: str | None = None,
    progress: ProgressCallback | None = None,
    command: str | None = None,
    jobs: int | None = None,
    **inputs: Any,
) -> Atlas:
    """Run every analysis that applies to ``model`` (and its fine-tune or base) under ``out`` and
    write one report; a second call reuses the finished runs.

    ``inputs`` are :func:`plan_atlas`'s, declared there once (``tuned``, ``base``, ``prompts``,
    ``calibration``, ``executor``, ``device``, ``trace_limit``, ``restore_limit``); the
    signature shown by ``help(atlas)`` is made from both.

    ``jobs``: analyses run at once, each in a worker process (:mod:`moelens.atlas_pool`); None:
    one per core this process may use, when every run computes on the CPU with the local executor
    and memory holds a model per worker; 1 runs them one after another in this process. The
    report's sections are drawn on as many processes (None: one per core).

    >>> result = atlas("zoo/base", "atlas", tuned="zoo/tuned")
    >>> result.report          # atlas/report.html
    """
    from moelens.report import build_report, write_report

    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ConfigError(f"--jobs {jobs}: give a whole number ≥ 1")
    plan = _plan_arguments(model, out, inputs)
    steps, notes = plan_atlas(**plan)
    out = Path(out)
    from moelens.safe_files import atomic_write_bytes

    atomic_write_bytes(out / ATLAS_MARKER, b"moelens atlas: runs/, report.html and figures/ are written by moelens atlas\n")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    runs: dict[str, Run] = {}
    reused: list[str] = []
    pending: list[Step] = []
    for step in steps:
        done = _finished(out / "runs" / step.name)
        if done is not None:
            runs[step.name] = done
            reused.append(step.name)
        else:
            pending.append(step)
    n_workers = _workers_for(jobs, pending, plan)
    if n_workers > 1:
        from moelens.atlas_pool import run_steps

        runs.update(run_steps(pending, out, plan_atlas, {**plan, "executor": None}, n_workers, len(steps), load_run, progress, len(reused)))
    else:
        for step in pending:
            report(progress, "atlas", len(runs), len(steps), f"{step.name} ({step.analysis})", step=True)
            runs[step.name] = step.run(out / "runs" / step.name, progress)
    runs = {s.name: runs[s.name] for s in steps}  # the report's order is the plan's
    report(progress, "atlas", len(steps), len(steps), "report", step=True)
    report_path = out / "report.html"
    figure_dir = out / "figures"
    if len(reused) == len(steps) and _up_to_date(report_path, figure_dir, runs, out):
        # nothing new: the report and figures of the last call still hold
        return Atlas(out, runs, report_path, sorted(figure_dir.iterdir()), notes, reused)
    from moelens.report.embed import collecting_files

    box = reproduce_box(steps, runs, command)
    with collecting_files() as files:  # every figure the report shows, and only those, becomes a file
        html = build_report(list(runs.values()), title=title or f"moelens atlas: {Path(model).name}",
                            extra={"notes": notes, "reproduce": box}, jobs=_report_jobs(jobs))
    figure_paths = write_figure_files(files, figure_dir)
    path = write_report(html, out / "report.html")
    return Atlas(out, runs, path, figure_paths, notes, reused)



def _plan_arguments(model: Any, out: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """:func:`plan_atlas`'s arguments, its defaults filled in; an unknown input is a TypeError, as
    for any function."""
    planner = inspect.signature(plan_atlas)
    unknown = sorted((set(inputs) - set(planner.parameters)) | ({"checks", "model", "out"} & set(inputs)))
    if unknown:
        raise TypeError(f"atlas() got an unexpected keyword argument {unknown[0]!r}")
    bound = planner.bind(model, out, **inputs)
    bound.apply_defaults()
    plan = dict(bound.arguments)
    plan.pop("checks")
    return plan


def _atlas_signature() -> inspect.Signature:
    """``atlas``'s signature as ``help`` shows it: the model and output, :func:`plan_atlas`'s inputs
    (declared there once), then the atlas's own keywords."""
    own = [p for p in inspect.signature(atlas).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    planned = [p for p in inspect.signature(plan_atlas).parameters.values() if p.name != "checks"]
    return inspect.signature(atlas).replace(parameters=[*planned[:2], *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in planned[2:]), *own])


atlas.__signature__ = _atlas_signature()  # type: ignore[attr-defined]

__all__ = ["ATLAS_MARKER", "RESTORE_PROMPTS", "Atlas", "AtlasInputs", "Call", "RunRef", "Step", "reproduce_command", "step_of", "block_window", "atlas", "check_atlas_out", "is_atlas_directory", "plan_atlas", "write_figure_files"]
