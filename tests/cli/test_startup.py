"""Start-up of the command line: help, version, usage errors and path checks never import torch,
transformers or pandas (each would add seconds before the first line appears)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import moelens

HEAVY = ("torch", "transformers", "pandas", "matplotlib")

# Runs the CLI's main() as `python -m moelens` would, then reports which heavy modules it loaded.
WRAPPER = """
import json, sys
sys.argv = ["moelens", *sys.argv[1:]]
from moelens.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
sys.stderr.write("\\nLOADED " + json.dumps([m for m in %r if m in sys.modules]) + " EXIT " + str(code) + "\\n")
""" % (HEAVY,)


def _run(*args: str) -> tuple[list[str], int, str, str]:
    env = {**os.environ, "PYTHONPATH": str(Path(moelens.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True, env=env, timeout=120)
    tail = done.stderr.rsplit("\nLOADED ", 1)
    assert len(tail) == 2, done.stderr
    loaded, code = tail[1].split(" EXIT ")
    return json.loads(loaded), int(code), done.stdout, tail[0]


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("--help",), 0),
        (("--version",), 0),
        (("report", "--help"), 0),
        (("zoo", "build", "--help"), 0),
        (("inspect", "--help"), 0),
        (("alig",), 2),  # a mistyped command
        (("report",), 2),  # a missing argument
        (("inspect", "no/such/checkpoint-dir"), 2),  # a mistyped path
    ],
)
def test_no_heavy_import(args: tuple[str, ...], code: int):
    loaded, exit_code, _out, err = _run(*args)
    assert exit_code == code, err
    assert loaded == [], f"moelens {' '.join(args)} imported {loaded}"


def _every_help() -> list[str]:
    from moelens.cli.commands import listed_commands

    return [*listed_commands(), "zoo build"]


@pytest.mark.parametrize("command", _every_help())
def test_help_of_every_command_imports_nothing_heavy(command: str):
    loaded, exit_code, out, err = _run(*command.split(), "--help")
    assert exit_code == 0, err
    assert "Usage:" in out
    assert loaded == [], f"moelens {command} --help imported {loaded}"


def test_families_imports_nothing_heavy():
    loaded, exit_code, out, err = _run("families")
    assert exit_code == 0, err
    assert "mixtral" in out
    assert loaded == [], f"moelens families imported {loaded}"


#: Every command that computes from a model, with the arguments it needs besides the model (MODEL
#: first): a mistyped model is found missing before torch is imported.
COMPUTING = {
    "align": ("--out", "OUT"),
    "distance": ("--out", "OUT"),
    "modules": ("--out", "OUT"),
    "trace": ("--prompts", "facts.jsonl", "--out", "OUT"),
    "calibrate": ("--texts", "calibration.txt", "--out", "OUT"),
    "cluster": ("--calibration", "calibration.txt", "--groups", "2", "--out", "OUT"),
    "merge": ("--clusters", "RUN", "--out", "OUT"),
    "merge-cost": ("--clusters", "RUN", "--out", "OUT"),
    "atlas": ("--out", "OUT"),
}
#: A second model where a command takes one (distance B, modules B and --base, atlas --tuned).
SECOND = {"distance": (), "modules": ("--base",), "atlas": ("--tuned",)}
#: Commands that read run directories: a mistyped RUN is found missing before pandas is imported.
READING = {"report": (), "figure": ("layer_k_heatmap",)}


def _mistyped(tmp_path: Path, kind: str) -> str:
    """A model path that does not exist: a local directory, or an org/name absent from the cache."""
    return str(tmp_path / "no-such-checkpoint") if kind == "local" else "no-such-org/no-such-model"


def _one_error_line(err: str, *needles: str) -> None:
    assert err.strip().splitlines() == [err.strip()] and err.startswith("error:"), err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("kind", ["local", "repo-id"])
@pytest.mark.parametrize("command", sorted(COMPUTING))
def test_mistyped_model_is_one_line_and_imports_nothing_heavy(command: str, kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache, whatever this machine has
    model = _mistyped(tmp_path, kind)
    args = [str(tmp_path / a) if a == "OUT" else a for a in COMPUTING[command]]
    loaded, code, _out, err = _run(command, model, *args)
    assert code == 2, err
    _one_error_line(err, model, "does not exist" if kind == "local" else "Hugging Face cache")
    assert loaded == [], f"moelens {command} with a mistyped model imported {loaded}"
    assert not (tmp_path / "OUT").exists()  # nothing written


@pytest.mark.parametrize("command", sorted(SECOND))
def test_mistyped_second_model_is_one_line(command: str, tmp_path: Path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "config.json").write_text("{}")
    missing = _mistyped(tmp_path, "local")
    flag = SECOND[command]
    loaded, code, _out, err = _run(command, str(real), *flag, missing, "--out", str(tmp_path / "out"))
    assert code == 2, err
    _one_error_line(err, missing, "does not exist")
    assert loaded == [], f"moelens {command} with a mistyped second model imported {loaded}"


@pytest.mark.parametrize("command", sorted(READING))
def test_mistyped_run_is_one_line_and_imports_nothing_heavy(command: str, tmp_path: Path):
    missing = str(tmp_path / "no-such-run")
    extra = ("--out", str(tmp_path / "figure.png")) if command == "figure" else ()
    loaded, code, _out, err = _run(command, *READING[command], missing, *extra)
    assert code == 2, err
    _one_error_line(err, missing, "does not exist")
    assert loaded == [], f"moelens {command} with a mistyped run imported {loaded}"


def test_version_and_help_list_every_command():
    _loaded, _code, out, _err = _run("--version")
    assert out.strip() == f"moelens {moelens.__version__}"
    _loaded, _code, out, _err = _run("--help")
    for command in ("align", "distance", "modules", "trace", "atlas", "inspect", "families", "calibrate", "cluster",
                    "merge", "merge-cost", "report", "figure", "zoo"):
        assert f" {command} " in out


def test_mistyped_path_is_one_line():
    _loaded, code, _out, err = _run("inspect", "no/such/checkpoint-dir")
    assert code == 2
    assert err.strip().splitlines() == [err.strip()] and err.startswith("error:") and "no/such/checkpoint-dir" in err


def test_lazy_package_names():
    import moelens as ml

    assert set(ml.__all__) <= set(dir(ml))
    assert ml.open_model is __import__("moelens.checkpoint", fromlist=["open_model"]).open_model
    assert callable(ml.expert_distance) and callable(ml.set_threads)
    with pytest.raises(AttributeError):
        ml.no_such_name  # noqa: B018


def test_functions_named_like_their_module_stay_functions():
    """``ml.report`` and ``ml.atlas`` are the functions, whichever was imported first; ``import
    moelens`` alone imports nothing heavy (checked in a fresh interpreter)."""
    code = (
        "import sys, json, inspect\n"
        "import moelens as ml\n"
        "heavy = [m for m in %r if m in sys.modules]\n"
        "import moelens.report, moelens.atlas\n"  # binds the modules' names on the package
        "from moelens.report import write_report\n"
        "from moelens import report\n"
        "print(json.dumps([heavy, inspect.isfunction(ml.report), inspect.isfunction(ml.atlas), report is ml.report,\n"
        "                  ml.report.__module__, sys.modules['moelens.report'].report is ml.report]))\n"
    ) % (HEAVY,)
    env = {**os.environ, "PYTHONPATH": str(Path(moelens.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [[], True, True, True, "moelens.report", True]
