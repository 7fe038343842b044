"""The Python API: cnnlab.train / cnnlab.load_run and the Run they return, with every kind of model, data and input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import cnnlab
from cnnlab.cli import main
from cnnlab.errors import UsageError
from tests.test_speed import tiny_dataset

FAST = {"epochs": 2, "batch_size": 16, "patience": 0, "device": "cpu"}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> cnnlab.api.Run:
    runs = tmp_path_factory.mktemp("runs")
    return cnnlab.train("cnn-fast", tiny_dataset(), runs_dir=runs, name="api", progress=False, **FAST)


def arrays(n: int = 120) -> tuple[np.ndarray, np.ndarray]:
    data = tiny_dataset(n, 0, side=16)
    return data.train.images.squeeze(1).numpy(), data.train.labels.numpy()


def test_train_returns_a_run_with_model_metrics_dir_and_plot(saved_run: cnnlab.api.Run) -> None:
    run = saved_run
    assert isinstance(run.model, nn.Module) and not run.model.training
    assert [row["epoch"] for row in run.metrics] == [1, 2] and "val_loss" in run.metrics[0]
    assert run.dir is not None and (run.dir / "best.safetensors").is_file()
    assert run.classes == ("a", "b", "c", "d")
    picture = run.plot()
    assert len(picture.figure.axes) == 2 and "test accuracy" in repr(run)
    assert picture._repr_png_().startswith(b"\x89PNG")  # what a notebook displays


@pytest.mark.parametrize(
    "make",
    [
        lambda d: str(d / "img.png"),
        lambda d: d / "img.png",
        lambda d: Image.open(d / "img.png"),
        lambda d: np.asarray(Image.open(d / "img.png")),
        lambda d: torch.from_numpy(np.asarray(Image.open(d / "img.png"))),
        lambda d: torch.from_numpy(np.asarray(Image.open(d / "img.png"))).float().div(255).unsqueeze(0),
    ],
    ids=["str", "Path", "PIL", "numpy HW", "tensor HW uint8", "tensor CHW float"],
)
def test_predict_takes_paths_pil_arrays_and_tensors_alike(saved_run: cnnlab.api.Run, make: Any, tmp_path: Path) -> None:
    image = tiny_dataset().test.images[0, 0].numpy()
    Image.fromarray(image).save(tmp_path / "img.png")
    reference = saved_run.predict(str(tmp_path / "img.png"))
    got = saved_run.predict(make(tmp_path))
    assert got.label == reference.label and got.probs == pytest.approx(reference.probs, abs=1e-5)
    assert got.label in saved_run.classes and 0 < got.prob <= 1


def test_a_list_or_a_batch_gives_one_prediction_per_image(saved_run: cnnlab.api.Run) -> None:
    images = tiny_dataset().test.images[:5]  # (5, 1, 28, 28) uint8
    batch = saved_run.predict(images)
    listed = saved_run.predict([im for im in images])
    assert len(batch) == len(listed) == 5
    assert [p.label for p in batch] == [p.label for p in listed]


def test_load_run_gives_the_same_predictions_evaluation_and_export(saved_run: cnnlab.api.Run, tmp_path: Path) -> None:
    again = cnnlab.load_run(saved_run.dir)
    assert again.record == saved_run.record and again.record.train.epochs == 2  # config.json read back as written
    images = tiny_dataset().test.images[:8]
    assert [p.label for p in again.predict(images)] == [p.label for p in saved_run.predict(images)]
    for mine, theirs in zip(again.metrics, saved_run.metrics, strict=True):  # metrics.csv keeps 6 digits
        assert mine == pytest.approx(theirs, rel=1e-5)
    assert again.result.test_acc == saved_run.result.test_acc
    ev = saved_run.evaluate()
    assert ev.top1 == pytest.approx(saved_run.result.test_acc) and ev.confusion.shape == (4, 4)
    path = saved_run.export("torchscript", tmp_path / "m.pt")
    assert path.is_file() and (tmp_path / "m.pt.json").is_file()


def test_your_own_module_on_your_own_arrays(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x, y = arrays()
    net = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 4))
    run = cnnlab.train(net, ((x, y), (x[:40], y[:40])), runs_dir=tmp_path, name="own", progress=False, **FAST)
    assert run.model is net and run.result.test_acc > 0.25 and run.classes == ("0", "1", "2", "3")
    with pytest.raises(UsageError, match="pass model=<a new Sequential>"):
        cnnlab.load_run(tmp_path / "own")
    code = main(["evaluate", str(tmp_path / "own")])  # the command line says the same (was: unknown model)
    assert code == 2 and "trained your own Sequential" in capsys.readouterr().err
    again = cnnlab.load_run(tmp_path / "own", model=nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 4)))
    assert [p.label for p in again.predict(x[:6])] == [p.label for p in run.predict(x[:6])]


def test_string_labels_and_a_torch_dataset() -> None:
    x, y = arrays()
    names = np.array(["cat", "dog", "eel", "fox"])[y]
    run = cnnlab.train("cnn-fast", (x, list(names)), runs_dir=None, progress=False, **FAST)
    assert run.classes == ("cat", "dog", "eel", "fox") and run.dir is None
    tds = torch.utils.data.TensorDataset(torch.from_numpy(x).float().div(255).unsqueeze(1), torch.from_numpy(y))
    run = cnnlab.train("cnn-fast", tds, runs_dir=None, progress=False, **FAST)
    assert run.classes == ("0", "1", "2", "3") and len(run.metrics) == 2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: cnnlab.train(epoch=3), "unknown option 'epoch'; did you mean 'epochs'"),
        (lambda: cnnlab.train(batch_size=0), "batch_size must be at least 1, got 0"),
        (lambda: cnnlab.train(data=42), "data: expected a dataset name"),
        (lambda: cnnlab.train(model=3.5), "model: expected a registered name or an nn.Module"),
        (lambda: cnnlab.train(data=(np.zeros((4, 8, 8)), [0, 1])), "data: 4 images but 2 labels"),
        (lambda: cnnlab.train(data=(np.full((2, 8, 8), 300.0), [0, 1])), r"pixel values must be in \[0, 1\]"),
        (lambda: cnnlab.train(data=(np.zeros((2, 5, 8, 8)), [0, 1])), "1 \\(grey\\) or 3 \\(RGB\\) channels"),
        (lambda: cnnlab.train(data=(np.zeros((2, 8, 8)), [0, -1])), "labels must be class indices"),
    ],
)
def test_bad_arguments_are_usage_errors_naming_the_keyword(call: Any, message: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=message):
        call()


def test_progress_is_shown_unless_turned_off(capsys: pytest.CaptureFixture[str]) -> None:
    x, y = arrays(64)
    cnnlab.train("cnn-fast", (x, y), runs_dir=None, progress=False, **{**FAST, "epochs": 1})
    assert capsys.readouterr().err == ""
    cnnlab.train("cnn-fast", (x, y), runs_dir=None, **{**FAST, "epochs": 1})
    assert "epoch 1/1" in capsys.readouterr().err
