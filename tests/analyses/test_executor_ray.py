"""The Ray executor on a local cluster of 2 CPUs: the same tables as the local executor for every
analysis (every alignment null, expert distance, module metrics, calibration in shards,
clustering, merge cost, interventions, router edits), from Python and from the command line's
``--executor ray``, a worker killed mid-run is retried, a run
interrupted on the driver resumes (on either executor), and a cluster without GPUs refuses
``--gpus-per-worker`` before anything is written.

One cluster for the module (started once, about 10 s) and tiny checkpoints; each worker runs one
thread, and so does the local reference, as docs/methods.md §7 asks for the two to agree within 1e-6.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import moelens as ml
from moelens.analyses import RouterAlignment, run_analysis
from moelens.analyses.calibration.analysis import Calibration, load_calibration
from moelens.analyses.executors import RayExecutor

from .synthetic import random_layers, write_from_tensors

ray = pytest.importorskip("ray", reason="the Ray executor needs ray (make install installs it)")

TOL = 1e-6


@pytest.fixture(scope="module", autouse=True)
def cluster():
    """A local Ray cluster of 2 CPUs for the module; one torch thread here, as in each worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # classes defined here travel to the workers by value (the workers need not import tests/)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two 3-layer Mixtral-layout checkpoints of one shape (5 experts, d = 16, F = 24)."""
    root = tmp_path_factory.mktemp("executor")
    a = write_from_tensors(root / "a", "mixtral", *random_layers(3, 5, 16, 24, seed=5))
    b = write_from_tensors(root / "b", "mixtral", *random_layers(3, 5, 16, 24, seed=6))
    return a, b


def two_workers(**kwargs) -> RayExecutor:
    return RayExecutor(workers=2, **kwargs)


def assert_same_tables(local: ml.Run, remote: ml.Run) -> None:
    assert sorted(local.tables) == sorted(remote.tables)  # (a run read back from disk lists them by name)
    for name in local.tables:
        pd.testing.assert_frame_equal(
            local[name].reset_index(drop=True), remote[name].reset_index(drop=True), check_exact=False, rtol=TOL, atol=TOL, obj=name,
        )


def assert_ran_on_ray(run: ml.Run, workers: int = 2, devices: tuple[str, ...] = ("cpu",)) -> dict:
    info = run.manifest["executor"]
    assert info["name"] == "ray" and info["workers"] == workers and info["threads"] == 1
    assert info["devices"] == list(devices) and info["cluster"]["CPU"] == 2
    # the units really ran in other processes, each of which reports its memory
    assert info["peak_rss_mib"] and all(not w.endswith(f":{os.getpid()}") for w in info["peak_rss_mib"])
    return info


@pytest.mark.parametrize("null", ["derangement", "shuffle", "shuffle-sampled"])
def test_alignment_equals_the_local_run_for_every_null(models, null):
    a, _ = models
    kwargs = dict(matrix="all", null=null, shuffles=30, seed=3, cache=False)
    local = ml.router_alignment(a, **kwargs)
    remote = ml.router_alignment(a, executor=two_workers(), **kwargs)
    assert_same_tables(local, remote)
    assert_ran_on_ray(remote)
    assert local.manifest["executor"]["name"] == "local"
    assert remote.manifest["completed_units"] == local.manifest["completed_units"] == ["L00000", "L00001", "L00002"]


def test_distance_equals_the_local_run_both_pairings(models, tmp_path):
    a, b = models
    local = ml.expert_distance(a, b)
    remote = ml.expert_distance(a, b, executor=two_workers(), out=tmp_path / "bt")
    assert_same_tables(local, remote)
    assert_same_tables(local, ml.load_run(tmp_path / "bt"))
    assert_ran_on_ray(remote)
    assert_same_tables(ml.expert_distance(a, pairing="within"), ml.expert_distance(a, pairing="within", executor=two_workers()))


def test_module_metrics_equal_the_local_run(tiny_checkpoint, tmp_path):
    a, b = tiny_checkpoint("qwen2_moe"), tiny_checkpoint("qwen2_moe", "fused")  # dense and MoE layers, shared experts
    local = ml.module_metrics(a, b)
    remote = ml.module_metrics(a, b, executor=two_workers(), out=tmp_path / "modules")
    assert_same_tables(local, remote)
    assert_ran_on_ray(remote, workers=min(2, len(remote.manifest["units"])))


def test_router_norms_equal_the_local_run(tiny_checkpoint):
    """The worked example of a new analysis: every unit is one layer's pure work."""
    path = tiny_checkpoint("mixtral")
    local = ml.router_norms(path)
    remote = ml.router_norms(path, executor=two_workers())
    assert_same_tables(local, remote)
    assert_ran_on_ray(remote, devices=())  # row norms are NumPy work, on no torch device


