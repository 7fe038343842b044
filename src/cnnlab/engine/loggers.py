"""Experiment loggers: callbacks that send a run's epochs, test metrics and pictures to TensorBoard or MLflow.

metrics.csv is always written (Checkpointing does it); `logger=("tensorboard", "mlflow")` adds these:

    tensorboard   event files in RUN/tensorboard/: per epoch (step = epoch) loss/train, loss/val, accuracy/train,
                  accuracy/val and lr; at the end test/loss, test/accuracy, test/top5 and two images, `curves` and
                  `confusion` (the best weights on the test split). View with `tensorboard --logdir runs`.
    mlflow        a run in experiment 'cnnlab' ($MLFLOW_EXPERIMENT_NAME) of the store $MLFLOW_TRACKING_URI names, or
                  else of a local file store ./mlruns (in the working directory, where `mlflow ui` looks): the train
                  options as params, metrics.csv's columns per epoch (step = epoch), test_loss/test_acc/test_top5,
                  and curves.png and confusion.png as artifacts. RUN/mlflow.json records which store and run.

Only rank 0 of a data-parallel run logs. A resumed run appends to the same logs without repeating an epoch: TensorBoard
hides the events from the epoch the checkpoint resumes at onwards (purge_step) and they are logged again, bit for bit;
MLflow reopens its run and skips the epochs it already holds. The packages are optional extras (`pip install
"cnnlab[tensorboard]"`); fit() asks check_installed() before anything is loaded or written.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cnnlab.engine import rundir
from cnnlab.engine.callbacks import Callback
from cnnlab.errors import OptionError, UsageError
from cnnlab.fileio import atomic_write_json

if TYPE_CHECKING:
    from cnnlab.engine.callbacks import Loop as Trainer
    from cnnlab.engine.result import TrainResult

TENSORBOARD_DIR, MLFLOW_FILE, CONFUSION = "tensorboard", "mlflow.json", "confusion.png"
EXPERIMENT = "cnnlab"  # the MLflow experiment, unless $MLFLOW_EXPERIMENT_NAME names another
# TensorBoard groups tags by their first part: loss/train and loss/val share one chart.
TB_TAGS = {
    "train_loss": "loss/train", "val_loss": "loss/val", "train_acc": "accuracy/train", "val_acc": "accuracy/val",
    "seconds": "time/epoch_seconds", "elapsed": "time/elapsed_seconds",
    "test_loss": "test/loss", "test_acc": "test/accuracy", "test_top5": "test/top5", "val_mAP": "mAP/val",
    "test_map": "test/mAP",
}  # fmt: skip
TEST_FIELDS = ("test_loss", "test_acc", "test_top5", "test_map")  # of TrainResult, logged at the end (when measured)


class Pictures:
    """The end-of-run pictures, made once for all the run's loggers: curves.png and confusion.png.

    They are the run directory's own files (curves.png is already there; confusion.png is what `cnnlab evaluate`
    writes); without a run directory they go to a temporary folder that lives as long as this object.
    """

    def __init__(self) -> None:
        self.made: dict[str, Path] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def paths(self, loop: Trainer, result: TrainResult) -> dict[str, Path]:
        """{'curves': PNG, 'confusion': PNG} (no confusion without test images)."""
        from cnnlab.inspect.visualize import plot_confusion, plot_curves

        if self.made is not None:
            return self.made
        if loop.run is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="cnnlab-pictures-")
        folder = loop.run or Path(self._tmp.name)
        title = f"{loop.config.model} on {loop.data.name}"
        curves = folder / rundir.CURVES
        if not curves.is_file():  # fit writes it into a run directory before on_train_end
            best = result.best_epoch if loop.val_set is not None else None
            plot_curves(loop.history, curves, title=title, best_epoch=best)
        self.made = {"curves": curves}
        cm = test_confusion(loop)
        if cm is not None:
            what = f"confusion matrix: {title} (test, {int(cm.sum()):,} images)"
            self.made["confusion"] = plot_confusion(cm, loop.data.classes, folder / CONFUSION, title=what)
        return self.made


@torch.no_grad()
def test_confusion(loop: Trainer) -> torch.Tensor | None:
    """(K, K) counts of the model's weights (the best ones, after finish()) on the whole test split; None if empty."""
    from cnnlab.data.pipeline import BatchLoader
    from cnnlab.engine.device import autocast
    from cnnlab.engine.evaluate import predict_logits
    from cnnlab.engine.metrics import confusion_matrix

    test = loop.data.test
    if len(test) == 0 or test.multi_label:  # a multi-label image has no single predicted class
        return None
    # The whole split on this process (rank 0), not the shard loop.eval_loader gives each process.
    loader = BatchLoader(test, loop.config.eval_batch_size, loop.norm, device=loop.device,
                         channels_last=loop.config.channels_last)  # fmt: skip
    model = loop.model.eval()
    preds = []
    for x, _ in loader:
        with autocast(loop.device, loop.dtype):
            preds.append(predict_logits(model, x, loop.config.tta).argmax(1).cpu())  # (B,)
    return confusion_matrix(torch.cat(preds), test.labels.cpu(), len(loop.data.classes))


