"""moelens: look inside Mixture-of-Experts language models.

>>> import moelens as ml
>>> model = ml.open_model("mistralai/Mixtral-8x7B-v0.1")   # or a local directory
>>> model.layer(0).router().weight.shape
"""

from moelens.checkpoint import ExpertWeights, MoELayer, MoEModel, RouterWeights, open_model
from moelens.errors import MoelensError
from moelens.results import Run, load_run, load_runs

__version__ = "0.1.0"

__all__ = [
    "ExpertWeights", "MoELayer", "MoEModel", "RouterWeights", "open_model", "MoelensError",
    "Run", "load_run", "load_runs", "__version__",
]
