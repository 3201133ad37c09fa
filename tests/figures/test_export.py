"""Saving figures: the format follows the suffix, the same figure gives the same bytes, and a
suffix or dpi that cannot be used is one clear error before anything is drawn or written."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
from dataclasses import astuple
from pathlib import Path

import pytest

from moelens import figures
from moelens.errors import ConfigError
from moelens.figures.export import check_dpi
from moelens.testing.synthetic_runs import synthetic_alignment_run
from tests.cli.helpers import run_moelens


def moelens_command() -> list[str]:
    """The installed ``moelens`` console script beside this interpreter (``python -m moelens``
    where the environment has no scripts folder)."""
    script = Path(sys.executable).with_name("moelens")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "moelens"]


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG, from its IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".svg", b"<svg"), (".pdf", b"%PDF")])
@pytest.mark.parametrize("name", ["comparison_panels", "complete_analysis"])
def test_save_by_suffix(tmp_path, one_run, name, suffix, magic):
    fig = figures.draw(name, [one_run])
    path = figures.save(fig, tmp_path / f"fig{suffix}", dpi=60)
    data = path.read_bytes()
    assert data.startswith(magic)
    assert len(data) > 5_000


def test_png_has_the_pixels_the_dpi_asks_for(tmp_path, one_run):
    fig = figures.shuffle_statistics([one_run])
    width, height = fig.get_size_inches()
    for dpi in (10, 72):
        data = figures.save(fig, tmp_path / f"fig-{dpi}.png", dpi=dpi).read_bytes()
        shown = png_size(data)
        assert abs(shown[0] - width * dpi) < 1 and abs(shown[1] - height * dpi) < 1, (shown, dpi)


def test_svg_is_reproducible_and_names_no_resource(one_run):
    first = figures.figure_bytes(figures.shuffle_statistics([one_run]), "svg")
    second = figures.figure_bytes(figures.shuffle_statistics([one_run]), "svg")
    assert first == second, "the same figure must give the same SVG bytes (no dates, fixed ids)"
    text = first.decode()
    urls = re.findall(r"https?://[^\s\"'<>]+", text)
    # XML namespace names are identifiers, not resources a viewer fetches.
    namespaces = set(re.findall(r'xmlns(?::\w+)?="([^"]+)"', text))
    assert set(urls) <= namespaces
    assert "<!DOCTYPE" not in text and "<metadata" not in text


def test_save_rejects_an_unknown_suffix(tmp_path, one_run):
    with pytest.raises(ConfigError, match=r"\.png, \.svg or \.pdf"):
        figures.save(figures.shuffle_statistics([one_run]), tmp_path / "fig.jpg")


@pytest.mark.parametrize("dpi", [0, -1, 9, 1201, 100_000, 2.5, float("nan"), float("inf"), True, "300"])
def test_save_rejects_a_dpi_outside_the_range(tmp_path, one_run, dpi):
    fig = figures.shuffle_statistics([one_run])
    out = tmp_path / "sub" / "fig.png"
    with pytest.raises(ConfigError, match=r"^dpi must be a whole number from 10 to 1200; got ") as error:
        figures.save(fig, out, dpi=dpi)
    assert "\n" not in str(error.value)
    assert not out.parent.exists(), "nothing is written, not even the folder"
    with pytest.raises(ConfigError, match="from 10 to 1200"):
        figures.figure_bytes(fig, "svg", dpi=dpi)


def test_save_rejects_a_dpi_that_makes_too_many_pixels(tmp_path, one_run):
    """13 × 14.5 inches at 1200 dpi would be 271 megapixels (about 1 GB while drawing)."""
    fig = figures.complete_analysis(one_run)
    out = tmp_path / "fig.png"
    with pytest.raises(ConfigError, match=r"\d+ megapixels, over the 100 allowed; use a dpi from 10 to \d+$"):
        figures.save(fig, out, dpi=1200)
    assert not out.exists()
    assert check_dpi(fig, 728) == 728  # the most that the message offers is accepted


def test_save_accepts_a_whole_float_dpi(tmp_path, one_run):
    data = figures.save(figures.shuffle_statistics([one_run]), tmp_path / "fig.png", dpi=20.0).read_bytes()
    assert png_size(data)[0] == 10.5 * 20


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return synthetic_alignment_run(hidden_size=64, n_experts=4).save(tmp_path_factory.mktemp("runs") / "run")


@pytest.mark.parametrize("dpi", ["0", "-1", "100000"])
def test_cli_rejects_a_dpi_in_one_line(tmp_path, run_dir, dpi):
    out = tmp_path / "x.png"
    args = ["figure", "shuffle_statistics", str(run_dir), "--out", str(out), "--dpi", dpi]
    if dpi == "0":  # the installed script, start-up included; the other values in this process
        done = subprocess.run([*moelens_command(), *args], capture_output=True, text=True, timeout=120, check=False)
    else:
        done = subprocess.CompletedProcess(args, *astuple(run_moelens(*args)))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "from 10 to 1200" in lines[0] and f"got {dpi}" in lines[0], done.stderr
    assert not out.exists()
