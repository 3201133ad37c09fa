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
    exec_flag = ""
    if executor is not None and str(getattr(executor, "name", executor)) not in ("local",):
        exec_flag = f" --executor {_q(getattr(executor, 'name', executor))}"
    dev_flag = f" --device {_q(device)}" if device != DEFAULT_DEVICE else ""

    steps: list[Step] = []
    notes: list[str] = []
    if moe:
        from moelens.analyses.router_alignment import router_alignment

        for key, m in models.items():
            steps.append(Step(f"alignment-{key}", "router alignment",
                              f"moelens align {_q(m.path)} --out runs/alignment-{key}{dev_flag}{exec_flag}",
                              lambda d, p, m=m: router_alignment(m, device=device, out=d, progress=p, executor=executor), cost=3))
        from moelens.analyses.expert_distance import expert_distance

        if tuned_m is not None:
            steps.append(Step("distance-base-tuned", "expert distance",
                              f"moelens distance {_q(base_m.path)} {_q(tuned_m.path)} --out runs/distance-base-tuned{dev_flag}{exec_flag}",
                              lambda d, p: expert_distance(base_m, tuned_m, device=device, out=d, progress=p, executor=executor), cost=3))
        steps.append(Step("distance-within", "expert distance",
                          f"moelens distance {_q(base_m.path)} --out runs/distance-within{dev_flag}{exec_flag}",
                          lambda d, p: expert_distance(base_m, device=device, out=d, progress=p, executor=executor), cost=2))
    else:
        notes.append(f"{main.name} is a dense model: router alignment, expert distance and clustering need experts and were skipped")

    from moelens.analyses.module_metrics import module_metrics

    if any(getattr(m.family_adapter, "forward_only", False) for m in models.values()):
        notes.append(f"{main.name} is a {main.family} checkpoint opened for forward passes only: module metrics were skipped")
    elif tuned_m is not None:
        steps.append(Step("modules", "module metrics",
                          f"moelens modules {_q(base_m.path)} {_q(tuned_m.path)} --out runs/modules{dev_flag}{exec_flag}",
                          lambda d, p: module_metrics(base_m, tuned_m, device=device, out=d, progress=p, executor=executor), cost=4))
    else:
        steps.append(Step("modules", "module metrics", f"moelens modules {_q(main.path)} --out runs/modules{dev_flag}{exec_flag}",
                          lambda d, p: module_metrics(main, device=device, out=d, progress=p, executor=executor), cost=2))

    if prompts_path is not None:
        steps.extend(_trace_steps(models, main, prompts_path, moe, trace_limit, restore_limit, out, device, dev_flag))
    else:
        notes.append("no prompts were given (--prompts FACTS.jsonl): interventions were skipped")

    if prompts_path is not None and moe:
        steps.append(_route_step(models, prompts_path, trace_limit, out, device, dev_flag))

    if moe and calibration_path is not None:
        steps.extend(_clustering_steps(base_m, tuned_m, calibration_path, prompts_path, device, dev_flag))
    elif moe:
        notes.append("no calibration text was given (--calibration TEXT): clustering and merge costs were skipped")
    return steps, notes


def block_window(n_layers: int) -> int:
    """The attention-knockout window of the atlas: Geva et al.'s 9 of 48 layers scaled to the
    model's depth, round(9/48 × layers), at least 1 (4 layers → 1, 12 → 2, 16 → 3, 32 → 6, 48 → 9)."""
    return max(1, int(GEVA_WINDOW * n_layers / GEVA_LAYERS + 0.5))


def _trace_steps(models: dict[str, Any], main: Any, prompts: Path, moe: bool, trace_limit: int | None,
                 restore_limit: int | None, out: Path, device: str, dev_flag: str) -> list[Step]:
    """Per model: attention knockout (block, the seed-003 figure, with a window scaled to the
    depth) and knockout of every site beside it; causal tracing (restore) of the first model on
    the first ``restore_limit`` prompts (0: none)."""
    from moelens.analyses.interventions import trace

    knockout_sites = KNOCKOUT_SITES if moe else DENSE_KNOCKOUT_SITES
    window = block_window(main.n_layers)
    limit_flag = f" --limit {trace_limit}" if trace_limit else ""
    steps: list[Step] = []
    for key, m in models.items():
        block, knockout = f"trace-block-{key}", f"trace-knockout-{key}"
        for name in (block, knockout):
            _check_kept_limit(out / "runs" / name, trace_limit)
        steps.append(Step(block, "interventions",
                          f"moelens trace {_q(m.path)} --prompts {_q(prompts)} --mode block --window {window}{limit_flag} --out runs/{block}{dev_flag}",
                          lambda d, p, m=m: trace(m, str(prompts), mode="block", window=window, limit=trace_limit, device=device, out=d, progress=p),
                          cost=12))
        steps.append(Step(knockout, "interventions",
                          f"moelens trace {_q(m.path)} --prompts {_q(prompts)} --sites {','.join(knockout_sites)}{limit_flag} --out runs/{knockout}{dev_flag}",
                          lambda d, p, m=m: trace(m, str(prompts), sites=knockout_sites, limit=trace_limit, device=device, out=d, progress=p),
                          cost=22))
    if restore_limit:
        key = next(iter(models))
        limit = min(restore_limit, trace_limit) if trace_limit else restore_limit
        name = f"trace-restore-{key}"
        _check_kept_limit(out / "runs" / name, limit, "--restore-limit")
        m = models[key]
        steps.append(Step(name, "interventions",
                          f"moelens trace {_q(m.path)} --prompts {_q(prompts)} --mode restore --limit {limit} --out runs/{name}{dev_flag}",
                          lambda d, p: trace(m, str(prompts), mode="restore", limit=limit, device=device, out=d, progress=p),
                          cost=5 * limit))  # some 13 block prompts' worth each
    return steps


