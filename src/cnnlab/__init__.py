"""cnnlab: convolutional neural networks from a single 3x3 kernel to the ImageNet model zoo."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cnnlab")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from cnnlab.api import Run, load_run, train
from cnnlab.data import load_dataset
from cnnlab.engine import Reporter, TrainConfig, TrainResult, fit
from cnnlab.engine.callbacks import Callback
from cnnlab.engine.export import export_run
from cnnlab.engine.inference import evaluate_run, predict_files, predict_pretrained
from cnnlab.errors import CnnlabError, UsageError
from cnnlab.models import create_model, list_models, register_model

__all__ = [
    "Callback",
    "CnnlabError",
    "Reporter",
    "Run",
    "TrainConfig",
    "TrainResult",
    "UsageError",
    "__version__",
    "create_model",
    "evaluate_run",
    "export_run",
    "fit",
    "list_models",
    "load_dataset",
    "load_run",
    "predict_files",
    "predict_pretrained",
    "register_model",
    "train",
]
