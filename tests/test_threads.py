"""The thread count an analysis computes with (moelens.threads): read from fake cgroup files and
affinity sets, the size threshold, the overrides, and the manifest that records it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from moelens import threads
from moelens.errors import ConfigError


@pytest.fixture(autouse=True)
def _no_request():
    threads.set_threads(None)
    yield
    threads.set_threads(None)


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "limit"),
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "200000 100000\n"}, 2.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu,cpuacct/cpu.cfs_quota_us": "300000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 3.0),
        ({}, None),
        ({"cpu.max": "garbage\n"}, None),
    ],
)
def test_cgroup_limit_v1_and_v2(tmp_path: Path, files: dict[str, str], limit: float | None):
    assert threads.cgroup_cpu_limit(_write(tmp_path, files)) == limit


def test_available_cpus_is_affinity_capped_by_the_quota(tmp_path: Path):
    no_quota = _write(tmp_path / "none", {"cpu.max": "max 100000"})
    assert threads.available_cpus(affinity={0, 1, 2, 3, 4, 5, 6, 7}, root=no_quota) == 8
    assert threads.available_cpus(affinity={3, 5}, root=no_quota) == 2  # affinity, not the machine's cores
    two = _write(tmp_path / "two", {"cpu.max": "200000 100000"})
    assert threads.available_cpus(affinity=range(16), root=two) == 2
    one_and_half = _write(tmp_path / "half", {"cpu.max": "150000 100000"})
    assert threads.available_cpus(affinity=range(16), root=one_and_half) == 2  # rounded up
    tiny = _write(tmp_path / "tiny", {"cpu.max": "10000 100000"})
    assert threads.available_cpus(affinity=range(16), root=tiny) == 1  # never 0
    assert threads.available_cpus(affinity={0}, root=_write(tmp_path / "big", {"cpu.max": "800000 100000"})) == 1


def test_size_threshold():
    small = threads.SMALL_MATRIX - 1
    assert threads.choose_threads(64 * 256, environ={}, cpus=8) == 1  # the zoo's largest matrix
    assert threads.choose_threads(small, environ={}, cpus=8) == 1
    assert threads.choose_threads(threads.SMALL_MATRIX, environ={}, cpus=8) == 8
    assert threads.choose_threads(4096 * 14336, environ={}, cpus=3) == 3  # a Mixtral expert


def test_overrides_flag_then_environment():
    assert threads.choose_threads(4096 * 14336, environ={"OMP_NUM_THREADS": "2"}, cpus=8) == 2
    assert threads.choose_threads(10, environ={"OMP_NUM_THREADS": "4"}, cpus=8) == 4  # even for tiny work
    assert threads.choose_threads(10, requested=3, environ={"OMP_NUM_THREADS": "4"}, cpus=8) == 3
    threads.set_threads(5)
    assert threads.requested_threads() == 5
    assert threads.choose_threads(10, environ={"OMP_NUM_THREADS": "4"}, cpus=8) == 5
    threads.set_threads(None)
    assert threads.choose_threads(10, environ={"OMP_NUM_THREADS": " "}, cpus=8) == 1  # blank = unset


@pytest.mark.parametrize("bad", [0, -1, "two", True, 1.5])
def test_bad_counts_are_one_line_errors(bad):
    with pytest.raises(ConfigError, match="whole number of threads"):
        threads.set_threads(bad)
    with pytest.raises(ConfigError, match="OMP_NUM_THREADS"):
        threads.choose_threads(10, environ={"OMP_NUM_THREADS": str(bad) if bad is not True else "yes"}, cpus=2)


def test_largest_matrix_from_model_shapes():
    moe = SimpleNamespace(hidden_size=64, expert_ffn=256)
    dense = SimpleNamespace(hidden_size=4096, expert_ffn=0)
    assert threads.largest_matrix({"a": moe, "b": None}) == 64 * 256
    assert threads.largest_matrix([moe, dense]) == 4096 * 4096
    assert threads.largest_matrix({"texts": ["a prompt"]}) == 0


def test_manifest_records_the_count(tmp_path: Path):
    import torch

    from moelens.analyses.expert_distance import expert_distance

    from .analyses.synthetic import write_checkpoint

    g = torch.Generator().manual_seed(0)
    path = write_checkpoint(
        tmp_path / "m", "mixtral", 1, 4, 16, 24,
        router=lambda L: torch.randn(4, 16, generator=g),
        expert=lambda L, e, role: torch.randn((16, 24) if role == "down" else (24, 16), generator=g),
    )
    before = torch.get_num_threads()
    try:
        threads.set_threads(2)
        run = expert_distance(path, out=tmp_path / "run")
        assert run.manifest["threads"] == 2
        assert torch.get_num_threads() == 2
        threads.set_threads(None)
        run = expert_distance(path, out=tmp_path / "run2")  # OMP_NUM_THREADS=1 in the tests
        assert run.manifest["threads"] == 1
        assert (tmp_path / "run2" / "manifest.json").read_text().count('"threads": 1') >= 1
    finally:
        torch.set_num_threads(before)
