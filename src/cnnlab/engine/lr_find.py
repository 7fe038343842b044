"""The learning-rate range test (Smith 2015, "Cyclical learning rates for training neural networks"; fastai's lr_find).

Ordinary training steps - the model, data, augmentation, optimizer and options `cnnlab train` would use - with the
learning rate raised exponentially from `start_lr` (1e-7) to `end_lr` (10) over `steps` (100) optimizer steps. The
loss of each step is smoothed by an exponential moving average (0.98, bias-corrected as in Adam) and the test stops
once the smoothed loss passes 4x its minimum: beyond that the weights are diverging.

The suggestion is the rate at the steepest descent of the smoothed loss (per decade of lr), looked for before the
minimum: where the loss falls fastest, the rate is high enough to learn quickly and still well short of where it
blows up. (The other common rule, the minimum's rate / 10, is reported too as `min_loss_lr / 10`.)

It is a callback (RangeTest) on a Trainer without a run directory: nothing is written, no run is made.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cnnlab.engine.callbacks import Callback
from cnnlab.engine.config import TrainConfig
from cnnlab.engine.lr_defaults import (  # noqa: F401  (default_plot_path: also this module's)
    DIVERGE,
    END_LR,
    SKIP_START,
    SMOOTHING,
    START_LR,
    STEPS,
    default_plot_path,
)
from cnnlab.errors import CnnlabError, UsageError

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import nn

    from cnnlab.data.sources import Dataset
    from cnnlab.engine.reporter import Reporter
    from cnnlab.engine.trainer import Trainer


@dataclass
class LRFind:
    """What the range test measured: per step the learning rate and the (smoothed and raw) loss; the suggestion."""

    lrs: list[float]  # the classifier's learning rate of each step (fine-tuning: the backbone's is lr x its mult)
    losses: list[float]  # the smoothed loss after each step
    raw_losses: list[float]  # each step's own loss
    suggested_lr: float  # the steepest descent of the smoothed loss
    min_loss_lr: float  # where the smoothed loss is lowest
    stopped: str  # why the test ended
    title: str = ""
    settings: dict[str, Any] = field(default_factory=dict)  # start_lr, end_lr, steps

    def figure(self) -> Figure:
        """Loss against learning rate (log x): raw and smoothed, the suggestion and the minimum marked."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4.5))
        ax = fig.subplots()
        ax.plot(self.lrs, self.raw_losses, color="tab:blue", alpha=0.25, linewidth=1, label="loss of each step")
        ax.plot(self.lrs, self.losses, color="tab:blue", linewidth=2, label="smoothed loss")
        at = self.lrs.index(self.suggested_lr)
        ax.plot([self.suggested_lr], [self.losses[at]], "o", color="tab:red", markersize=8,
                label=f"suggested {self.suggested_lr:.1e} (steepest descent)")  # fmt: skip
        ax.axvline(self.suggested_lr, color="tab:red", linestyle="--", linewidth=1)
        ax.axvline(self.min_loss_lr, color="grey", linestyle=":", linewidth=1,
                   label=f"lowest loss at {self.min_loss_lr:.1e}")  # fmt: skip
        ax.set_xscale("log")
        top = max(self.losses[0], min(self.losses)) * 1.6  # the diverging tail would flatten the interesting part
        ax.set_ylim(min(min(self.raw_losses), min(self.losses)) * 0.9, top)
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel("training loss")
        ax.set_title(f"learning-rate range test: {self.title}" if self.title else "learning-rate range test")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=9)
        return fig

    def plot(self, path: str | os.PathLike[str] | None = None) -> Figure:
        """The figure (a notebook shows it); with `path`, also written there as a PNG."""
        fig = self.figure()
        if path is not None:
            from cnnlab.inspect.visualize import save_figure

            save_figure(fig, path)
        return fig

    def to_dict(self) -> dict[str, Any]:
        """JSON-able numbers."""
        return {
            "suggested_lr": self.suggested_lr, "min_loss_lr": self.min_loss_lr, "lrs": self.lrs,
            "losses": self.losses, "raw_losses": self.raw_losses, "steps": len(self.lrs), "stopped": self.stopped,
            **self.settings,
        }  # fmt: skip


def suggest(lrs: list[float], losses: list[float]) -> tuple[float, float]:
    """(the lr of the steepest descent of the smoothed loss before its minimum, the lr of the minimum)."""
    low = min(range(len(losses)), key=losses.__getitem__)
    first = min(int(SKIP_START * len(losses)), max(low - 1, 0))
    if low - first < 2:  # the loss fell for fewer than two steps: the minimum is all there is
        return lrs[low], lrs[low]

    def slope(i: int) -> float:  # d loss / d log10(lr), central difference (one-sided at the ends)
        a, b = max(i - 1, first), min(i + 1, low)
        return (losses[b] - losses[a]) / (math.log10(lrs[b]) - math.log10(lrs[a]))

    steepest = min(range(first, low + 1), key=slope)
    return lrs[steepest], lrs[low]


