"""Damage done to a saved run directory, one case per kind of damage a user's disk or editor makes.

Each case names what the loader must report: the file and, for a manifest field, its path. The
cases are shared by the loader's tests (tests/results) and the CLI's (tests/report, tests/merge).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Damage:
    """``apply(run_dir)`` damages the run; the error must name ``file`` and contain ``expect``."""

    id: str
    apply: Callable[[Path], None]
    file: str
    expect: str


def _set_field(path: str, value: Any) -> Callable[[Path], None]:
    """Set the manifest field at ``path`` (``options.layers``) to ``value``, creating parents."""

    def apply(run: Path) -> None:
        manifest = json.loads((run / "manifest.json").read_text())
        *parents, last = path.split(".")
        node = manifest
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
        (run / "manifest.json").write_text(json.dumps(manifest))

    return apply


def _drop_field(key: str) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        manifest = json.loads((run / "manifest.json").read_text())
        del manifest[key]
        (run / "manifest.json").write_text(json.dumps(manifest))

    return apply


def _write_bytes(data: bytes) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        (run / "manifest.json").write_bytes(data)

    return apply


def _truncate_manifest(run: Path) -> None:
    text = (run / "manifest.json").read_bytes()
    (run / "manifest.json").write_bytes(text[: len(text) // 2])


def _non_utf8(run: Path) -> None:
    text = (run / "manifest.json").read_bytes()
    (run / "manifest.json").write_bytes(text.replace(b'"label": "', b'"label": "\xff\xfe', 1))


#: (field path, a value of the wrong JSON type there)
WRONG_FIELDS: list[tuple[str, Any]] = [
    ("analysis", 3), ("status", "done"), ("status", 1), ("label", ["x"]), ("created", 20260101),
    ("options", []), ("options", "fast"), ("options.layers", "x"), ("options.layers", [0, "1"]), ("options.layers", [0, 1.5]),
    ("options.seed", "0"), ("options.seed", True), ("options.device", 3), ("options.groups", 0), ("options.k", {"a": 1}),
    ("inputs", []), ("inputs.a", [1]), ("inputs.a.n_experts", "8"), ("inputs.a.files", ["x"]), ("inputs.a.top_k", -1),
    ("inputs.a.n_layers", 4.5), ("inputs.a.name", {}), ("versions", []), ("versions.moelens", 1),
    ("timings", []), ("timings.total_s", "1"), ("timings.per_unit_s", [1]), ("timings.per_unit_s.L0", None),
    ("tables", []), ("tables.clusters", {"layer": "int"}), ("tables.clusters", [["layer"]]), ("tables.clusters", [["layer", "complex"]]),
    ("warnings", []), ("warnings.L0", "slow"), ("completed_units", "L0"), ("units", [0]),
    ("notes", "x"), ("executor", "local"), ("executor.name", "slurm"), ("seed", 1.5), ("threads", "2"), ("threads", 0), ("schema_version", "1"),
]

MANIFEST_DAMAGE: list[Damage] = [
    *(Damage(f"{path}={json.dumps(value)}", _set_field(path, value), "manifest.json", f": {path}") for path, value in WRONG_FIELDS),
    Damage("non-utf8", _non_utf8, "manifest.json", "not UTF-8"),
    Damage("truncated", _truncate_manifest, "manifest.json", "not valid JSON"),
    Damage("not-json", _write_bytes(b"analysis: clustering\n"), "manifest.json", "not valid JSON"),
    Damage("empty", _write_bytes(b""), "manifest.json", "not valid JSON"),
    Damage("top-level-array", _write_bytes(b"[1, 2, 3]\n"), "manifest.json", "must be a JSON object"),
    Damage("top-level-null", _write_bytes(b"null\n"), "manifest.json", "must be a JSON object"),
    Damage("missing-analysis", _drop_field("analysis"), "manifest.json", "analysis is missing"),
    Damage("missing-status", _drop_field("status"), "manifest.json", "status is missing"),
    # a run of an older layout is no damage, but it is refused in the same one line, with what to do
    Damage("old-schema", _set_field("schema_version", 1), "manifest.json", "written by another moelens version (manifest schema 1"),
    Damage("no-schema", _drop_field("schema_version"), "manifest.json", "written by another moelens version (no schema version"),
]


def _edit_table(name: str, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        file = run / f"{name}.parquet"
        edit(pd.read_parquet(file)).to_parquet(file, index=False)

    return apply


def _set(column: str, row: int, value: Any) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def edit(table: pd.DataFrame) -> pd.DataFrame:
        table = table.copy()
        if isinstance(value, float) and np.isnan(value) and table[column].dtype.kind in "iub":
            table[column] = table[column].astype("float64" if table[column].dtype.kind != "b" else "object")
        table.loc[row, column] = value
        return table

    return edit


def _no_dominant(table: pd.DataFrame) -> pd.DataFrame:
    table = table.copy()
    first = table.index[(table["layer"] == 0) & table["dominant"]][0]
    table.loc[first, "dominant"] = False
    return table


def _two_dominants(table: pd.DataFrame) -> pd.DataFrame:
    table = table.copy()
    layer0 = table[table["layer"] == 0]
    cluster = layer0.loc[layer0["dominant"], "cluster"].iloc[0]
    other = layer0.index[(layer0["cluster"] == cluster) & ~layer0["dominant"]]
    if len(other) == 0:  # a singleton: join a second dominant expert into it
        second = layer0.index[layer0["dominant"] & (layer0["cluster"] != cluster)][0]
        table.loc[second, "cluster"] = cluster
        return table
    table.loc[other[0], "dominant"] = True
    return table


def _truncate_table(name: str) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        data = (run / f"{name}.parquet").read_bytes()
        (run / f"{name}.parquet").write_bytes(data[: len(data) // 2])

    return apply


def _replace_table(name: str, data: bytes) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        (run / f"{name}.parquet").write_bytes(data)

    return apply


#: Damage to the tables of a synthetic clustering run (8 experts, 4 layers, 4 clusters per layer).
TABLE_DAMAGE: list[Damage] = [
    Damage("missing-column", _edit_table("clusters", lambda t: t.drop(columns=["dominant"])), "clusters.parquet", "dominant"),
    Damage("wrong-dtype", _edit_table("clusters", lambda t: t.assign(cluster=t["cluster"].astype(str))), "clusters.parquet", "cluster"),
    Damage("negative-cluster", _edit_table("clusters", _set("cluster", 0, -1)), "clusters.parquet", "cluster"),
    Damage("expert-beyond-model", _edit_table("clusters", _set("expert", 7, 8)), "clusters.parquet", "8 experts"),
    Damage("layer-beyond-model", _edit_table("clusters", lambda t: t.assign(layer=t["layer"] + 10)), "clusters.parquet", "layers"),
    Damage("cluster-gap", _edit_table("clusters", lambda t: t.assign(cluster=t["cluster"] * 2)), "clusters.parquet", "without gaps"),
    Damage("missing-dominant", _edit_table("clusters", _no_dominant), "clusters.parquet", "dominant"),
    Damage("two-dominants", _edit_table("clusters", _two_dominants), "clusters.parquet", "dominant"),
    Damage("expert-twice", _edit_table("clusters", _set("expert", 1, 0)), "clusters.parquet", "once each"),
    Damage("nan-frequency", _edit_table("clusters", _set("frequency", 2, float("nan"))), "clusters.parquet", "missing value"),
    Damage("nan-layer", _edit_table("clusters", _set("layer", 2, float("nan"))), "clusters.parquet", "layer"),
    Damage("share-above-one", _edit_table("clusters", _set("frequency", 3, 1.5)), "clusters.parquet", "[0, 1]"),
    Damage("usage-share-negative", _edit_table("calibration_usage", _set("frequency", 0, -0.1)), "calibration_usage.parquet", "[0, 1]"),
    Damage("usage-missing-column", _edit_table("calibration_usage", lambda t: t.drop(columns=["count"])), "calibration_usage.parquet",
           "count"),
    Damage("layers-nan", _edit_table("cluster_layers", _set("dominant_frequency", 0, float("nan"))), "cluster_layers.parquet",
           "dominant_frequency"),
    Damage("truncated-parquet", _truncate_table("clusters"), "clusters.parquet", "Parquet"),
    Damage("not-parquet", _replace_table("clusters", b"layer,expert\n0,0\n"), "clusters.parquet", "Parquet"),
    Damage("empty-parquet", _replace_table("clusters", b""), "clusters.parquet", "Parquet"),
]


_TEMPLATE: list[Path] = []


def save_clustering_run(directory: Path) -> Path:
    """A synthetic clustering run saved as ``directory``, its manifest as the runner writes it
    (saved once per process and copied for each test: cheaper than building and writing it again)."""
    import atexit
    import shutil
    import tempfile

    from moelens.testing.synthetic_clusters import synthetic_clustering_run

    if not _TEMPLATE:
        root = Path(tempfile.mkdtemp(prefix="moelens-damage-"))
        atexit.register(shutil.rmtree, root, True)
        run = synthetic_clustering_run()
        run.manifest["inputs"]["a"]["n_layers"] = 4  # the runner records the model's layers (the synthetic run has 4, all MoE)
        _TEMPLATE.append(run.save(root / "run"))
    return Path(shutil.copytree(_TEMPLATE[0], directory))


def assert_one_line_naming(message: str, damage: Damage, run: Path) -> None:
    """The error is one line that names the damaged file and says what is wrong there."""
    assert "\n" not in message.strip(), message
    assert str(run / damage.file) in message, message
    assert damage.expect in message, message





def run_cli(args: list[str], capsys: Any) -> tuple[int, str, str]:
    """``moelens ARGS`` through the CLI's entry point in this process: (exit status, stdout, stderr)."""
    import sys

    from moelens.cli import main

    argv = sys.argv
    sys.argv = ["moelens", *args]
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code: int, err: str, damage: Damage, run: Path) -> None:
    """Exit status 2, one line on stderr naming the damaged file, no traceback."""
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert_one_line_naming(err, damage, run)
__all__ = ["MANIFEST_DAMAGE", "TABLE_DAMAGE", "Damage", "assert_one_line_naming", "assert_refused", "run_cli", "save_clustering_run"]