def numbers(row: dict[str, Any]) -> dict[str, float]:
    """The row's numeric values, without the epoch number (the step) and without missing ones (no validation)."""
    out = {}
    for key, value in row.items():
        if key != "epoch" and isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = float(value)
    return out


class ExperimentLogger(Callback):
    """A callback that logs each epoch's row, the test metrics and the pictures somewhere; only on rank 0.

    Subclasses implement open (at the start; `loop.epoch` > 0 on a resume), log_epoch, log_end and close.
    """

    name = ""

    def __init__(self, pictures: Pictures | None = None) -> None:
        self.pictures = pictures or Pictures()
        self.active = False

    def on_train_start(self, loop: Trainer) -> None:
        """Open the log (rank 0 only)."""
        self.active = loop.dist.is_main
        if self.active:
            self.open(loop)

    def on_epoch_end(self, loop: Trainer, row: dict[str, Any]) -> None:
        """Log the epoch's numbers at step = epoch."""
        if self.active:
            self.log_epoch(loop.epoch, numbers(row))

    def on_train_end(self, loop: Trainer, result: TrainResult) -> None:
        """Log the test metrics and the pictures, then close."""
        if not self.active:
            return
        test = {name: float(getattr(result, name)) for name in TEST_FIELDS if getattr(result, name) is not None}
        self.log_end(loop.epoch, {k: v for k, v in test.items() if math.isfinite(v)}, self.pictures.paths(loop, result))
        self.close()
        self.active = False

    def on_train_error(self, loop: Trainer, error: BaseException) -> None:
        """Mark the log as ended by an interrupt or a failure, and close it (a resume reopens it)."""
        if not self.active:
            return
        self.active = False
        interrupted = isinstance(error, KeyboardInterrupt) or getattr(error, "exit_code", None) == 130
        self.log_failure(interrupted)
        self.close()

    def open(self, loop: Trainer) -> None:
        """Start (or, on a resume, reopen) the log."""
        raise NotImplementedError

    def log_failure(self, interrupted: bool) -> None:
        """The run ended early: interrupted (Ctrl-C, SIGTERM) or failed."""

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        """One epoch's numbers (metrics.csv's names)."""
        raise NotImplementedError

    def log_end(self, epoch: int, test: dict[str, float], pictures: dict[str, Path]) -> None:
        """The test metrics and the PNG pictures."""
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release the log."""


def _imported(name: str, load: Callable[[], Any]) -> Any:
    """load() a logger's package, or the one-line error naming the extra to install."""
    try:
        return load()
    except ImportError:
        raise OptionError("logger", missing_message(name)) from None


class TensorBoardLogger(ExperimentLogger):
    """Event files in RUN/tensorboard/: scalars per epoch, the test metrics, the curves and confusion images."""

    name = "tensorboard"

    def open(self, loop: Trainer) -> None:
        """A SummaryWriter on RUN/tensorboard; a resume hides the events of the epochs it will log again."""
        if loop.run is None:
            raise UsageError("logger tensorboard writes into the run directory, and this run has none (runs_dir=None)")

        def load() -> Any:
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter

        writer_class = _imported(self.name, load)
        folder = loop.run / TENSORBOARD_DIR
        resumed = folder.is_dir() and any(folder.glob("events.out.tfevents.*"))
        # A run killed after logging an epoch but before its checkpoint logs that epoch again: purge_step makes
        # TensorBoard drop the earlier events from that step on, so no epoch appears twice.
        self.writer = writer_class(str(folder), purge_step=loop.epoch + 1 if resumed else None)
        if not resumed:
            options = json.dumps(loop.config.to_dict(), indent=1)
            self.writer.add_text("options", f"```\n{options}\n```", 0)

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        """Scalars at step = epoch; flushed, so a killed run keeps every epoch it logged."""
        for key, value in values.items():
            self.writer.add_scalar(TB_TAGS.get(key, key), value, epoch)
        self.writer.flush()

    def log_end(self, epoch: int, test: dict[str, float], pictures: dict[str, Path]) -> None:
        """test/loss, test/accuracy, test/top5 and the pictures as images, at the last epoch."""
        import numpy as np
        from PIL import Image

        for key, value in test.items():
            self.writer.add_scalar(TB_TAGS[key], value, epoch)
        for name, path in pictures.items():
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
            self.writer.add_image(name, pixels, epoch, dataformats="HWC")

    def close(self) -> None:
        """Flush the events to disk."""
        self.writer.close()


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI if set, else a file store ./mlruns in the working directory (as an absolute file URI)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or (Path.cwd() / "mlruns").resolve().as_uri()


