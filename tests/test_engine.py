"""fit(): learning, early stopping, best-weights restore, run directory files, exact resume, safe checkpoints."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from cnnlab.data.pipeline import BatchLoader, Normalization
from cnnlab.data.sources import Dataset
from cnnlab.engine import Reporter, TrainConfig, fit, trainer
from cnnlab.engine.checkpoint import load_checkpoint, read_weights, save_checkpoint
from cnnlab.errors import CnnlabError, UsageError
from cnnlab.fileio import atomic_write_bytes
from cnnlab.models import create_model
from tests.conftest import write_pickle_payload


def quick(**kw: Any) -> TrainConfig:
    """A short configuration for the small digit set."""
    base = {"epochs": 3, "batch_size": 32, "patience": 0, "val_split": 0.2}
    return TrainConfig(**{**base, **kw})


def test_training_learns(small_digits: Dataset) -> None:
    result = fit(quick(epochs=4), runs_dir=None, dataset=small_digits)
    losses = [r["train_loss"] for r in result.history]
    assert losses == sorted(losses, reverse=True), f"train loss should fall every epoch: {losses}"
    assert result.history[-1]["val_acc"] > 0.8
    assert result.test_acc > 0.8 and 0 < result.test_loss < 2.3
    assert result.epochs_run == 4 and not result.stopped_early


def test_run_directory_holds_every_file(small_digits: Dataset, tmp_path: Path) -> None:
    result = fit(quick(), runs_dir=tmp_path, dataset=small_digits)
    run = result.run_dir
    assert run is not None and run.parent == tmp_path and run.name.endswith("_lenet5-modern_small-digits")
    names = {p.name for p in run.iterdir()}
    assert names == {"config.json", "metrics.csv", "best.safetensors", "last.ckpt", "curves.png", "results.json"}
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["name"] == "lenet5-modern" and config["data"]["classes"] == list("0123456789")
    assert config["data"]["train_size"] == 640 and config["data"]["val_size"] == 160
    assert len(config["data"]["mean"]) == 1 and 0 < config["data"]["mean"][0] < 0.5
    assert config["train"]["epochs"] == 3 and config["runtime"]["device"] == "cpu"
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert set(rows[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "elapsed"}
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((run / "results.json").read_text())
    assert results["test_acc"] == pytest.approx(result.test_acc)
    ckpt = torch.load(run / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["step"] == 3 * 20
    assert not [p for p in run.iterdir() if p.name.startswith(".")], "no temporary files left behind"


def test_early_stopping_restores_the_best_epoch(
    small_digits: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = trainer.evaluate_batches
    val_losses = [1.0, 0.7, 0.8, 0.9, 0.95]  # best at epoch 2; with patience 2 training stops after epoch 4

    def scripted(model: torch.nn.Module, batches: Any, *args: Any, **kw: Any) -> dict[str, float]:
        out = real(model, batches, *args, **kw)
        return {**out, "loss": val_losses.pop(0)} if val_losses else out

    monkeypatch.setattr(trainer, "evaluate_batches", scripted)
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    class Snapshot(Reporter):
        def epoch_end(self, row: dict[str, Any]) -> None:
            state = load_checkpoint(result_dir() / "last.ckpt")["model"]
            snapshots[row["epoch"]] = state

    def result_dir() -> Path:
        return next(tmp_path.iterdir())

    result = fit(quick(epochs=20, patience=2), runs_dir=tmp_path, dataset=small_digits, reporter=Snapshot())
    assert result.stopped_early and result.epochs_run == 4 and result.best_epoch == 2
    best = read_weights(result.run_dir / "best.safetensors")
    for key, value in best.items():
        assert torch.equal(value, snapshots[2][key]), key
    assert any(not torch.equal(best[k], snapshots[4][k]) for k in best), "the last epoch differs from the best"
    # The reported test accuracy is that of the restored best weights, not of the last epoch's.
    config = json.loads((result.run_dir / "config.json").read_text())
    norm = Normalization(tuple(config["data"]["mean"]), tuple(config["data"]["std"]))
    test_batches = BatchLoader(small_digits.test, 1000, norm)
    model = create_model("lenet5-modern", num_classes=10, in_channels=1, image_size=28)
    model.load_state_dict(best)
    assert trainer.evaluate_batches(model, iter(test_batches), 0.1)["acc"] == result.test_acc


def test_without_run_directory_nothing_is_written(
    small_digits: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    fit(quick(epochs=1), runs_dir=None, dataset=small_digits)
    assert list(tmp_path.iterdir()) == []


class StopAfter(Reporter):
    """Interrupts training after a given epoch, as Ctrl-C would, once its checkpoint is on disk."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_end(self, row: dict[str, Any]) -> None:
        if row["epoch"] == self.epoch:
            raise KeyboardInterrupt


