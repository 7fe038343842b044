"""Callbacks steer a run (log, set the lr, stop); accumulation, EMA and the time-budget planner work as documented."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from cnnlab.engine import planner
from cnnlab.engine.callbacks import Callback
from cnnlab.engine.config import TrainConfig
from cnnlab.engine.trainer import fit
from cnnlab.errors import OptionError
from tests.test_speed import tiny_dataset


def quick(**kw: Any) -> TrainConfig:
    base = {"model": "cnn-fast", "batch_size": 16, "val_split": 0.25, "patience": 0, "epochs": 2, "device": "cpu"}
    return TrainConfig(**{**base, **kw})


class Recorder(Callback):
    """Records every hook in order; can stop the run or set the lr at a given step."""

    def __init__(self, stop_at: int | None = None, lr_at: tuple[int, float] | None = None) -> None:
        self.events: list[str] = []
        self.lrs: list[float] = []
        self.stop_at, self.lr_at = stop_at, lr_at

    def on_train_start(self, loop: Any) -> None:
        self.events.append("train_start")

    def on_epoch_start(self, loop: Any) -> None:
        self.events.append(f"epoch_start {loop.epoch + 1}")

    def on_step_end(self, loop: Any, loss: float | None) -> None:
        self.events.append("step")
        self.lrs.append(loop.optimizer.param_groups[-1]["lr"])
        if self.lr_at and loop.step == self.lr_at[0]:
            loop.set_lr(self.lr_at[1])
        if self.stop_at and loop.step == self.stop_at:
            loop.stop(f"stopped by a callback at step {loop.step}")

    def on_epoch_end(self, loop: Any, row: dict[str, Any]) -> None:
        row["my_metric"] = 42.0
        self.events.append(f"epoch_end {row['epoch']}")

    def on_train_end(self, loop: Any, result: Any) -> None:
        self.events.append("train_end")


def test_a_callback_sees_every_hook_in_order_and_its_columns_reach_metrics_csv(tmp_path: Path) -> None:
    rec = Recorder()
    result = fit(quick(), runs_dir=tmp_path, run_name="r", dataset=tiny_dataset(), callbacks=[rec])
    steps = result.steps // 2
    expected = ["train_start", "epoch_start 1", *["step"] * steps, "epoch_end 1", "epoch_start 2",
                *["step"] * steps, "epoch_end 2", "train_end"]  # fmt: skip
    assert rec.events == expected
    header = (tmp_path / "r" / "metrics.csv").read_text().splitlines()[0]
    assert "my_metric" in header


def test_a_callback_can_stop_the_run_after_a_step() -> None:
    result = fit(quick(epochs=5), runs_dir=None, dataset=tiny_dataset(), callbacks=[Recorder(stop_at=7)])
    assert result.steps == 7 and result.stopped_early and result.epochs_run == 2


def test_a_callback_can_set_the_learning_rate() -> None:
    rec = Recorder(lr_at=(3, 1e-5))
    fit(quick(schedule="none", epochs=1), runs_dir=None, dataset=tiny_dataset(), callbacks=[rec])
    assert (
        rec.lrs[2] == pytest.approx(3e-3) and rec.lrs[3] == pytest.approx(1e-5) and rec.lrs[-1] == pytest.approx(1e-5)
    )


def _linear_run(batch_size: int, accumulate: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 4))  # no BatchNorm: micro-batches see the same statistics
    cfg = quick(batch_size=batch_size, accumulate=accumulate, val_split=0.0, epochs=1, max_steps=3, schedule="none",
                label_smoothing=0.0, augment=())  # fmt: skip
    fit(cfg, runs_dir=None, dataset=tiny_dataset(), module=net)
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_accumulating_two_batches_of_16_takes_the_step_of_one_batch_of_32() -> None:
    one, two = _linear_run(32, 1), _linear_run(16, 2)
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-5, atol=1e-6)
    differs = _linear_run(16, 1)  # the same images in steps of 16: a different path
    assert not torch.allclose(one["1.weight"], differs["1.weight"])


def test_accumulate_counts_optimizer_steps() -> None:
    result = fit(quick(accumulate=2, epochs=1), runs_dir=None, dataset=tiny_dataset())
    assert result.steps == math.ceil(math.ceil(72 / 16) / 2)  # 5 batches of 16 -> 3 optimizer steps


def test_ema_weights_are_the_ones_validated_saved_and_resumed(tmp_path: Path) -> None:
    from cnnlab.engine.checkpoint import load_checkpoint, read_weights

    # No validation split: every epoch counts as the best, so best.safetensors holds the last epoch's average.
    result = fit(quick(ema=0.9, val_split=0.0), runs_dir=tmp_path, run_name="ema", dataset=tiny_dataset())
    state = load_checkpoint(tmp_path / "ema" / "last.ckpt")
    best = read_weights(tmp_path / "ema" / "best.safetensors")
    assert state["ema"]["updates"] == result.steps
    averaged = state["ema"]["model"]
    key = next(k for k in best if k.endswith("weight"))
    torch.testing.assert_close(best[key], averaged[key].cpu())
    assert not torch.equal(best[key], state["model"][key].cpu())  # ...and the average is not the raw weights


def test_ema_decay_must_be_below_one() -> None:
    with pytest.raises(OptionError, match=r"ema must be a decay in \(0, 1\)"):
        quick(ema=1.0).validate()


class FakeClock:
    """A clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_planner_fits_steps_evaluation_and_saving_into_the_budget() -> None:
    clock = FakeClock()
    started = clock()
    clock.now += 2.0  # two seconds of set-up
    costs = planner.costs(step_s=0.01, image_s=1e-4, n_val=1000, n_test=2000, steps_per_epoch=50, saves=True)
    plan = planner.plan(30.0, started, costs, clock=clock)
    run_time = 2.0 + plan.steps * costs.step_s + math.ceil(plan.steps / 50) * costs.per_epoch_s + costs.fixed_s
    assert run_time <= 30.0 * planner.BUDGET_SAFETY  # the planned run ends within the budget
    # ...and it is the longest such plan: one more step would break the bound the planner keeps.
    left = 30.0 * planner.BUDGET_SAFETY - 2.0 - costs.fixed_s - costs.per_epoch_s
    assert (plan.steps + 1) * (costs.step_s + costs.per_epoch_s / 50) > left


