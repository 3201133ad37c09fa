"""Mistakes with ``--executor``: one clear line on stderr, exit status 2, nothing written.

No Ray cluster is started here: Ray missing, an unreachable address, an address that answers
but is no Ray head node (Ray stood in for by one whose connection never completes), options that
do not fit the executor, and a worker whose files are not the driver's.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest

import moelens as ml
from moelens.analyses.executors import LocalExecutor, executor_from_options, resolve_executor
from moelens.errors import ConfigError

from .synthetic import random_layers, write_from_tensors


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_from_tensors(tmp_path_factory.mktemp("errors") / "a", "mixtral", *random_layers(2, 4, 8, 12, seed=1))


def _cli(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    from moelens.cli import main

    monkeypatch.setattr(sys, "argv", ["moelens", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    _, err = capsys.readouterr()
    return exit_info.value.code, err


def _one_line(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, (code, err)
    return lines[0]


def test_ray_missing_says_how_to_install_it(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails, as where it is not installed
    out = tmp_path / "run"
    line = _one_line(*_cli(["align", str(ckpt), "--out", str(out), "--executor", "ray"], monkeypatch, capsys))
    assert "needs the ray package" in line and "pip install 'moelens[ray]'" in line
    assert not out.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_address_fails_at_once(ckpt, tmp_path, monkeypatch, capsys):
    pytest.importorskip("ray")
    out = tmp_path / "run"
    port = _free_port()  # nothing listens there: the connection is refused
    t0 = time.monotonic()
    line = _one_line(*_cli(["distance", str(ckpt), "--out", str(out), "--executor", "ray", "--ray-address", f"127.0.0.1:{port}"], monkeypatch, capsys))
    assert time.monotonic() - t0 < 30
    assert f"cannot reach a Ray cluster at 127.0.0.1:{port}" in line and "ray start --head" in line
    assert not out.exists()


class HangingRay:
    """Stands for Ray at an address that answers but is no Ray head node: ``init`` retries for
    minutes (seen with ray 2.60 against a plain TCP listener)."""

    def __init__(self):
        self.calls = 0

    def is_initialized(self) -> bool:
        return False

    def init(self, **kwargs) -> None:
        self.calls += 1
        time.sleep(60)


def test_an_address_that_is_no_ray_head_times_out_with_one_line():
    from moelens.analyses.executors.ray_executor import connect

    fake = HangingRay()
    with socket.socket() as listener:  # something answers at the port (a web server, the dashboard…)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match=f"the Ray cluster at 127.0.0.1:{port} did not answer within 0.5 s"):
            connect(fake, f"127.0.0.1:{port}", timeout=0.5, num_cpus=None)
    assert fake.calls == 1 and time.monotonic() - t0 < 10


def test_the_connect_timeout_comes_from_the_environment(monkeypatch):
    from moelens.analyses.executors.ray_executor import CONNECT_TIMEOUT_S, default_connect_timeout

    monkeypatch.delenv("MOELENS_RAY_CONNECT_TIMEOUT", raising=False)
    assert default_connect_timeout() == CONNECT_TIMEOUT_S
    monkeypatch.setenv("MOELENS_RAY_CONNECT_TIMEOUT", "2.5")
    assert default_connect_timeout() == 2.5
    monkeypatch.setenv("MOELENS_RAY_CONNECT_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="is not a number of seconds"):
        default_connect_timeout()


@pytest.mark.parametrize("args, says", [
    (["--workers", "4"], "--workers applies to --executor ray"),
    (["--executor", "local", "--ray-address", "auto", "--gpus-per-worker", "1"], "--ray-address, --gpus-per-worker apply to --executor ray"),
    (["--executor", "dask"], "unknown executor 'dask'; expected one of local, ray"),
    (["--executor", "ray", "--workers", "0"], "--workers=0: give a whole number ≥ 1"),
    (["--executor", "ray", "--max-retries", "-1"], "--max-retries=-1: give a whole number ≥ 0"),
    (["--executor", "ray", "--gpus-per-worker", "-1"], "--gpus-per-worker=-1.0: give a number ≥ 0"),
    (["--executor", "ray", "--ray-address", "headnode"], "--ray-address 'headnode' is neither auto nor HOST:PORT"),
    (["--executor", "ray", "--device", "cuda"], "--device cuda with --executor ray needs --gpus-per-worker"),
])
def test_options_that_do_not_fit_are_named(ckpt, tmp_path, monkeypatch, capsys, args, says):
    if "ray" in args:
        pytest.importorskip("ray")
    out = tmp_path / "run"
    line = _one_line(*_cli(["align", str(ckpt), "--out", str(out), *args], monkeypatch, capsys))
    assert says in line
    assert not out.exists()


def test_the_api_takes_names_or_executors():
    assert isinstance(resolve_executor(None), LocalExecutor) and isinstance(resolve_executor("local"), LocalExecutor)
    mine = LocalExecutor()
    assert resolve_executor(mine) is mine
    with pytest.raises(ConfigError, match="unknown executor"):
        resolve_executor("threads")
    with pytest.raises(ConfigError, match="applies to --executor ray"):
        executor_from_options("local", workers=2)


def test_a_worker_reading_other_files_than_the_driver_is_refused(ckpt, tmp_path):
    """Each node opens the checkpoint itself; one whose copy differs must not mix its numbers in."""
    from moelens.analyses.executors.ray_executor import ModelRef

    ref = ModelRef.of(ml.open_model(ckpt))
    assert ref.source == str(Path(ckpt).resolve()) and ref.open().path == Path(ckpt).resolve()
    other = write_from_tensors(tmp_path / "other", "mixtral", *random_layers(2, 4, 8, 12, seed=2))
    moved = ModelRef(str(other), None, ref.files, ref.name)  # same name and path role, other bytes
    with pytest.raises(ConfigError, match="reads other files for a than the driver"):
        moved.open()


def test_the_driver_plans_for_the_workers_device(ckpt):
    """A driver without a GPU plans a CUDA run for GPU workers (it reads only headers), and the
    manifest's device is the workers' one: Ray hides every GPU from a task that asks for none."""
    pytest.importorskip("ray")
    from moelens.analyses import RouterAlignment
    from moelens.analyses.executors import RayExecutor

    model = {"a": ml.open_model(ckpt)}
    on_gpus = RayExecutor(gpus_per_worker=1).plan(RouterAlignment(), model, ml.RouterAlignmentConfig(device="cuda"))
    assert on_gpus.options["device"] == "cuda" and [u.key for u in on_gpus.units] == ["L00000", "L00001"]
    on_cpus = RayExecutor().plan(RouterAlignment(), model, ml.RouterAlignmentConfig(device="auto"))
    assert on_cpus.options["device"] == "cpu"
