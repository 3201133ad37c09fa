"""One merge per --out at a time, scratch kept under --out, and a killed merge's leftovers
removed by the next one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from moelens.errors import OutputExistsError, RunDirectoryError
from moelens.locks import LOCK_NAME, DirectoryLock
from moelens.merge import RECORD_NAME, export_merged
from moelens.safe_files import SCRATCH
from tests.merge.helpers import build_checkpoint
from tests.merge.test_export import E, table
from tests.test_safe_files import dead_pid

MERGE_SCRIPT = """
import sys
import pandas as pd
from moelens.errors import MoelensError
from moelens.merge import export_merged
try:
    export_merged(sys.argv[1], pd.read_parquet(sys.argv[2]), sys.argv[3], export="shared")
except MoelensError as exc:
    print(exc, file=sys.stderr)
    sys.exit(2)
"""


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint("mixtral", tmp_path_factory.mktemp("merge-safety") / "mixtral", E)


def test_a_merge_into_a_directory_another_merge_holds_is_refused(mixtral, tmp_path):
    out = tmp_path / "merged"
    with DirectoryLock(out):
        with pytest.raises(RunDirectoryError, match="in use by another moelens process"):
            export_merged(mixtral, table([1]), out, export="shared")
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]  # nothing of a checkpoint written


def test_two_concurrent_merges_one_wins_and_the_other_gets_one_line(mixtral, tmp_path):
    clusters = tmp_path / "clusters.parquet"
    table([1]).to_parquet(clusters)
    out = tmp_path / "merged"
    procs = [subprocess.Popen([sys.executable, "-c", MERGE_SCRIPT, str(mixtral), str(clusters), str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "Traceback" not in refused and len(refused.strip().splitlines()) == 1
    assert "in use by another moelens process" in refused or "is not empty" in refused
    assert (out / RECORD_NAME).is_file() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clusters.parquet", "merged"]  # no staging beside --out
    assert not (out / SCRATCH).exists() and not (out / LOCK_NAME).exists()


def test_a_killed_merges_scratch_is_removed_by_the_next_merge(mixtral, tmp_path):
    out = tmp_path / "merged"
    pid = dead_pid()
    stale = out / SCRATCH / f"{pid}-0badc0de"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half a checkpoint")
    (out / LOCK_NAME).write_text(f"{pid}\n")
    export_merged(mixtral, table([1]), out, export="shared")
    assert (out / RECORD_NAME).is_file()
    assert not (out / SCRATCH).exists() and not (out / LOCK_NAME).exists()
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".partial"))]


def test_a_merge_into_someones_files_writes_nothing(mixtral, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    with pytest.raises(OutputExistsError, match="is not empty"):
        export_merged(mixtral, table([1]), out, export="shared")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