@pytest.mark.parametrize(
    "options",
    [{"augment": ("crop", "rotate", "erase")},
     {"augment": ("trivial", "jitter", "flip"), "mixup": 0.2, "cutmix": 1.0},  # torchvision's draws, seeded by ours
     # unaugmented, so the whitening stem's outputs are kept (engine.stem_cache): a resume starts them over
     {"augment": (), "model": "cnn-fast", "model_args": {"widths": "8-16", "stem": "whiten"}}],
    ids=["batched", "torchvision-v2", "whitening-stem-kept"],
)  # fmt: skip
def test_resume_is_bit_exact(options: dict[str, Any], small_digits: Dataset, tmp_path: Path) -> None:
    cfg = quick(epochs=4, **options)
    straight = fit(cfg, runs_dir=tmp_path / "a", dataset=small_digits)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, runs_dir=tmp_path / "b", dataset=small_digits, reporter=StopAfter(2))
    stopped = next((tmp_path / "b").iterdir())
    assert load_checkpoint(stopped / "last.ckpt")["epoch"] == 2
    resumed = fit(resume=stopped, dataset=small_digits)
    assert resumed.run_dir == stopped and resumed.epochs_run == 4
    a = load_checkpoint(straight.run_dir / "last.ckpt")
    b = load_checkpoint(stopped / "last.ckpt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]
    assert resumed.test_acc == straight.test_acc
    with pytest.raises(UsageError, match="already finished"):
        fit(resume=stopped, dataset=small_digits)


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("saved_fused", [True, False])
def test_a_resumed_optimizer_keeps_the_update_built_for_its_device(kind: str, saved_fused: bool) -> None:
    """A checkpoint from a GPU (fused update) resumed on a CPU runs the CPU's plain update, and the other way round; the
    state itself (momentum, moments, step count) carries over. CPUs run fused updates too, which stand in for a GPU."""
    from cnnlab.engine.optim import load_optimizer_state

    def make(fused: bool) -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
        p = torch.nn.Parameter(torch.arange(4.0))
        cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
        extra = {"momentum": 0.9, "nesterov": True} if kind == "sgd" else {}
        return p, cls([p], lr=0.1, **extra, **({"fused": True} if fused else {}))

    p, saved = make(saved_fused)
    for _ in range(2):
        p.grad = torch.ones(4)
        saved.step()
    q, resumed = make(not saved_fused)
    with torch.no_grad():
        q.copy_(p)
    load_optimizer_state(resumed, copy.deepcopy(saved.state_dict()))  # as read from a checkpoint: no shared tensors
    assert bool(resumed.param_groups[0].get("fused")) is (not saved_fused), "the update built for this device"
    state, before = resumed.state[q], saved.state[p]
    key = "momentum_buffer" if kind == "sgd" else "exp_avg"
    assert torch.equal(state[key], before[key])
    if kind != "sgd":
        assert float(state["step"]) == 2.0 and state["step"].dtype == torch.float32
    for opt, param in ((saved, p), (resumed, q)):
        param.grad = torch.ones(4)
        opt.step()
    assert torch.allclose(p, q, atol=1e-6), "the same step from the same state"


def test_divergence_stops_with_the_epoch_and_step_and_keeps_the_previous_checkpoint(
    small_digits: Dataset, tmp_path: Path, trainer_models: list[torch.nn.Module]
) -> None:
    class Explode(Reporter):
        def epoch_end(self, row: dict[str, Any]) -> None:
            if row["epoch"] == 1:
                for p in trainer_models[0].parameters():
                    p.data.fill_(float("nan"))

    with pytest.raises(CnnlabError, match=r"non-finite loss at epoch 2, step 21"):
        fit(quick(epochs=3), runs_dir=tmp_path, dataset=small_digits, reporter=Explode())
    run = next(tmp_path.iterdir())
    state = load_checkpoint(run / "last.ckpt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert all(torch.isfinite(v).all() for v in read_weights(run / "best.safetensors").values())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"epochs": -3}, "epochs must be at least 1"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"val_split": 1.0}, r"val_split must be in \[0, 1\)"),
        ({"val_split": -0.1}, r"val_split must be in \[0, 1\)"),
        ({"val_split": 0.0}, "patience needs a validation split"),
        ({"lr": -1.0}, r"lr must be in \(0, inf\)"),
        ({"lr": math.nan}, "lr must be a finite number"),
        ({"optimizer": "rmsprop"}, "optimizer must be one of"),
        ({"schedule": "linear"}, "schedule must be one of"),
        ({"model": "lenet6"}, "unknown model 'lenet6'"),
        ({"augment": ("crop", "blur")}, "unknown augmentation 'blur'"),
        ({"device": "cuda:7"}, "device cuda:7"),
    ],
)
def test_impossible_options_are_refused_before_anything_is_written(
    change: dict[str, Any], message: str, tmp_path: Path
) -> None:
    with pytest.raises(UsageError, match=message):
        fit(TrainConfig(**change), runs_dir=tmp_path / "runs")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "step", "none"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_every_optimizer_and_schedule_runs(small_digits: Dataset, optimizer: str, schedule: str) -> None:
    result = fit(
        quick(epochs=1, optimizer=optimizer, schedule=schedule, max_steps=8, step_epochs=1),
        runs_dir=None,
        dataset=small_digits,
    )
    assert math.isfinite(result.test_loss) and result.history[0]["epoch"] == 1


