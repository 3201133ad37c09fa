"""The zoo cache: keyed by dtype, reused only for the same recipe, one builder per directory,
and what a killed build leaves behind removed by the next one.

Training is replaced by a fake that writes one file and returns the recipe, so these tests
exercise the directory logic of :func:`moelens.zoo.build` in milliseconds; the real build is
tested in ``test_build.py``."""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from moelens import zoo
from moelens.errors import ConfigError, OutputExistsError, RunDirectoryError

# the module, not the function ``moelens.zoo.build`` that shadows it as an attribute
build_module = importlib.import_module("moelens.zoo.build")

if not hasattr(os, "fork"):
    pytest.skip("the other processes are forked", allow_module_level=True)
fork = multiprocessing.get_context("fork")
TIMEOUT = 30


def fake_build_into(tmp: Path, recipe: zoo.Recipe, seed: int, progress: Any) -> dict[str, Any]:
    (tmp / build_module.FACTS).write_text(json.dumps({"seed": seed, "dtype": recipe.dtype}) + "\n")
    return {"recipe_hash": recipe.hash(seed), "recipe": recipe.as_dict(), "seed": seed, "family": recipe.family, "dtype": recipe.dtype}


@pytest.fixture
def no_training(monkeypatch, tmp_path) -> Path:
    """Builds write the fake zoo; the default cache is under ``tmp_path``."""
    monkeypatch.setattr(build_module, "_build_into", fake_build_into)
    monkeypatch.setenv("MOELENS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_default_directory_names_a_non_default_dtype(monkeypatch, tmp_path):
    monkeypatch.setenv("MOELENS_CACHE", str(tmp_path))
    assert zoo.default_zoo_dir("mixtral", 0, small=True) == tmp_path / "zoo" / "mixtral-0-small"
    assert zoo.default_zoo_dir("mixtral", 0, small=True, dtype="float32") == tmp_path / "zoo" / "mixtral-0-small"
    assert zoo.default_zoo_dir("mixtral", 0, small=True, dtype="bfloat16") == tmp_path / "zoo" / "mixtral-0-small-bfloat16"
    assert zoo.default_zoo_dir("olmoe", 3, dtype="bfloat16") == tmp_path / "zoo" / "olmoe-3-bfloat16"


def test_bfloat16_and_float32_zoos_have_their_own_cache_entries(no_training):
    bf16 = zoo.build(small=True, dtype="bfloat16")
    fp32 = zoo.build(small=True)
    assert bf16.root == no_training / "zoo" / "mixtral-0-small-bfloat16"
    assert fp32.root == no_training / "zoo" / "mixtral-0-small"
    assert not bf16.cached and not fp32.cached
    again = zoo.build(small=True, dtype="bfloat16")  # not replaced by the float32 build
    assert again.cached and again.root == bf16.root and again.info["dtype"] == "bfloat16"
    assert zoo.build(small=True).cached


def test_an_out_holding_another_recipe_is_refused_unless_forced(no_training, tmp_path):
    out = tmp_path / "my-zoo"
    zoo.build(out=out, small=True, dtype="bfloat16")
    before = (out / build_module.ZOO_JSON).read_text()
    with pytest.raises(OutputExistsError) as info:
        zoo.build(out=out, small=True)
    assert str(info.value) == (
        f"{out} holds a zoo built with dtype 'bfloat16', but this build asks for dtype 'float32'; "
        "pass --force to replace it, or choose another --out directory"
    )
    with pytest.raises(OutputExistsError, match="seed 0, but this build asks for seed 1"):
        zoo.build(out=out, small=True, dtype="bfloat16", seed=1)
    assert (out / build_module.ZOO_JSON).read_text() == before
    rebuilt = zoo.build(out=out, small=True, force=True)
    assert not rebuilt.cached and rebuilt.info["dtype"] == "float32"
    assert isinstance(info.value, ConfigError)  # an --out that cannot be used


def test_the_default_cache_entry_of_another_recipe_is_rebuilt(no_training):
    first = zoo.build(small=True)
    second = zoo.build(small=True, threads=2)  # same directory: the cache is moelens' own
    assert second.root == first.root and not second.cached
    assert second.info["recipe"]["threads"] == 2


def _dead_pid() -> int:
    proc = fork.Process(target=os._exit, args=(0,))
    proc.start()
    proc.join(TIMEOUT)
    return proc.pid


def test_leftovers_of_dead_builds_are_removed(no_training, tmp_path):
    out = tmp_path / "zoo"
    dead, alive = _dead_pid(), os.getppid()
    leftovers = [tmp_path / f".zoo.partial-{dead}", tmp_path / f".zoo.old-{dead}"]
    kept = [tmp_path / f".zoo.partial-{alive}", tmp_path / ".zoo.partial-mine"]
    for p in leftovers + kept:
        (p / "base").mkdir(parents=True)
    (tmp_path / ".zoo.lock").write_text(f"{dead}\n")  # a killed builder's lock file
    zoo.build(out=out, small=True)
    assert [p for p in leftovers if p.exists()] == []
    assert all(p.exists() for p in kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["zoo", *(p.name for p in kept)])


def _build_and_hang(out: str, conn) -> None:
    """Child: a build whose training reports, then never ends (until SIGKILL)."""

    def hang(tmp, recipe, seed, progress):
        (tmp / "half-written").write_text("...")
        conn.send(("training", os.getpid()))
        time.sleep(3600)

    build_module._build_into = hang
    zoo.build(out=out, small=True)


def test_a_build_killed_mid_way_blocks_nothing_and_is_cleaned_up(no_training, tmp_path):
    out = tmp_path / "zoo"
    parent, child = fork.Pipe()
    proc = fork.Process(target=_build_and_hang, args=(str(out), child), daemon=True)
    proc.start()
    assert parent.poll(TIMEOUT)
    _, pid = parent.recv()
    assert (tmp_path / f".zoo.partial-{pid}" / "half-written").exists()
    with pytest.raises(RunDirectoryError, match=f"pid {pid}"):
        build_module.zoo_lock(out, blocking=False).acquire()
    os.kill(pid, signal.SIGKILL)
    proc.join(TIMEOUT)

    built = zoo.build(out=out, small=True)  # the lock died with its holder: no wait
    assert not built.cached
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo"]


def _hold_then_finish(out: str, conn) -> None:
    """Child: hold the zoo's lock, then, when told, write a finished zoo and exit."""
    with build_module.zoo_lock(Path(out)):
        conn.send("locked")
        conn.recv()
        tmp = Path(out).parent / f".{Path(out).name}.partial-{os.getpid()}"
        tmp.mkdir()
        info = fake_build_into(tmp, zoo.recipe_for(small=True), 0, None)
        info["files"] = {build_module.FACTS: (tmp / build_module.FACTS).stat().st_size}
        info["built_by"] = os.getpid()
        (tmp / build_module.ZOO_JSON).write_text(json.dumps(info))
        os.replace(tmp, out)


def test_a_second_build_waits_for_the_first_and_finds_its_zoo(no_training, tmp_path, monkeypatch):
    out = tmp_path / "zoo"
    parent, child = fork.Pipe()
    proc = fork.Process(target=_hold_then_finish, args=(str(out), child), daemon=True)
    proc.start()
    assert parent.poll(TIMEOUT) and parent.recv() == "locked"

    def must_not_train(*args):
        raise AssertionError("built while another process was building the same zoo")

    monkeypatch.setattr(build_module, "_build_into", must_not_train)
    result: dict[str, Any] = {}
    waiter = threading.Thread(target=lambda: result.update(zoo=zoo.build(out=out, small=True)), daemon=True)
    waiter.start()
    waiter.join(1.0)
    assert waiter.is_alive() and not out.exists()  # waiting for the lock
    parent.send("go")
    proc.join(TIMEOUT)
    waiter.join(TIMEOUT)
    assert not waiter.is_alive() and "zoo" in result
    assert result["zoo"].cached and result["zoo"].info["built_by"] == proc.pid
