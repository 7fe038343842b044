"""The run record: config.json as types, written and read back unchanged; a damaged file is one named error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cnnlab.engine.config import TrainConfig
from cnnlab.engine.record import DataRecord, ModelRecord, RunRecord, Runtime
from cnnlab.errors import UsageError


def _record(**train: object) -> RunRecord:
    return RunRecord(
        model=ModelRecord("resnet18", 3, 1, 32, params=11_000_000, args={"width": 2}, changes=("fc: new head",),
                          pretrained={"weights": "ResNet18_Weights.IMAGENET1K_V1"}, classifier=("fc",)),
        data=DataRecord("photos", ("a", "b", "c"), 1, 32, (0.5,), (0.25,), augment=("crop", "flip"), train_size=9,
                        val_size=2, test_size=3, validation="given by the source", extra={"folder": "/x", "n": 1}),
        train=TrainConfig(**train), runtime=Runtime("cpu", "float32", "2.x", 2, 1, 64),
        cnnlab_version="0.1", created="2026-12-02T00:00:00+00:00",
    )  # fmt: skip


@pytest.mark.parametrize("train", [{}, {"epochs": 7, "augment": ("flip",), "logger": ("tensorboard",), "ema": 0.99}])
def test_a_record_survives_config_json_unchanged(tmp_path: Path, train: dict) -> None:
    record = _record(**train)
    record.write(tmp_path)
    assert RunRecord.read(tmp_path, need_train=True) == record
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["data"]["folder"] == "/x", "what a source adds sits beside the standard data entries"
    assert record.title == "resnet18 on photos" and not record.tta


def test_a_record_without_train_options_serves_inference_but_not_resume(tmp_path: Path) -> None:
    raw = _record().to_dict()
    raw.pop("train")
    assert RunRecord.from_dict(raw, tmp_path / "config.json").train is None
    with pytest.raises(UsageError, match=r"config.json: train is missing"):
        RunRecord.from_dict(raw, tmp_path / "config.json", need_train=True)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda c: c["model"].update(in_channels=3), "data.channels/image_size differ"),
        (lambda c: c["model"].update(args=[1]), "model.args must be an object"),
        (lambda c: c["data"].update(mean=[0.5, 0.5]), "data.mean must be 1 finite numbers"),
        (lambda c: c["train"].update(data_dir=3), "train.data_dir must be a text"),
        (lambda c: c["data"].update(train_size=-1), "data.train_size must be a whole number >= 0"),
    ],
    ids=["channels", "args", "mean", "data_dir", "train_size"],
)
def test_a_damaged_record_names_the_file_and_the_entry(tmp_path: Path, edit, needle: str) -> None:
    raw = _record().to_dict()
    edit(raw)
    with pytest.raises(UsageError, match=needle) as e:
        RunRecord.from_dict(raw, tmp_path / "config.json")
    assert str(e.value).startswith(str(tmp_path / "config.json"))


def test_own_module_runs_are_recognised() -> None:
    model = ModelRecord("module:MyNet", 2, 3, 32)
    assert model.own_module == "MyNet" and ModelRecord("lenet5", 10, 1, 28).own_module is None