def test_a_too_short_budget_names_one_that_works() -> None:
    clock = FakeClock()
    started = clock()
    clock.now += 4.55
    costs = planner.costs(step_s=0.01, image_s=0.0, n_val=0, n_test=0, steps_per_epoch=10, saves=True)
    with pytest.raises(OptionError, match="give at least") as err:
        planner.plan(5.0, started, costs, clock=clock)
    advised = int(str(err.value).rsplit("give at least ", 1)[1].split()[0])
    assert planner.plan(float(advised), started, costs, clock=clock).steps >= 1


def test_replanning_follows_the_measured_pace() -> None:
    clock = FakeClock()
    started = clock()
    clock.now += 10.0  # 10 s in, 100 steps done at 0.05 s per step: 28.4 s of the 40 s budget (x0.96) left
    total = planner.replan(40.0, started, fixed_s=0.0, pace=0.05, step=100, clock=clock)
    assert total == 100 + int((40.0 * planner.BUDGET_SAFETY - 10.0) / 0.05)
    assert not planner.worth_changing(total + 2, total) and planner.worth_changing(total + 50, total)


class InterruptAfterEpoch(Callback):
    """Acts like a SIGINT arriving during epoch `n`: the checkpoint is written, then the run stops to be resumed."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_epoch_end(self, loop: Any, row: dict[str, Any]) -> None:
        if loop.epoch == self.n:
            loop.stop_requested = "SIGINT"


@pytest.mark.parametrize("options", [{"ema": 0.9}, {"accumulate": 2}], ids=["ema", "accumulate"])
def test_resume_is_exact_with_ema_and_accumulation(options: dict[str, Any], tmp_path: Path) -> None:
    from cnnlab.engine.checkpoint import read_weights
    from cnnlab.engine.trainer import TrainingInterrupted

    cfg = quick(epochs=3, val_split=0.0, **options)
    fit(cfg, runs_dir=tmp_path, run_name="straight", dataset=tiny_dataset())
    with pytest.raises(TrainingInterrupted):
        fit(cfg, runs_dir=tmp_path, run_name="stopped", dataset=tiny_dataset(), callbacks=[InterruptAfterEpoch(1)])
    fit(resume=tmp_path / "stopped", dataset=tiny_dataset())
    straight, resumed = (read_weights(tmp_path / name / "best.safetensors") for name in ("straight", "stopped"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
