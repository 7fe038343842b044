"""Engine: fit(), checkpoints, run directories, metrics."""

from cnnlab._lazy import lazy_attributes

# Imported on first use: `cnnlab.engine.rundir` (or any other module here) can be imported without the trainer.
_PUBLIC = {
    "Reporter": "cnnlab.engine.reporter",
    "TrainConfig": "cnnlab.engine.config",
    "TrainResult": "cnnlab.engine.result",
    "evaluate_batches": "cnnlab.engine.evaluate",
    "fit": "cnnlab.engine.trainer",
    "resolve_device": "cnnlab.engine.device",
}
__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = lazy_attributes(globals(), _PUBLIC)