class RangeTest(Callback):
    """Sets the lr of each step (start_lr x (end_lr / start_lr) ** (i / (steps - 1))), records the loss, and stops the
    loop once the smoothed loss is not finite or passes DIVERGE x its minimum."""

    def __init__(self, start_lr: float = START_LR, end_lr: float = END_LR, steps: int = STEPS) -> None:
        self.start_lr, self.end_lr, self.steps = start_lr, end_lr, steps
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.raw: list[float] = []
        self.average, self.best = 0.0, math.inf
        self.diverged = False
        self.stopped = f"reached end_lr after {steps} steps"
        self.last_sum: tuple[Any, float, int] = (None, 0.0, 0)  # (epoch progress, its loss sum, images seen)

    def lr_at(self, i: int) -> float:
        """The learning rate of step i (0-based)."""
        return self.start_lr * (self.end_lr / self.start_lr) ** (i / max(self.steps - 1, 1))

    def on_train_start(self, loop: Trainer) -> None:
        """The first step's rate."""
        loop.set_lr(self.lr_at(0))

    def on_step_end(self, loop: Trainer, loss: float | None) -> None:
        """Record this step, smooth, stop if diverging, else set the next step's rate."""
        lr = loop.optimizer.param_groups[-1]["lr"]  # the rate this step used (the classifier's group)
        loss = self._step_loss(loop) if loss is None else loss
        n = len(self.lrs) + 1
        self.average = SMOOTHING * self.average + (1 - SMOOTHING) * loss
        smooth = self.average / (1 - SMOOTHING**n)  # bias correction: the average starts at 0
        if not math.isfinite(smooth):
            self.diverged = True
            self.stopped = f"the loss became non-finite at lr {lr:.2g}"
            loop.stop(self.stopped)
            return
        self.lrs.append(lr)
        self.losses.append(smooth)
        self.raw.append(loss)
        if smooth > DIVERGE * self.best:
            self.diverged = True
            self.stopped = f"the smoothed loss passed {DIVERGE:g}x its minimum at lr {lr:.2g}"
            loop.stop(self.stopped)
            return
        self.best = min(self.best, smooth)
        if n < self.steps:
            loop.set_lr(self.lr_at(n))

    def _step_loss(self, loop: Trainer) -> float:
        """This step's mean loss from the epoch's running sum (the loop passes None on a GPU, to avoid a sync)."""
        prog = loop.progress
        before, total, seen = self.last_sum
        if before is not prog:  # a new epoch: its sums start at zero
            total, seen = 0.0, 0
        now = float(prog.loss_sum.item())
        self.last_sum = (prog, now, prog.seen)
        return (now - total) / max(prog.seen - seen, 1)

    def result(self, title: str = "") -> LRFind:
        """The measurements and the suggestion."""
        if len(self.lrs) < 3:
            raise CnnlabError(
                f"lr-find: only {len(self.lrs)} steps before {self.stopped}; "
                f"lower {{start_lr}} (now {self.start_lr:g})",
                options=True,
            )
        suggested, lowest = suggest(self.lrs, self.losses)
        settings = {"start_lr": self.start_lr, "end_lr": self.end_lr, "max_steps": self.steps}
        return LRFind(self.lrs, self.losses, self.raw, suggested, lowest, self.stopped, title, settings)


def range_config(cfg: TrainConfig, steps: int) -> TrainConfig:
    """The options with what the range test steers itself replaced: no schedule, no early stopping, no logs, no
    time budget, no EMA, `steps` steps at most."""
    return dataclasses.replace(
        cfg, schedule="none", epochs=steps, max_steps=steps, time_budget=None, planned_steps=None, patience=0,
        logger=(), ema=None, on_nan="stop", checkpoint_steps=0, checkpoint_minutes=0.0,
    )  # fmt: skip


def check_range(start_lr: float, end_lr: float, steps: int) -> None:
    """A UsageError for a range that cannot be tested."""
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 3):
        raise UsageError(f"lr-find: steps must be a whole number of at least 3, got {steps!r}")
    for name, value in (("start_lr", start_lr), ("end_lr", end_lr)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise UsageError(f"lr-find: {name} must be a number above 0, got {value!r}")
    if end_lr <= start_lr:
        raise UsageError(f"lr-find: end_lr ({end_lr:g}) must be above start_lr ({start_lr:g})")


def find_lr(
    config: TrainConfig | None = None, *, start_lr: float = START_LR, end_lr: float = END_LR, steps: int = STEPS,
    dataset: Dataset | None = None, module: nn.Module | None = None, reporter: Reporter | None = None,
) -> LRFind:  # fmt: skip
    """Run the range test with `config`'s model, data and optimizer; nothing is written to disk."""
    from cnnlab.engine import distributed
    from cnnlab.engine.reporter import Reporter
    from cnnlab.engine.trainer import Trainer

    check_range(start_lr, end_lr, steps)
    if distributed.env().enabled:
        raise UsageError("lr-find runs in one process; start it without torchrun")
    cfg = range_config(config or TrainConfig(), steps).validate(custom_model=module is not None)
    test = RangeTest(start_lr, end_lr, steps)
    # Your own module trains in place: it gets its weights back (a rate of 10 would leave them ruined).
    saved = {k: v.detach().clone() for k, v in module.state_dict().items()} if module is not None else None
    try:
        loop = Trainer(cfg, reporter or Reporter(), dataset, callbacks=[test], module=module)
        for callback in loop.callbacks:
            callback.on_train_start(loop)
        while loop.step < loop.total_steps and not loop.stop_reason:
            try:
                loop.train_epoch()
            except CnnlabError:  # "training diverged": a non-finite loss, which the range test has stopped at
                if not test.diverged:
                    raise
            loop.epoch += 1
    finally:
        if module is not None:
            module.load_state_dict(saved)
    return test.result(f"{cfg.model} on {loop.data.name}")
