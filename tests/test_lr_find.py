"""The learning-rate range test (engine/lr_find.py): the schedule, the suggestion, the CLI and the Python API."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from cnnlab import api
from cnnlab.cli import main
from cnnlab.data.sources import Dataset
from cnnlab.engine.lr_find import LRFind, RangeTest, suggest
from tests.conftest import main_error


def test_the_rate_rises_exponentially_from_start_to_end() -> None:
    test = RangeTest(1e-7, 10.0, 100)
    lrs = [test.lr_at(i) for i in range(100)]
    assert lrs[0] == pytest.approx(1e-7) and lrs[-1] == pytest.approx(10.0)
    ratios = [b / a for a, b in itertools.pairwise(lrs)]
    assert max(ratios) == pytest.approx(min(ratios)) == pytest.approx(1e8 ** (1 / 99))


def test_the_suggestion_is_the_steepest_descent_before_the_minimum() -> None:
    lrs = [10 ** (-6 + i / 10) for i in range(61)]  # 1e-6 .. 1
    # Flat, then a fall centred at 1e-3 (steepest there), a minimum at 1e-2, then a steep rise (steeper than the fall).
    losses = [2.0 - math.tanh((math.log10(lr) + 3) * 2) * 0.8 for lr in lrs[:41]]
    losses += [losses[-1] + 0.5 * (i + 1) for i in range(20)]
    steepest, lowest = suggest(lrs, losses)
    assert steepest == pytest.approx(1e-3) and lowest == pytest.approx(1e-2)


@pytest.fixture(scope="module")
def found(small_digits: Dataset, tmp_path_factory: pytest.TempPathFactory) -> LRFind:
    """The range test of lenet5-modern on the small digit set, through the Python API, from an empty folder."""
    folder = tmp_path_factory.mktemp("lr-find-writes-nothing")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        result = api.lr_find(data=small_digits, batch_size=32)
        assert list(folder.iterdir()) == []  # no run, no plot unless asked
    return result


def test_the_suggestion_lies_inside_the_range_and_the_loss_has_a_minimum(found: LRFind) -> None:
    assert len(found.lrs) == len(found.losses) == len(found.raw_losses) > 10
    assert 1e-7 < found.suggested_lr < 10.0
    assert 1e-7 < found.min_loss_lr < 10.0 and found.suggested_lr <= found.min_loss_lr
    low = found.losses.index(min(found.losses))
    assert 0 < low < len(found.losses) - 1  # a minimum inside the curve: it fell, then rose
    assert min(found.losses) < found.losses[0] - 0.05  # it learned something at moderate rates
    assert all(b > a for a, b in itertools.pairwise(found.lrs))


def test_the_plot_is_a_figure_and_a_png(found: LRFind, tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    fig = found.plot(tmp_path / "curve.png")
    assert isinstance(fig, Figure) and fig.axes[0].get_xscale() == "log"
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_json_has_the_suggestion_and_writes_the_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plot = tmp_path / "plots" / "lr.png"
    code = main(["lr-find", "--json", "--quiet", "--steps", "30", "--batch-size", "32", "-o", str(plot)])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert {"suggested_lr", "lrs", "losses", "plot"} <= set(doc)
    assert 1e-7 < doc["suggested_lr"] < 10.0 and len(doc["lrs"]) == len(doc["losses"]) <= 30
    assert doc["plot"] == str(plot) and plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
        (["--steps", "1"], "--steps: must be at least 3, got 1"),
        (["--start-lr", "1", "--end-lr", "0.1"], "--end-lr (0.1) must be above --start-lr (1)"),
        (["-o", "plot.jpg"], "the plot is a PNG"),
        (["--model", "no-such-model"], "no-such-model"),
        (["--optimizer", "rmsprop"], "--optimizer: invalid choice"),
    ],
)
def test_a_bad_option_is_one_line_and_exit_2(
    args: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, lines = main_error(["lr-find", *args], capsys)
    assert code == 2 and len(lines) == 1 and needle in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_your_own_module_gets_its_weights_back(small_digits: Dataset) -> None:
    import torch
    from torch import nn

    net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    found = api.lr_find(model=net, data=small_digits, steps=12, batch_size=64)
    assert len(found.lrs) >= 3 and found.title.startswith("module:Sequential")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_on_a_gpu_the_step_loss_comes_from_the_epochs_running_sum() -> None:
    """The loop passes loss=None on a GPU (no sync per step): the test reads the step's loss from the epoch sums."""
    import torch

    class Loop:
        def __init__(self) -> None:
            self.optimizer = SimpleNamespace(param_groups=[{"lr": 1e-7}])
            self.progress = SimpleNamespace(loss_sum=torch.tensor(0.0), seen=0)

        def set_lr(self, lr: float) -> None:
            self.optimizer.param_groups[-1]["lr"] = lr

        def stop(self, reason: str) -> None:
            raise AssertionError(reason)

        def step(self, loss: float, images: int) -> None:
            self.progress.loss_sum = self.progress.loss_sum + loss * images
            self.progress.seen += images

    test, loop = RangeTest(1e-7, 10.0, 10), Loop()
    for loss in (2.0, 1.0):
        loop.step(loss, 32)
        test.on_step_end(loop, None)
    loop.progress = SimpleNamespace(loss_sum=torch.tensor(0.0), seen=0)  # a new epoch starts its sums at zero
    loop.step(0.5, 16)
    test.on_step_end(loop, None)
    assert test.raw == [2.0, 1.0, 0.5] and test.lrs[1] == pytest.approx(test.lr_at(1))
