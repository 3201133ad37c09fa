"""The clustering tests' tiny model and its text files, built once per test process for the
calibration, clustering, merge and fingerprint tests (which read them and copy them before any
change)."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import clustering_fixtures as fx


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`clustering_fixtures.save_model` at seed 0 (Mixtral layout, 2 layers, 8 experts)."""
    return fx.save_model(tmp_path_factory.mktemp("clustering-lm") / "tiny")


@pytest.fixture(scope="session")
def lm_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"text": calibration.txt, "facts": facts.jsonl}`` of :mod:`clustering_fixtures`."""
    root = tmp_path_factory.mktemp("clustering-files")
    return {"text": fx.write_text(root / "calibration.txt"), "facts": fx.write_facts(root / "facts.jsonl")}
