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


@pytest.mark.parametrize("damage", [d for d in TABLE_DAMAGE if d.id in ("missing-dominant", "share-above-one", "expert-beyond-model")],
                         ids=lambda d: d.id)
def test_values_are_checked_in_runs_that_do_not_declare_their_tables(tmp_path, damage: Damage):
    """Runs written before manifests declared their tables are still checked by the analysis's schemas."""
    run = save_clustering_run(tmp_path / "old", declare_tables=False)
    load_run(run)
    damage.apply(run)
    with pytest.raises(RunDirectoryError) as err:
        load_run(run)
    assert_one_line_naming(str(err.value), damage, run)


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