def _route_step(models: dict[str, Any], prompts: Path, trace_limit: int | None, out: Path, device: str, dev_flag: str) -> Step:
    """Router edits of the first model on the first :data:`ROUTE_PROMPTS` prompts (fewer with a smaller ``trace_limit``)."""
    from moelens.analyses.router_edits import router_edits

    key = next(iter(models))
    m = models[key]
    limit = min(ROUTE_PROMPTS, trace_limit) if trace_limit else ROUTE_PROMPTS
    name = f"route-{key}"
    _check_kept_limit(out / "runs" / name, limit, "--trace-limit")
    return Step(name, "router edits", f"moelens route {_q(m.path)} --prompts {_q(prompts)} --limit {limit} --out runs/{name}{dev_flag}",
                lambda d, p: router_edits(m, str(prompts), limit=limit, device=device, out=d, progress=p))


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


def _clustering_steps(base_m: Any, tuned_m: Any, calibration: Path, prompts: Path | None, device: str, dev_flag: str) -> list[Step]:
    """Clustering of the base model by HC-SMoE and M-SMoE (half the experts), the distances within
    their clusters with and without permutation, and what merging costs."""
    from moelens.analyses.clustering import cluster
    from moelens.analyses.expert_distance import expert_distance

    steps: list[Step] = []
    groups = max(1, base_m.n_experts // 2)
    for method in ("hc-smoe", "m-smoe"):
        name = f"cluster-{method}"
        steps.append(Step(name, "clustering",
                          f"moelens cluster {_q(base_m.path)} --calibration {_q(calibration)} --method {method} --groups {groups} --out runs/{name}{dev_flag}",
                          lambda d, p, method=method: cluster(base_m, str(calibration), method=method, groups=groups, device=device, out=d, progress=p),
                          cost=12))
        for permute in (False, True):
            dname = f"distance-{method}{'-permuted' if permute else ''}"
            steps.append(Step(dname, "expert distance",
                              f"moelens distance {_q(base_m.path)} --clusters runs/{name}{' --permute' if permute else ''} --out runs/{dname}{dev_flag}",
                              lambda d, p, name=name, permute=permute: expert_distance(
                                  base_m, clusters=d.parent / name, permute=permute, device=device, out=d, progress=p),
                              needs=(name,), cost=2))
    from moelens.analyses.clustering import merge_cost

    facts_flag = f" --facts {_q(prompts)}" if prompts is not None else ""
    steps.append(Step("merge-cost", "merge costs",
                      f"moelens merge-cost {_q(base_m.path)} --clusters runs/cluster-hc-smoe,runs/cluster-m-smoe{facts_flag} "
                      f"--texts {_q(calibration)} --out runs/merge-cost{dev_flag}",
                      lambda d, p: merge_cost(base_m, [d.parent / "cluster-hc-smoe", d.parent / "cluster-m-smoe"],
                                              facts=None if prompts is None else str(prompts), texts=str(calibration),
                                              device=device, out=d, progress=p),
                      needs=("cluster-hc-smoe", "cluster-m-smoe"), cost=15))
    return steps


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
    tuned: str | os.PathLike[str] | None = None,
    base: str | os.PathLike[str] | None = None,
    prompts: str | os.PathLike[str] | None = None,
    calibration: str | os.PathLike[str] | None = None,
    executor: Any = None,
    device: str = DEFAULT_DEVICE,
    trace_limit: int | None = None,
    restore_limit: int | None = RESTORE_PROMPTS,
    title: str | None = None,
    progress: ProgressCallback | None = None,
    command: str | None = None,
    jobs: int | None = None,
) -> Atlas:
    """Run every analysis that applies to ``model`` (and its fine-tune or base) under ``out`` and
    write one report; a second call reuses the finished runs.

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
    plan = dict(model=model, out=out, tuned=tuned, base=base, prompts=prompts, calibration=calibration, executor=executor,
                device=device, trace_limit=trace_limit, restore_limit=restore_limit)
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


__all__ = ["ATLAS_MARKER", "RESTORE_PROMPTS", "Atlas", "Step", "block_window", "atlas", "check_atlas_out", "is_atlas_directory", "plan_atlas", "write_figure_files"]
