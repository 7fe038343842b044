"""Engine: fit(), checkpoints, run directories, metrics."""

from cnnlab.engine.config import TrainConfig
from cnnlab.engine.device import resolve_device
from cnnlab.engine.evaluate import evaluate_batches
from cnnlab.engine.reporter import Reporter
from cnnlab.engine.result import TrainResult
from cnnlab.engine.trainer import fit

__all__ = ["Reporter", "TrainConfig", "TrainResult", "evaluate_batches", "fit", "resolve_device"]