def test_max_steps_caps_the_run(small_digits: Dataset) -> None:
    result = fit(quick(epochs=5, max_steps=25), runs_dir=None, dataset=small_digits)
    assert result.epochs_run == 2  # 20 steps per epoch: the cap lands inside epoch 2


def test_checkpoint_with_a_pickle_payload_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = write_pickle_payload(
        tmp_path / "last.ckpt", marker, lambda p: {"format": "cnnlab-checkpoint-v1", "model": p}
    )
    with pytest.raises(CnnlabError, match="refused to load"):
        load_checkpoint(evil)
    assert not marker.exists(), "the payload must never run"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_files_are_refused_cleanly(tmp_path: Path, damage: str) -> None:
    good_ckpt = save_checkpoint({"epoch": 1, "model": {"w": torch.ones(3)}}, tmp_path / "x.ckpt")
    good_weights = atomic_write_bytes(tmp_path / "x.safetensors", safetensors.torch.save({"w": torch.ones(3)}))
    for path in (good_ckpt, good_weights):
        data = path.read_bytes()
        bad = {"truncate": data[: len(data) // 2], "garbage": os.urandom(len(data)), "empty": b""}[damage]
        path.write_bytes(bad)
    with pytest.raises(CnnlabError):
        load_checkpoint(good_ckpt)
    with pytest.raises(CnnlabError, match="not a valid safetensors file"):
        read_weights(good_weights)


def test_weights_that_do_not_fit_name_the_tensor(tmp_path: Path) -> None:
    from cnnlab.engine.checkpoint import load_weights, save_weights

    path = save_weights(create_model("lenet5-modern", num_classes=5, image_size=28), tmp_path / "w.safetensors")
    with pytest.raises(CnnlabError, match=r"tensor 'classifier.5.weight' has shape \(5, 84\)"):
        load_weights(create_model("lenet5-modern", num_classes=10, image_size=28), path)
