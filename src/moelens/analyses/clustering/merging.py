"""Merged checkpoints from a clustering run (docs/methods.md §3, §7), checked to be of the model merged.

The merge itself is :func:`moelens.merge.export_merged`: usage-weighted averages of each
cluster's members, after weight-matching permutation onto the cluster's dominant expert unless
``permute=False``, written as a ``compact`` checkpoint (G experts per layer, router rows the
members' usage-weighted mean) or a ``shared`` one (E router rows kept, every member given its
cluster's merged weights).

>>> merge_clusters("zoo/base", "runs/hc-smoe", "merged/base-hc")           # compact, permuted
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from moelens.checkpoint.model import MoEModel
from moelens.errors import ConfigError, RunDirectoryError
from moelens.results.run import Run


def clusters_of(run: str | os.PathLike[str] | Run, model: MoEModel, option: str = "--clusters") -> tuple[Run, pd.DataFrame]:
    """The clustering run (a directory or a Run) and its ``clusters`` table, refused unless it
    was made from ``model``'s weight files."""
    from moelens.analyses.clustering.analysis import check_same_model
    from moelens.results import load_run

    if not isinstance(run, Run):
        try:
            run = load_run(run)
        except RunDirectoryError as err:
            raise ConfigError(f"{option} {run}: {err}") from None
    analysis = run.manifest.get("analysis")
    if analysis != "clustering" or "clusters" not in run.tables:
        where = f" {run.path}" if run.path else ""
        raise ConfigError(f"{option}{where} is a {analysis} run; give the --out directory of moelens cluster")
    check_same_model(run, model, "clusters run", f"cluster {model.name} itself (moelens cluster {model.path} …)")
    return run, run["clusters"]


def merge_clusters(model: MoEModel | str | os.PathLike[str], clusters: str | os.PathLike[str] | Run, out: str | os.PathLike[str],
                   export: str = "compact", permute: bool = True, device: str = "cpu") -> Path:
    """Merge ``model``'s experts by the clusters of a clustering run and write the checkpoint to
    ``out`` (new or empty); returns ``out``. Every check (the run is of this model; the compact
    form's constraints; an empty ``out``) happens before anything is written."""
    from transformers.utils import logging as hf_logging

    from moelens.checkpoint import open_model
    from moelens.merge import export_merged
    from moelens.spectral import resolve_device

    view = model if isinstance(model, MoEModel) else open_model(model)
    _, table = clusters_of(clusters, view)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a checkpoint this small is written at once: no "Writing model shards" bar
    try:
        return export_merged(view.path, table, out, export=export, permute=permute, device=resolve_device(device), revision=view.revision)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


__all__ = ["clusters_of", "merge_clusters"]
