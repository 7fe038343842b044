"""Engine: fit(), checkpoints, run directories, metrics."""

from cnnlab.engine.reporter import Reporter
from cnnlab.engine.trainer import TrainConfig, TrainResult, evaluate_batches, fit, resolve_device

__all__ = ["Reporter", "TrainConfig", "TrainResult", "evaluate_batches", "fit", "resolve_device"]