def test_spectrum_cache_counts_add_up_over_the_workers(models, tmp_path):
    a, _ = models
    kwargs = dict(matrix="gate", cache_dir=tmp_path / "spectra")
    first = ml.router_alignment(a, executor=two_workers(), **kwargs)
    second = ml.router_alignment(a, executor=two_workers(), **kwargs)
    assert (first.manifest["spectra_cache"]["hits"], first.manifest["spectra_cache"]["misses"]) == (0, 15)  # 3 layers × 5 experts
    assert (second.manifest["spectra_cache"]["hits"], second.manifest["spectra_cache"]["misses"]) == (15, 0)
    assert_same_tables(first, second)


class DiesOnce(RouterAlignment):
    """Router alignment whose first attempt at one unit kills its worker process outright, as
    the kernel's OOM killer would: only the attempt that finds no marker file dies."""

    def __init__(self, marker: Path, key: str):
        self.marker = str(marker)
        self.key = key

    def compute(self, plan, unit, context):
        if unit.key == self.key and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(1)
        return super().compute(plan, unit, context)


def test_a_worker_killed_mid_run_is_retried_and_the_run_completes(models, tmp_path):
    a, _ = models
    config = ml.RouterAlignmentConfig(null="shuffle-sampled", shuffles=20, cache=False)
    model = ml.open_model(a)
    local = run_analysis(RouterAlignment(), {"a": model}, config)
    marker = tmp_path / "killed"
    out = tmp_path / "run"
    remote = run_analysis(DiesOnce(marker, "L00001"), {"a": model}, config, out=out, executor=two_workers(max_retries=2))
    assert marker.is_file() and int(marker.read_text()) != os.getpid()  # a worker died, not this process
    assert_same_tables(local, remote)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["executor"]["retries"] == {"L00001": 1}
    assert manifest["completed_units"] == ["L00000", "L00001", "L00002"]


class Interrupted(Exception):
    """Stands for the driver process dying after a chosen number of finished units."""


def _interrupt_after(units: int):
    def callback(event):
        if event.task == "layers" and event.done == units and event.message:
            raise Interrupted

    return callback


@pytest.mark.parametrize("first", ["ray", "local"])
def test_a_run_interrupted_on_the_driver_resumes_on_ray(models, tmp_path, first):
    a, _ = models
    kwargs = dict(null="shuffle-sampled", shuffles=20, seed=11, cache=False)
    whole = ml.router_alignment(a, **kwargs)
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        ml.router_alignment(a, out=out, progress=_interrupt_after(1), executor=two_workers() if first == "ray" else None, **kwargs)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running" and len(manifest["completed_units"]) == 1
    assert manifest["executor"]["name"] == first
    resumed = ml.router_alignment(a, out=out, executor=two_workers(), **kwargs)
    assert_same_tables(whole, resumed)
    assert resumed.manifest["status"] == "complete" and resumed.manifest["executor"]["name"] == "ray"
    assert not (out / "parts").exists()


