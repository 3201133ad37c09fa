"""A damaged run directory is refused on load in one line naming the file and what is wrong:
manifest fields of the wrong JSON type (each field path), a manifest that is not UTF-8, not JSON
or not an object, missing keys; tables with a missing column, a wrong dtype, values out of range
or missing, clusters without their dominant expert, files that are not Parquet."""

from __future__ import annotations

import json

import pytest

from moelens.errors import RunDirectoryError
from moelens.results import load_run
from moelens.results.manifest import check_manifest
from tests.results.damage import MANIFEST_DAMAGE, TABLE_DAMAGE, Damage, assert_one_line_naming, save_clustering_run


@pytest.fixture
def clustering_run(tmp_path):
    return save_clustering_run(tmp_path / "run")


def test_an_undamaged_run_loads(clustering_run):
    run = load_run(clustering_run)
    assert set(run.tables) >= {"clusters", "cluster_layers", "calibration_usage"}


@pytest.mark.parametrize("damage", MANIFEST_DAMAGE, ids=lambda d: d.id)
def test_a_damaged_manifest_is_one_line_naming_the_field(clustering_run, damage: Damage):
    damage.apply(clustering_run)
    with pytest.raises(RunDirectoryError) as err:
        load_run(clustering_run)
    assert_one_line_naming(str(err.value), damage, clustering_run)


@pytest.mark.parametrize("damage", TABLE_DAMAGE, ids=lambda d: d.id)
def test_a_damaged_table_is_one_line_naming_the_file(clustering_run, damage: Damage):
    damage.apply(clustering_run)
    with pytest.raises(RunDirectoryError) as err:
        load_run(clustering_run)
    assert_one_line_naming(str(err.value), damage, clustering_run)


def test_a_run_of_the_older_layout_is_refused_in_one_line(clustering_run):
    """A manifest as versions before schema 2 wrote it (the first input again as ``model``, layers
    as ``completed_layers``, tables undeclared) is not read with guesses: one line says what to do."""
    manifest = json.loads((clustering_run / "manifest.json").read_text())
    manifest.update({"schema_version": 1, "model": manifest["inputs"]["a"], "completed_layers": [0, 1, 2, 3]})
    del manifest["tables"]
    (clustering_run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunDirectoryError) as err:
        load_run(clustering_run)
    message = str(err.value)
    assert "\n" not in message and str(clustering_run / "manifest.json") in message
    assert "manifest schema 1" in message and "run the analysis again into a new --out directory" in message


def test_the_message_shows_the_field_path_and_the_value(clustering_run):
    manifest = json.loads((clustering_run / "manifest.json").read_text())
    manifest["options"]["layers"] = "x"
    with pytest.raises(RunDirectoryError, match=r'manifest.json: options.layers must be a list of integers, got "x"'):
        check_manifest(manifest, clustering_run / "manifest.json")


def test_unknown_keys_are_kept(clustering_run):
    """A field this version does not know (a newer writer's, an analysis's extra) is no damage."""
    manifest = json.loads((clustering_run / "manifest.json").read_text())
    manifest.update({"threads": 4, "spectra_cache": {"enabled": False}, "future_field": [1, {"a": None}]})
    manifest["options"]["some_new_option"] = {"nested": [1, 2]}
    assert check_manifest(manifest, "manifest.json") is manifest


@pytest.mark.parametrize("make", ["alignment", "calibration", "clustering", "merge_cost"])
def test_every_synthetic_run_saves_and_loads(tmp_path, make):
    from moelens.testing.synthetic_clusters import (
        synthetic_calibration_run,
        synthetic_clustering_run,
        synthetic_merge_cost_run,
    )
    from moelens.testing.synthetic_runs import synthetic_alignment_run

    run = {"alignment": lambda: synthetic_alignment_run(layers=range(2), hidden_size=16), "calibration": synthetic_calibration_run,
           "clustering": synthetic_clustering_run, "merge_cost": synthetic_merge_cost_run}[make]()
    loaded = load_run(run.save(tmp_path / make))
    assert sorted(loaded.tables) == sorted(run.tables)
