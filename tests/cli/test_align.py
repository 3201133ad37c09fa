"""``moelens align`` end to end on a tiny checkpoint, and its one-line errors."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

import moelens as ml
from moelens import cli
from moelens.cli.app import app as cli_app


def _cells(output: str, k: int) -> list[str]:
    """The cells of the summary row whose first cell is ``k``."""
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0] == str(k):
            return cells
    raise AssertionError(f"no row for k={k} in:\n{output}")


def test_align_writes_the_run_and_prints_the_summary(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("MOELENS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = ["align", str(tiny_checkpoint("mixtral")), "--out", str(out), "--layers", "0-1", "--k", "1,2,4,32",
            "--null", "shuffle", "--device", "cpu", "--cache"]
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 0, result.output
    for header in ("align", "delta_vs_shuffle", "z_vs_shuffle", "effect_over_random", "cos_squared", "z_layer", "p_layer"):
        assert header in result.output
    run = ml.load_run(out)
    assert run.manifest["status"] == "complete" and run.manifest["options"]["k"] == [1, 2, 4, 32]
    summary = run["alignment_layers"].groupby("k")[["align", "cos_squared"]].mean()
    row1, row2 = _cells(result.output, 1), _cells(result.output, 2)
    assert float(row1[1]) == pytest.approx(summary.loc[1, "align"], abs=1e-6)
    assert float(row1[5]) == pytest.approx(summary.loc[1, "cos_squared"], abs=1e-6)
    assert row2[5] == ""  # cos² is defined at k = 1 only: blank, not 0
    assert "nan" not in result.output.lower()
    assert (tmp_path / "cache" / "spectra").is_dir()
    # a second call resumes the finished run and prints the same table
    again = CliRunner().invoke(cli_app, args)
    assert again.exit_code == 0 and _cells(again.output, 4) == _cells(result.output, 4)


def test_per_layer_tables(tiny_checkpoint, tmp_path):
    args = ["align", str(tiny_checkpoint("mixtral")), "--out", str(tmp_path / "r"), "--k", "1,8", "--per-layer", "--no-cache"]
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 0, result.output
    assert "(layer 0)" in result.output and "(layer 1)" in result.output


def _run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["moelens", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return int(exit_info.value.code), capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--k", "1,64"], "k=64 is outside 1..d"),
    (["--matrix", "w1"], "unknown matrix 'w1'"),
    (["--layers", "0,7"], "layer 7 is out of range"),
    (["--null", "bootstrap"], "unknown null model"),
])
def test_user_errors_are_one_line_and_exit_2(tiny_checkpoint, tmp_path, monkeypatch, capsys, extra, message):
    code, err = _run_main(monkeypatch, capsys, "align", str(tiny_checkpoint("mixtral")), "--out", str(tmp_path / "x"), "--no-cache", *extra)
    assert code == 2
    assert message in err
    assert err.strip().count("\n") == 0 and err.startswith("error:")
    assert "Traceback" not in err


def test_dense_model_is_one_line_and_exit_2(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    code, err = _run_main(monkeypatch, capsys, "align", str(tiny_checkpoint("llama")), "--out", str(tmp_path / "x"), "--no-cache")
    assert code == 2
    assert "dense" in err and err.strip().count("\n") == 0