def _cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    from moelens.cli import main

    monkeypatch.setattr(sys, "argv", ["moelens", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_the_cli_runs_distance_on_ray(models, tmp_path, monkeypatch, capsys):
    a, b = models
    out = tmp_path / "cli"
    code, stdout, _ = _cli(["distance", str(a), str(b), "--out", str(out), "--executor", "ray", "--workers", "2"], monkeypatch, capsys)
    assert code in (0, None), stdout
    run = ml.load_run(out)
    assert_same_tables(ml.expert_distance(a, b), run)
    assert run.manifest["executor"]["name"] == "ray" and run.manifest["executor"]["workers"] == 2


def test_gpus_per_worker_on_a_cluster_without_gpus_is_one_line_and_exit_2(models, tmp_path, monkeypatch, capsys):
    a, _ = models
    out = tmp_path / "never"
    code, _, err = _cli(["align", str(a), "--out", str(out), "--executor", "ray", "--gpus-per-worker", "1"], monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "the Ray cluster has no GPUs" in lines[0] and "--gpus-per-worker" in lines[0]
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("permute", [False, True])
def test_distance_within_clusters_equals_the_local_run(tmp_path, permute):
    """The clusters run and the permutations travel as a path: each worker reads them itself."""
    from .clustering_fixtures import save_model, write_text

    model = save_model(tmp_path / "model", seed=3)
    clusters = tmp_path / "clusters"
    ml.cluster(model, write_text(tmp_path / "calibration.txt"), method="hc-smoe", groups=2, out=clusters)
    local = ml.expert_distance(model, clusters=clusters, permute=permute)
    remote = ml.expert_distance(model, clusters=clusters, permute=permute, executor=two_workers())
    assert len(local["expert_distance"]) > 0
    assert_same_tables(local, remote)
    assert_ran_on_ray(remote)
    assert remote.manifest["options"]["pairing"] == ("hc-smoe-permuted" if permute else "hc-smoe")


# ----------------------------------------------------------------------------------------------
# The forward-pass analyses: calibration in shards, clustering, merge cost, interventions, router
# edits, on the clustering tests' tiny model (2 layers, 8 experts), the Ray runs on this module's
# cluster. Ray and local run the same units with one thread each, so their tables agree bit for bit
# in practice; TOL is what is asserted.
# ----------------------------------------------------------------------------------------------
SHARD_TOKENS = 60  # the 174 calibration tokens in 4 shards per layer


def assert_same_matrices(local, remote) -> None:
    assert local.layers == remote.layers
    for layer in local.layers:
        for name in ("features", "router_logits", "topk"):
            a, b = getattr(local, name)(layer), getattr(remote, name)(layer)
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=TOL, atol=TOL, err_msg=f"{name} of layer {layer}")


@pytest.fixture(scope="module")
def calibrated(lm_dir, lm_files, tmp_path_factory):
    """The same sharded calibration locally (in memory) and on Ray (into a run directory)."""
    out = tmp_path_factory.mktemp("ray-calibration") / "run"
    local = ml.calibrate(lm_dir, lm_files["text"], shard_tokens=SHARD_TOKENS)
    remote = ml.calibrate(lm_dir, lm_files["text"], shard_tokens=SHARD_TOKENS, out=out, executor=two_workers())
    return local, remote, out


def test_calibration_in_shards_equals_the_local_run(calibrated):
    local, remote, out = calibrated
    assert remote.manifest["units"] == [f"L0000{L}S0000{s}" for L in (0, 1) for s in range(4)]
    assert_same_tables(local, remote)
    assert_same_matrices(local, remote)
    assert_same_matrices(local, load_calibration(out))
    assert_ran_on_ray(remote)
    assert not (out / "parts").exists()  # the driver assembled the shards into matrices/ and cleaned up


@pytest.mark.parametrize("method", ["hc-smoe", "m-smoe"])
def test_clustering_equals_the_local_run_calibrating_or_reusing_a_calibration(calibrated, lm_dir, lm_files, method, tmp_path, monkeypatch, capsys):
    _, _, calibration = calibrated
    kwargs = dict(method=method, groups=4, **({"budget": "global"} if method == "m-smoe" else {}))
    # calibrating itself, in shards
    local = ml.cluster(lm_dir, lm_files["text"], shard_tokens=SHARD_TOKENS, **kwargs)
    if method == "hc-smoe":
        remote = ml.cluster(lm_dir, lm_files["text"], shard_tokens=SHARD_TOKENS, executor=two_workers(), out=tmp_path / "self", **kwargs)
    else:  # the command line's --executor ray
        flags = [word for name, value in kwargs.items() for word in (f"--{name.replace('_', '-')}", str(value))]
        code, stdout, _ = _cli(["cluster", str(lm_dir), "--calibration", str(lm_files["text"]), "--shard-tokens", str(SHARD_TOKENS), *flags,
                                "--out", str(tmp_path / "self"), "--executor", "ray", "--workers", "2"], monkeypatch, capsys)
        assert code in (0, None), stdout
        remote = ml.load_calibration(tmp_path / "self")
    assert_same_tables(local, remote)
    assert_same_matrices(local, remote)
    assert_ran_on_ray(remote)
    # reusing the calibration run: one clustering unit per layer, each worker reading its matrices
    local = ml.cluster(lm_dir, str(calibration), **kwargs)
    remote = ml.cluster(lm_dir, str(calibration), executor=two_workers(), **kwargs)
    assert remote.manifest["units"] == ["L00000", "L00001"]
    assert_same_tables(local, remote)
    assert_ran_on_ray(remote, devices=())  # clustering a calibration's matrices is NumPy work, on no torch device


def test_merge_cost_equals_the_local_run(lm_dir, lm_files, tmp_path, monkeypatch, capsys):
    clusters = tmp_path / "clusters"
    ml.cluster(lm_dir, lm_files["text"], method="hc-smoe", groups=4, out=clusters)
    kwargs = dict(facts=lm_files["facts"], texts=lm_files["text"], permute="on")
    local = ml.merge_cost(lm_dir, [str(clusters)], **kwargs)
    out = tmp_path / "cost"
    code, stdout, _ = _cli(["merge-cost", str(lm_dir), "--clusters", str(clusters), "--facts", str(lm_files["facts"]), "--texts",
                            str(lm_files["text"]), "--permute", "on", "--out", str(out), "--executor", "ray", "--workers", "2"], monkeypatch, capsys)
    assert code in (0, None), stdout
    remote = ml.load_run(out)
    assert remote.manifest["units"] == ["original", "00-hc-smoe-permuted"]
    assert_same_tables(local, remote)
    assert_ran_on_ray(remote)
    assert not (out / ".moelens-tmp").exists()  # the workers merged into their own temporary folders


#: Prompts over the tiny model's vocabulary, a subject in each, one without a target.
TRACE_PROMPTS = [
    {"prompt": "the capital of france is", "subject": "france", "target": "paris"},
    {"prompt": "the capital of italy is", "subject": "italy", "target": "rome"},
    {"prompt": "a small dog crossed the", "subject": "small dog", "target": "river"},
    {"prompt": "the quiet city of germany is", "subject": "quiet city"},
]


@pytest.fixture(scope="module")
def trace_prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("ray-trace") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in TRACE_PROMPTS))
    return path


