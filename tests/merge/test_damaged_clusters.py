"""`moelens merge` refuses a damaged clustering run (manifest or clusters table) in one line on
stderr, with exit status 2, no traceback, and no checkpoint written (--out is not created)."""

from __future__ import annotations

import pytest

from tests.merge.helpers import build_checkpoint
from tests.results.damage import MANIFEST_DAMAGE, TABLE_DAMAGE, Damage, assert_refused, run_cli, save_clustering_run

#: Every table damage, and manifest damage of each kind (the loader's tests try every field path).
CASES = TABLE_DAMAGE + [d for d in MANIFEST_DAMAGE if d.id in (
    "options=[]", "options.layers=\"x\"", "options.layers=[0, \"1\"]", "inputs.a=[1]", "inputs.a.n_experts=\"8\"", "model=\"synthetic\"",
    "status=\"done\"", "tables.clusters=[[\"layer\"]]", "timings.total_s=\"1\"", "non-utf8", "truncated", "not-json",
    "top-level-array", "missing-analysis", "missing-status",
)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint("mixtral", tmp_path_factory.mktemp("merge-damage") / "mixtral", 8)


@pytest.mark.parametrize("damage", CASES, ids=lambda d: d.id)
def test_merge_refuses_a_damaged_clustering_run(tmp_path, capsys, checkpoint, damage: Damage):
    run = save_clustering_run(tmp_path / "clusters")
    damage.apply(run)
    out = tmp_path / "merged"
    code, _, err = run_cli(["merge", str(checkpoint), "--clusters", str(run), "--out", str(out)], capsys)
    assert_refused(code, err, damage, run)
    assert not out.exists()


def test_the_undamaged_run_gets_past_the_checks(tmp_path, capsys, checkpoint):
    """Undamaged, the same run is refused only because it was not made from this checkpoint: the
    refusals above are the damage's doing."""
    run = save_clustering_run(tmp_path / "clusters")
    code, _, err = run_cli(["merge", str(checkpoint), "--clusters", str(run), "--out", str(tmp_path / "merged")], capsys)
    assert code == 2 and "clusters run" in err and str(run / "manifest.json") not in err, err
