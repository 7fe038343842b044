"""Experiment loggers (engine/loggers.py): what each logs, read back with its own reader, parametrized over LOGGERS."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cnnlab.data.sources import Dataset
from cnnlab.engine import callbacks as cbs
from cnnlab.engine import config, loggers
from cnnlab.engine.config import OptionError, TrainConfig
from cnnlab.engine.rundir import read_metrics
from cnnlab.engine.trainer import fit
from cnnlab.errors import UsageError
from tests.conftest import main_error

NAMES = sorted(loggers.LOGGERS)
COMPARED = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")  # deterministic: equal after a resume too
Logged = tuple[dict[str, list[tuple[int, float]]], dict[str, tuple[int, int]]]  # {metric: [(step, value)]}, pictures


def need(name: str) -> None:
    """Skip where the logger's package is not installed; CI installs it (.[dev]) and must not skip."""
    if loggers.missing_package(name) and not os.environ.get("CI"):
        pytest.skip(f"{loggers.missing_message(name)} (optional extra)")


def read_tensorboard(run: Path) -> Logged:
    """The scalars (under metrics.csv's names) and images of RUN/tensorboard, as TensorBoard itself reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / loggers.TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    names = {tag: key for key, tag in loggers.TB_TAGS.items()}
    tags = events.Tags()
    metrics = {names.get(t, t): [(e.step, e.value) for e in events.Scalars(t)] for t in tags["scalars"]}
    pictures = {t: (events.Images(t)[-1].width, events.Images(t)[-1].height) for t in tags["images"]}
    return metrics, pictures


def read_mlflow(run: Path) -> Logged:
    """The metrics and PNG artifacts of the MLflow run that RUN/mlflow.json names."""
    from mlflow.tracking import MlflowClient
    from PIL import Image

    saved = json.loads((run / loggers.MLFLOW_FILE).read_text())
    client = MlflowClient(tracking_uri=saved["tracking_uri"])
    record = client.get_run(saved["run_id"])
    assert record.info.status == "FINISHED"
    assert client.get_experiment(record.info.experiment_id).name == "cnnlab"
    assert record.data.params["batch_size"] == "64" and record.data.params["logger"] == "mlflow"
    history = {key: client.get_metric_history(saved["run_id"], key) for key in record.data.metrics}
    metrics = {key: [(m.step, m.value) for m in values] for key, values in history.items()}
    folder = Path(client.download_artifacts(saved["run_id"], "", str(run.parent / "artifacts")))
    pictures = {}
    for png in folder.glob("*.png"):
        with Image.open(png) as image:
            pictures[png.stem] = image.size
    return metrics, pictures


def mlflow_status(run: Path) -> str:
    """The status of the MLflow run that RUN/mlflow.json names."""
    from mlflow.tracking import MlflowClient

    saved = json.loads((run / loggers.MLFLOW_FILE).read_text())
    return MlflowClient(tracking_uri=saved["tracking_uri"]).get_run(saved["run_id"]).info.status


READERS: dict[str, Callable[[Path], Logged]] = {"tensorboard": read_tensorboard, "mlflow": read_mlflow}


@pytest.fixture
def own_mlflow_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Work in tmp_path (the default ./mlruns store lands there) with no MLflow variables, restored afterwards."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.setenv(name, "")  # records the original value (or its absence) for the restore ...
        monkeypatch.delenv(name)  # ... so what the logger sets is undone after the test too
    monkeypatch.chdir(tmp_path)
    return tmp_path


def quick(name: str, **kw: Any) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 64, "patience": 0, "val_split": 0.2, "logger": (name,), **kw})


def test_the_registry_is_the_options_vocabulary_and_each_has_a_reader() -> None:
    assert set(loggers.LOGGERS) == set(config.LOGGERS) == set(READERS)


def assert_logged_once_per_epoch(name: str, run: Path) -> None:
    """Every epoch of metrics.csv exactly once, at step = epoch, with its values; the test metrics and pictures."""
    metrics, pictures = READERS[name](run)
    rows = read_metrics(run)
    for key in COMPARED:
        steps = [step for step, _ in metrics[key]]
        assert steps == [r["epoch"] for r in rows], (key, steps)  # one point per epoch, none twice
        for (_, value), row in zip(metrics[key], rows, strict=True):
            assert value == pytest.approx(row[key], rel=1e-5), (key, row["epoch"])  # metrics.csv keeps 6 digits
    results = json.loads((run / "results.json").read_text())
    test_acc = metrics["test_acc"]
    assert [s for s, _ in test_acc] == [len(rows)] and test_acc[0][1] == pytest.approx(results["test_acc"], rel=1e-6)
    assert set(pictures) == {"curves", "confusion"}
    assert min(min(size) for size in pictures.values()) > 200  # real pictures, not placeholders


@pytest.mark.parametrize("name", NAMES)
def test_each_logger_logs_every_epoch_the_test_metrics_and_the_pictures(
    name: str, small_digits: Dataset, own_mlflow_env: Path
) -> None:
    need(name)
    result = fit(quick(name), runs_dir=own_mlflow_env / "runs", run_name="r", dataset=small_digits)
    assert_logged_once_per_epoch(name, result.run_dir)
    assert (result.run_dir / "confusion.png").is_file()
    if name == "mlflow":  # the default store: ./mlruns in the working directory
        saved = json.loads((result.run_dir / loggers.MLFLOW_FILE).read_text())
        assert saved["tracking_uri"] == (own_mlflow_env / "mlruns").as_uri()


@pytest.mark.parametrize("name", NAMES)
def test_a_resume_appends_without_repeating_an_epoch(
    name: str, small_digits: Dataset, own_mlflow_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need(name)
    save = cbs.Checkpointing.on_epoch_end

    def killed_before_saving_epoch_2(self: cbs.Checkpointing, loop: Any, row: dict[str, Any]) -> None:
        if loop.epoch == 2:  # epoch 2 is logged (loggers run first) but its checkpoint never written
            raise KeyboardInterrupt
        save(self, loop, row)

    monkeypatch.setattr(cbs.Checkpointing, "on_epoch_end", killed_before_saving_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        fit(quick(name, epochs=3), runs_dir=own_mlflow_env / "runs", run_name="r", dataset=small_digits)
    if name == "mlflow":  # the interrupted run is marked as such, not left RUNNING
        assert mlflow_status(own_mlflow_env / "runs" / "r") == "KILLED"
    monkeypatch.setattr(cbs.Checkpointing, "on_epoch_end", save)
    result = fit(resume=own_mlflow_env / "runs" / "r", dataset=small_digits)  # epochs 2 and 3 again
    assert result.epochs_run == 3
    assert_logged_once_per_epoch(name, result.run_dir)


def test_a_failed_run_is_marked_failed_and_the_error_is_not_hidden(small_digits: Dataset, own_mlflow_env: Path) -> None:
    need("mlflow")

    class Broken(cbs.Callback):
        def on_epoch_end(self, loop: Any, row: dict[str, Any]) -> None:
            raise ValueError("a bug in my callback")

    with pytest.raises(ValueError, match="a bug in my callback"):
        fit(quick("mlflow"), runs_dir=own_mlflow_env / "runs", run_name="r", dataset=small_digits, callbacks=[Broken()])
    assert mlflow_status(own_mlflow_env / "runs" / "r") == "FAILED"


@pytest.mark.parametrize("name", NAMES)
def test_a_missing_package_is_one_line_naming_the_extra_before_anything_is_made(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, loggers.LOGGERS[name].module, None)  # `import tensorboard` now fails
    package = loggers.LOGGERS[name].package
    code, lines = main_error(["train", "--logger", name, "--runs-dir", str(tmp_path / "runs")], capsys)
    assert code == 2
    assert lines == [f'cnnlab: error: --logger {name} needs the {package} package: pip install "cnnlab[{name}]"']
    assert not (tmp_path / "runs").exists()
    with pytest.raises(OptionError, match=rf"^logger {name} needs the {package} package"):
        loggers.check_installed((name,))


@pytest.mark.parametrize("name", NAMES)
def test_only_rank_0_logs(name: str) -> None:
    logger = loggers.LOGGERS[name].make(loggers.Pictures())
    rank_1 = SimpleNamespace(dist=SimpleNamespace(is_main=False), epoch=1)
    logger.on_train_start(rank_1)  # would open a store (and fail: this loop has no run, data or config)
    logger.on_epoch_end(rank_1, {"epoch": 1, "train_loss": 1.0})
    logger.on_train_end(rank_1, None)
    assert not logger.active


def test_tensorboard_needs_a_run_directory(small_digits: Dataset) -> None:
    need("tensorboard")
    with pytest.raises(UsageError, match="writes into the run directory"):
        fit(quick("tensorboard", epochs=1), runs_dir=None, dataset=small_digits)


def test_mlflow_logs_synchronously_even_when_async_logging_is_on(
    small_digits: Dataset, own_mlflow_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MLflow's async queue is flushed only at interpreter exit, which a data-parallel worker skips (os._exit):
    # every batch of params and metrics must be written before log_batch returns.
    need("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ENABLE_ASYNC_LOGGING", "true")
    modes: list[object] = []
    original = MlflowClient.log_batch

    def spy(self: MlflowClient, *args: Any, **kw: Any) -> Any:
        modes.append(kw.get("synchronous"))
        return original(self, *args, **kw)

    monkeypatch.setattr(MlflowClient, "log_batch", spy)
    result = fit(quick("mlflow"), runs_dir=own_mlflow_env / "runs", run_name="r", dataset=small_digits)
    assert modes and set(modes) == {True}, modes  # params, 2 epochs, the test metrics
    assert_logged_once_per_epoch("mlflow", result.run_dir)