def _param(value: Any) -> str:
    """An option's value as an MLflow param: lists as comma lists, dicts as KEY=VALUE lists."""
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


class MLflowLogger(ExperimentLogger):
    """A run in MLflow experiment 'cnnlab': the options as params, metrics per epoch, the pictures as artifacts."""

    name = "mlflow"

    def open(self, loop: Trainer) -> None:
        """Reopen the run RUN/mlflow.json names (a resume), or create one and log the options as params."""

        def load() -> Any:
            from mlflow.tracking import MlflowClient

            return MlflowClient

        client_class = _imported(self.name, load)
        saved_file = loop.run / MLFLOW_FILE if loop.run else None
        saved = json.loads(saved_file.read_text(encoding="utf-8")) if saved_file and saved_file.is_file() else {}
        uri = saved.get("tracking_uri") or tracking_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store in "maintenance mode" and refuses it unless told; it is the store that
            # needs no database package (mlflow-skinny), so cnnlab opts in for file stores (unless you said false).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = client_class(tracking_uri=uri)
        self.logged = 0  # epochs the MLflow run already holds (a resume skips them)
        self.run_id = self._reopen(saved.get("run_id")) if saved else None
        if self.run_id is None:
            self.run_id = self._create(loop)
            if saved_file is not None:
                atomic_write_json(saved_file, {"tracking_uri": uri, "run_id": self.run_id})

    def _reopen(self, run_id: str | None) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            return None  # the store was deleted or moved: a new run
        self.client.update_run(run_id, status="RUNNING")
        history = self.client.get_metric_history(run_id, "train_loss")
        self.logged = max((m.step for m in history), default=0)
        return run_id

    def _create(self, loop: Trainer) -> str:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            try:
                experiment_id = self.client.create_experiment(name)
            except MlflowException:  # another process created it meanwhile
                experiment_id = self.client.get_experiment_by_name(name).experiment_id
        tags = {"cnnlab.model": loop.config.model, "cnnlab.data": loop.data.name}
        if loop.run is not None:
            tags["cnnlab.run_dir"] = str(loop.run.resolve())
        run = self.client.create_run(experiment_id, run_name=loop.run.name if loop.run else None, tags=tags)
        params = [Param(k, _param(v)) for k, v in loop.config.to_dict().items()]
        self.client.log_batch(run.info.run_id, params=params, synchronous=True)
        return run.info.run_id

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        # Synchronous even with $MLFLOW_ENABLE_ASYNC_LOGGING: the async queue is flushed only by an atexit hook,
        # which a data-parallel worker skips (it leaves with os._exit), and a killed run keeps what it logged.
        metrics = [Metric(k, v, stamp, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        """metrics.csv's columns at step = epoch (skipped for an epoch the run already holds)."""
        if epoch > self.logged:
            self._metrics(values, epoch)
            self.logged = epoch

    def log_end(self, epoch: int, test: dict[str, float], pictures: dict[str, Path]) -> None:
        """The test metrics at the last epoch, the pictures as artifacts; the run is marked finished."""
        self._metrics(test, epoch)
        for path in pictures.values():
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FINISHED")

    def log_failure(self, interrupted: bool) -> None:
        """KILLED for an interrupt, FAILED otherwise, as MLflow's own fluent API marks them."""
        self.client.set_terminated(self.run_id, "KILLED" if interrupted else "FAILED")


@dataclass(frozen=True)
class LoggerInfo:
    """A logger's registry entry: the module it imports and the pip package (and cnnlab extra) that provides it."""

    name: str
    module: str
    package: str
    make: Callable[[Pictures], ExperimentLogger]


LOGGERS: dict[str, LoggerInfo] = {
    "tensorboard": LoggerInfo("tensorboard", "tensorboard", "tensorboard", TensorBoardLogger),
    "mlflow": LoggerInfo("mlflow", "mlflow", "mlflow-skinny", MLflowLogger),
}


def missing_message(name: str) -> str:
    """'tensorboard needs the tensorboard package: pip install "cnnlab[tensorboard]"' (the extra is the name)."""
    return f'{name} needs the {LOGGERS[name].package} package: pip install "cnnlab[{name}]"'


def missing_package(name: str) -> str | None:
    """None if logger `name`'s package is installed, else what to install (checked without importing it)."""
    try:
        found = importlib.util.find_spec(LOGGERS[name].module) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else missing_message(name)


def check_installed(names: tuple[str, ...] | list[str]) -> None:
    """An OptionError naming the extra to install for the first logger whose package is missing."""
    for name in names:
        missing = missing_package(name)
        if missing:
            raise OptionError("logger", missing)


def make_loggers(names: tuple[str, ...] | list[str]) -> list[ExperimentLogger]:
    """The loggers `names` asks for, sharing one set of end-of-run pictures."""
    pictures = Pictures()
    return [LOGGERS[name].make(pictures) for name in names]
