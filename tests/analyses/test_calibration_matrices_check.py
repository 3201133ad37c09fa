"""A calibration run's matrices are checked (opened, shapes, dtypes) when a clustering plans on it,
before the first unit: a truncated or misshapen matrix is one error, not a failure after parts."""

from __future__ import annotations

import numpy as np
import pytest

import moelens as ml
from moelens.analyses.clustering.analysis import check_calibration_matrices
from moelens.calibration.store import MatrixStore
from moelens.errors import ConfigError, RunDirectoryError


@pytest.fixture
def model(tiny_checkpoint):
    return ml.open_model(tiny_checkpoint("mixtral", "per_expert"))


def store_with(tmp_path, features: np.ndarray, logits: np.ndarray) -> MatrixStore:
    store = MatrixStore(tmp_path / "matrices")
    store.write(0, "features", features)
    store.write(0, "router_logits", logits)
    return store


def test_matrices_of_the_right_shapes_pass(model, tmp_path):
    e, d = model.layer(0).n_experts, model.hidden_size
    check_calibration_matrices(store_with(tmp_path, np.zeros((e, d)), np.zeros((7, e), np.float32)), [0], model, "RUN")


@pytest.mark.parametrize("features_shape, logits_shape, phrase", [
    ((4, 31), (7, 4), "features [4, 31] where [E, d] = [4, 32]"),
    ((4, 32), (7, 3), "router_logits [7, 3] where [N, E] = [N, 4]"),
    ((4, 32), (28,), "router_logits [28] where [N, E] = [N, 4]"),
])
def test_a_misshapen_matrix_is_named(model, tmp_path, features_shape, logits_shape, phrase):
    store = store_with(tmp_path, np.zeros(features_shape), np.zeros(logits_shape, np.float32))
    with pytest.raises(ConfigError, match="layer 0 holds " + phrase.replace("[", r"\[").replace("]", r"\]")):
        check_calibration_matrices(store, [0], model, "RUN")


def test_a_truncated_matrix_is_named(model, tmp_path):
    store = store_with(tmp_path, np.zeros((4, 32)), np.zeros((7, 4), np.float32))
    path = tmp_path / "matrices"
    target = next(path.rglob("features.npy"))
    target.write_bytes(target.read_bytes()[:-40])
    with pytest.raises(RunDirectoryError, match="features.npy cannot be read"):
        check_calibration_matrices(store, [0], model, "RUN")