@pytest.mark.parametrize("mode, kwargs", [("knockout", {"ablation": "mean"}), ("restore", {"noise_samples": 3, "seed": 7})])
def test_interventions_equal_the_local_run(lm_dir, trace_prompts, mode, kwargs, monkeypatch, capsys, tmp_path):
    from moelens.analyses.interventions import analysis

    # two groups of prompts, one per worker (the driver plans the groups: the workers compute the units it sends)
    monkeypatch.setitem(analysis.PROMPTS_PER_UNIT, mode, 2)
    local = ml.trace(lm_dir, trace_prompts, mode=mode, **kwargs)
    if mode == "knockout":
        remote = ml.trace(lm_dir, trace_prompts, mode=mode, executor=two_workers(), **kwargs)
    else:  # the command line's --executor ray
        flags = [word for name, value in kwargs.items() for word in (f"--{name.replace('_', '-')}", str(value))]
        code, stdout, _ = _cli(["trace", str(lm_dir), "--prompts", str(trace_prompts), "--mode", mode, *flags, "--out", str(tmp_path / "run"),
                                "--executor", "ray", "--workers", "2"], monkeypatch, capsys)
        assert code in (0, None), stdout
        remote = ml.load_run(tmp_path / "run")
    assert remote.manifest["units"] == ["P000000", "P000002"]
    assert_same_tables(local, remote)
    assert_ran_on_ray(remote)


def test_router_edits_equal_the_local_run(lm_dir, trace_prompts, monkeypatch, capsys, tmp_path):
    kwargs = dict(edits="project_out,random", k=[1, 4], experts=[0, 3], samples=2, seed=5)
    local = ml.router_edits(lm_dir, trace_prompts, **kwargs)
    code, stdout, _ = _cli(["route", str(lm_dir), "--prompts", str(trace_prompts), "--edits", "project_out,random", "--k", "1,4", "--experts", "0,3",
                            "--samples", "2", "--seed", "5", "--out", str(tmp_path / "run"), "--executor", "ray", "--workers", "2"], monkeypatch, capsys)
    assert code in (0, None), stdout
    remote = ml.load_run(tmp_path / "run")
    assert_same_tables(local, remote)
    assert_ran_on_ray(remote)


class CalibrationDiesOnce(Calibration):
    """A calibration whose first attempt at one shard kills its worker process outright."""

    def __init__(self, marker: Path, key: str):
        self.marker = str(marker)
        self.key = key

    def compute(self, plan, unit, context):
        if unit.key == self.key and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(1)
        return super().compute(plan, unit, context)


def test_a_sharded_calibration_survives_a_dead_worker_and_a_killed_driver(calibrated, lm_dir, lm_files, tmp_path):
    local, _, _ = calibrated
    config = ml.CalibrationConfig(texts=str(lm_files["text"]), shard_tokens=SHARD_TOKENS)
    model = ml.open_model(lm_dir)
    out = tmp_path / "run"

    def interrupt(event):
        if event.task == "layers" and event.done == 3 and event.message:
            raise Interrupted

    with pytest.raises(Interrupted):  # the driver dies after 3 of 8 shards
        run_analysis(Calibration(), {"a": model}, config, out=out, progress=interrupt, executor=two_workers())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running" and len(manifest["completed_units"]) == 3
    marker = tmp_path / "killed"
    resumed = run_analysis(CalibrationDiesOnce(marker, "L00001S00002"), {"a": model}, config, out=out,
                           executor=two_workers(max_retries=2))
    assert marker.is_file() and int(marker.read_text()) != os.getpid()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["executor"]["retries"] == {"L00001S00002": 1}
    assert_same_tables(local, resumed)
    assert_same_matrices(local, load_calibration(out))
