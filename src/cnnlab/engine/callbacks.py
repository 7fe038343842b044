"""Callbacks: whatever watches or steers a run (early stopping, checkpoints, the time budget, freezing, weight EMA,
progress, experiment logs), and your own.

The protocol is six hooks, each given the running `Trainer` (called `loop` here):

    on_train_start(loop)             after set-up (and after a resume restored the run), before the first step
    on_epoch_start(loop)             before each epoch; loop.epoch is the number of epochs done
    on_step_end(loop, loss)          after each optimizer step; loss is a float, or None where reading it would
                                     stall a GPU (the loss of every step is in the epoch's metrics row anyway)
    on_epoch_end(loop, row)          with the epoch's metrics row (what metrics.csv gets); add keys to log them
    on_train_end(loop, result)       with the TrainResult, after the test evaluation
    on_train_error(loop, error)      instead of on_train_end when the run ends by an exception (Ctrl-C, a diverged
                                     loss, a full disk); the exception is raised again after every callback saw it

From a hook a callback may read `loop.model`, `loop.optimizer`, `loop.epoch`, `loop.step`, `loop.total_steps`,
`loop.history`, `loop.run` (the run directory or None) and `loop.config`, change the learning rate with
`loop.set_lr(lr)`, and end the run after the current step with `loop.stop(reason)`. A callback with state that must
survive a resume returns it from `state_dict()` (tensors, numbers, strings, lists, dicts) and takes it back in
`load_state_dict()`; it is saved in last.ckpt under the callback's `key`.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from typing import TYPE_CHECKING, Any, Protocol

import torch

from cnnlab.engine import distributed, planner, rundir
from cnnlab.engine.checkpoint import save_checkpoint, save_weights
from cnnlab.engine.device import synchronize
from cnnlab.engine.optim import build_scheduler, split_parameters
from cnnlab.engine.record import RunRecord

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from cnnlab.engine.config import TrainConfig
    from cnnlab.engine.reporter import Reporter
    from cnnlab.engine.result import TrainResult


class Loop(Protocol):
    """What a callback may use of the running loop (engine/trainer.py's Trainer is one; cnnlab's own callbacks below
    also reach into its internals: the classifier's names, the scheduler, mid-epoch saving)."""

    model: nn.Module  # the network being trained (unwrapped: not the DDP or compiled wrapper)
    epoch: int  # epochs done
    step: int  # optimizer steps done
    total_steps: int  # the steps the run will take (a time budget may change it)
    history: list[dict[str, Any]]  # the metrics rows so far
    run: Path | None  # the run directory (None: nothing is written)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer (its param_groups hold the learning rates)."""

    @property
    def config(self) -> TrainConfig:
        """The run's options."""

    def set_lr(self, lr: float) -> None:
        """Set the classifier's learning rate (other groups keep their ratio to it)."""

    def stop(self, reason: str) -> None:
        """End the run after the current step."""

    def message(self, text: str) -> None:
        """A one-line notice to the progress output."""


class Callback:
    """Base class: every hook does nothing. Override the ones you need (see the module docstring)."""

    key: str | None = None  # the name its state_dict() is saved under in last.ckpt (None: it has no state)

    def on_train_start(self, loop: Loop) -> None:
        """After set-up, before the first step."""

    def on_epoch_start(self, loop: Loop) -> None:
        """Before each epoch."""

    def on_step_end(self, loop: Loop, loss: float | None) -> None:
        """After each optimizer step."""

    def on_epoch_end(self, loop: Loop, row: dict[str, Any]) -> None:
        """After each epoch, with its metrics row."""

    def on_train_end(self, loop: Loop, result: TrainResult) -> None:
        """After the test evaluation."""

    def on_train_error(self, loop: Loop, error: BaseException) -> None:
        """The run ended by `error` (raised again afterwards): close what on_train_start opened."""

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs to continue exactly (only for callbacks with a `key`)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what state_dict() returned."""


class Progress(Callback):
    """Forwards the run's events to a Reporter (the CLI's progress bar, a notebook's bar, or silence)."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.planned = 0  # the total steps the reporter was last told of

    def _plan(self, loop: Loop) -> None:
        # A time budget re-plans inside TimeBudget's hooks; the bar and the "epoch k/N" lines follow the new plan.
        if loop.total_steps != self.planned:
            self.planned = loop.total_steps
            self.reporter.plan_changed(loop.total_steps, loop.config.epochs)

    def on_train_start(self, loop: Loop) -> None:
        """Note the plan the reporter started with."""
        self.planned = loop.total_steps

    def on_epoch_start(self, loop: Loop) -> None:
        """Announce the epoch and its number of steps."""
        steps = min(loop.steps_per_epoch - loop.steps_into_epoch(), loop.total_steps - loop.step)
        self.reporter.epoch_start(loop.epoch + 1, steps)

    def on_step_end(self, loop: Loop, loss: float | None) -> None:
        """Advance the bar."""
        self._plan(loop)
        self.reporter.step(loop.epoch + 1, loop.steps_into_epoch(), loss)

    def on_epoch_end(self, loop: Loop, row: dict[str, Any]) -> None:
        """Print the epoch's line (after the epoch end's re-plan, so that it counts the epochs of the new plan)."""
        self._plan(loop)
        self.reporter.epoch_end(row)


class Freeze(Callback):
    """freeze="features": only the classifier trains; with unfreeze_after=N everything trains from epoch N + 1.

    A frozen feature extractor gets no gradient, and its BatchNorm layers keep their running statistics.
    """

    def on_epoch_start(self, loop: Loop) -> None:
        """Set requires_grad (and BatchNorm modes) for the coming epoch."""
        if loop.head is None:
            return
        cfg, model = loop.config, loop.model
        frozen = cfg.freeze == "features" and (cfg.unfreeze_after is None or loop.epoch < cfg.unfreeze_after)
        backbone, _ = split_parameters(model, loop.head)
        changed = bool(backbone) and backbone[0].requires_grad == frozen
        if cfg.unfreeze_after and loop.epoch == cfg.unfreeze_after and changed:
            loop.message(f"epoch {loop.epoch + 1}: unfreezing the feature extractor (its lr x{cfg.backbone_lr_mult:g})")
        for p in backbone:
            p.requires_grad_(not frozen)
        if changed:
            loop.rewrap()  # DDP only syncs the parameters that need gradients when it is built
        if frozen:
            head_modules = {m for name in loop.head for m in model.get_submodule(name).modules()}
            for m in model.modules():
                # In train mode BN would still update running mean/var from the new data: frozen means fixed.
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m not in head_modules:
                    m.eval()


class EarlyStopping(Callback):
    """Tracks the best validation loss; stops after `patience` epochs without a lower one (0: never stops).

    Sets `loop.improved` for the epoch, which Checkpointing reads to keep the best weights.
    """

    key = "early_stop"

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best_loss, self.best_epoch, self.bad_epochs = math.inf, 0, 0

    def on_epoch_end(self, loop: Loop, row: dict[str, Any]) -> None:
        """Compare this epoch's validation loss with the best so far."""
        has_val = row.get("val_loss") is not None
        loop.improved = not has_val or row["val_loss"] < self.best_loss
        if loop.improved:
            self.best_loss = row["val_loss"] if has_val else math.inf
            self.best_epoch, self.bad_epochs = loop.epoch, 0
        else:
            self.bad_epochs += 1
        if self.patience and self.bad_epochs >= self.patience:
            loop.stop(
                f"early stopping: validation loss has not improved for {self.patience} epochs; "
                f"restoring epoch {self.best_epoch}"
            )

    def state_dict(self) -> dict[str, Any]:
        """Best loss and epoch, and the epochs since."""
        return {"best_loss": self.best_loss, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue counting where the checkpoint left off."""
        self.best_loss, self.best_epoch, self.bad_epochs = state["best_loss"], state["best_epoch"], state["bad_epochs"]


class Checkpointing(Callback):
    """Writes best.safetensors when the epoch improved, last.ckpt and metrics.csv after every epoch, and last.ckpt
    inside epochs every `steps` steps or `minutes` minutes. Without a run directory the best weights stay in memory.
    """

    def __init__(self, steps: int = 0, minutes: float = 0.0) -> None:
        self.steps, self.minutes = steps, minutes
        self.last_save = time.monotonic()

    def on_step_end(self, loop: Loop, loss: float | None) -> None:
        """A mid-epoch checkpoint when one is due."""
        due = bool(self.steps) and loop.step % self.steps == 0
        due = due or (bool(self.minutes) and time.monotonic() - self.last_save >= 60 * self.minutes)
        if due and loop.step < loop.total_steps:
            loop.save_mid_epoch()
            self.last_save = time.monotonic()

    def on_epoch_end(self, loop: Loop, row: dict[str, Any]) -> None:
        """Best weights (if improved), then the checkpoint and the metrics."""
        if loop.improved:
            if loop.run:
                save_weights(loop.eval_model, loop.run / rundir.BEST)
            else:
                loop.best_state = {k: v.detach().clone() for k, v in loop.eval_model.state_dict().items()}
        if loop.run:
            save_checkpoint(loop.checkpoint_state(), loop.run / rundir.LAST)
            rundir.write_metrics(loop.run, loop.history)
            self.last_save = time.monotonic()


class TimeBudget(Callback):
    """time_budget: re-plan the remaining steps at the pace measured, after each epoch and on a slowdown mid-epoch.

    The first plan rests on about a second of timing; a machine whose speed drifts (shared or throttled CPUs) would
    otherwise overrun. The one-cycle schedule is rebuilt over the new total, continuing at the current step.
    """

    WATCH_PARTS = 40  # inside an epoch, the pace is checked every 1/40 of the plan's steps (10 steps apart at least)

    def __init__(self, started: float, fixed_s: float, clock: planner.Clock, per_epoch_s: float = 0.0) -> None:
        self.started, self.fixed_s, self.clock, self.per_epoch_s = started, fixed_s, clock, per_epoch_s
        self.epoch_started, self.steps_before = 0.0, 0
        self.early_done = False  # the one re-plan inside the first epoch
        # Where the pace of the steps since the last check starts, and since the epoch began or an in-epoch re-plan
        # last changed the plan (the pace that re-plans: one slow window is a warning, not the pace from now on).
        self.window_started, self.window_step = 0.0, 0
        self.segment_started, self.segment_step = 0.0, 0
        self.last_step_at = 0.0  # the clock at the latest step's end: what follows in an epoch is its end's work

    def on_epoch_start(self, loop: Loop) -> None:
        """Note when the epoch began and at which step."""
        self.epoch_started, self.steps_before = self.clock(), loop.step
        self.window_started = self.segment_started = self.last_step_at = self.epoch_started  # no epoch-end work
        self.window_step = self.segment_step = loop.step

    def on_step_end(self, loop: Loop, loss: float | None) -> None:
        """Once, a quarter into the first epoch (or into a plan shorter than one): re-plan at its steps' pace.

        A plan under an epoch has no epoch end to correct at, and the real steps run a few percent slower than the
        timed ones (2-core AMD EPYC: 64.8 vs 62.0 ms, a 30 s budget overran by 0.7 s without this). After that,
        every 1/40 of the plan: if the steps since the last check have slowed enough to end past the budget,
        re-plan (`_watch`).
        """
        self.last_step_at = self.clock()
        if self.early_done:
            self._watch(loop)
            return
        done = loop.step - self.steps_before
        if done < max(10, min(loop.total_steps, loop.steps_per_epoch) // 4):
            return
        self.early_done = True
        if loop.step >= loop.total_steps:
            return
        pace = (self._now(loop) - self.epoch_started) / done  # seconds per step, no epoch-end work in it
        # Even on a clock that did not move (a test's), every process must reach `_follow` (a collective).
        self._follow_in_epoch(loop, self._fit(loop, pace) if pace > 0 else loop.total_steps, pace)

    def _watch(self, loop: Loop) -> None:
        """Every 1/40 of the plan's steps (10 apart at least): shorten the plan if the steps since the last check
        are slow enough to end the run past its budget.

        Epoch ends re-plan in any case, but an epoch can be a quarter of a short budget: a second process that took
        one of 2 CPU cores mid-epoch made a 175 s run end at 266 s. The check counts the rest of the steps at the
        pace since the last check, this epoch's validation and checkpoint, and the test; the epoch ends after this
        one are left to the epoch-end re-plan, which counts them at their measured cost. The new plan takes the pace
        since the epoch began (or since the last in-epoch re-plan): one slow stretch shortens it a little, a lasting
        slowdown again at each check. Only a shorter plan is followed here; a faster pace waits for the epoch end.
        The check falls on the same steps in every process (the plan is rank 0's); rank 0's decision is followed.
        """
        done = loop.step - self.window_step
        if done < self._check_every(loop) or loop.step >= loop.total_steps:
            return
        now = self._now(loop)
        pace = (now - self.window_started) / done
        late = pace > 0 and planner.ends_past(loop.config.time_budget, self.started, self.fixed_s + self.per_epoch_s,
                                              pace, loop.step, loop.total_steps, self.clock)  # fmt: skip
        total = loop.total_steps
        if late:
            pace = (now - self.segment_started) / max(1, loop.step - self.segment_step)
            total = min(total, self._fit(loop, pace))
        self._follow_in_epoch(loop, total, pace)  # called on time or not: it is collective

    def _now(self, loop: Loop) -> float:
        """The clock, once the device has finished the steps queued so far."""
        synchronize(next(loop.model.parameters()).device)  # CUDA queues its work: the clock must see it done
        return self.clock()

    def _check_every(self, loop: Loop) -> int:
        """Steps between two in-epoch checks of the pace: 1/WATCH_PARTS of the plan, 10 at least."""
        return max(10, loop.total_steps // self.WATCH_PARTS)

    def _fit(self, loop: Loop, pace: float) -> int:
        """The total steps that fit in the budget at `pace` seconds per step from here."""
        cfg = loop.config
        # As the first plan counts them: this epoch's end still to come (with the test, after the last step), and
        # each later epoch's end spread over its steps.
        fixed_s, step_s = self.fixed_s + self.per_epoch_s, pace + self.per_epoch_s / loop.steps_per_epoch
        return planner.replan(cfg.time_budget, self.started, fixed_s, step_s, loop.step, cfg.max_steps, self.clock)

    def _follow_in_epoch(self, loop: Loop, total: int, pace: float) -> None:
        """Follow a re-plan made inside an epoch (every process calls it at the same step: `_follow` is collective),
        then start the next window of steps whose pace `_watch` checks."""
        note = self._follow(loop, total, pace)
        if note:
            # config.json now holds the new plan: a checkpoint with the schedule rebuilt over it goes with it, so
            # that a resume (or a torchrun restart) never pairs the new plan with an older checkpoint's schedule.
            loop.save_mid_epoch()  # type: ignore[attr-defined]
            loop.message(note)
            self.segment_started, self.segment_step = self.clock(), loop.step
        self.window_started, self.window_step = self.clock(), loop.step  # after the re-plan's own checkpoint

    def on_epoch_end(self, loop: Loop, row: dict[str, Any]) -> None:
        """Re-plan at the epoch's pace (must run before Checkpointing, which saves the plan).

        After an in-epoch re-plan, the steps since it set the pace, so that the faster steps before a slowdown do not
        undo the shorter plan; the epoch's end (validation) is spread over all its steps, as the plan counts it. A
        re-plan fewer than a check's worth of steps before the epoch's end stands: a pace over so few steps is noise.
        """
        steps, epoch_steps = loop.step - self.segment_step, loop.step - self.steps_before
        if steps < epoch_steps and steps < self._check_every(loop):  # the same on every process
            return
        end_work = self.clock() - self.last_step_at
        seconds = self.last_step_at - self.segment_started + end_work * steps / max(1, epoch_steps)
        note = self.replan(loop, seconds, steps)
        if note:
            loop.message(note)

    def replan(self, loop: Loop, epoch_seconds: float, epoch_steps: int) -> str | None:
        """Re-plan after `epoch_steps` steps took `epoch_seconds`; the note to show, or None if the plan holds."""
        cfg = loop.config
        if epoch_steps < 1 or loop.step >= loop.total_steps:
            return None
        pace = epoch_seconds / epoch_steps  # seconds per step, this epoch's validation included
        total = loop.total_steps  # a clock that did not move (a test's fake clock): nothing to re-plan from, but ...
        if pace > 0:
            total = planner.replan(cfg.time_budget, self.started, self.fixed_s, pace, loop.step, cfg.max_steps,
                                   self.clock)  # fmt: skip
        return self._follow(loop, total, pace)  # ... every process must reach the collective

    def _follow(self, loop: Loop, total: int, pace: float) -> str | None:
        """Rebuild the schedule over `total` steps if that differs enough from the plan; the note, or None."""
        cfg = loop.config
        total = distributed.from_rank0(total)  # every process must follow the same plan: rank 0's
        if not planner.worth_changing(total, loop.total_steps):
            return None
        note = f"time budget: re-planned from {loop.total_steps} to {total} steps ({pace * 1e3:.1f} ms per step)"
        loop.total_steps = cfg.planned_steps = total
        cfg.epochs = math.ceil(total / loop.steps_per_epoch)
        loop.sched = build_scheduler(loop.optimizer, cfg, total, loop.steps_per_epoch)
        if loop.sched is not None:
            with warnings.catch_warnings():  # "step() before optimizer.step()": the optimizer has stepped long ago
                warnings.simplefilter("ignore", UserWarning)
                loop.sched.last_epoch = loop.step - 1
                loop.sched.step()  # the learning rate at step loop.step of the new schedule
        if loop.run:  # a resumed run follows the new plan
            RunRecord.read(loop.run).with_train(cfg).write(loop.run)
        return note


class EMA(Callback):
    """ema=DECAY: an exponential moving average of the weights and BatchNorm statistics, updated after every
    optimizer step. Validation, the best weights and the test use the average (loop.eval_model).

    The decay warms up as min(DECAY, (1 + n) / (10 + n)) after n updates, so that a short run's average is not
    dominated by the random initial weights (0.999 alone would keep 90% of them after 100 steps).
    """

    key = "ema"

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.model: torch.nn.Module | None = None
        self.updates = 0
        self._restored: dict[str, Any] | None = None

    def on_train_start(self, loop: Loop) -> None:
        """Start the average from the current weights, or from the average a resumed checkpoint held."""
        self.model = copy.deepcopy(loop.model).eval().requires_grad_(False)
        if self._restored:
            self.model.load_state_dict(self._restored["model"])
            self.updates = int(self._restored["updates"])
            self._restored = None

    @torch.no_grad()
    def on_step_end(self, loop: Loop, loss: float | None) -> None:
        """Move the average towards the new weights: avg += (1 - decay) * (w - avg); integer buffers are copied."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        mine = [*self.model.parameters(), *self.model.buffers()]
        theirs = [*loop.model.parameters(), *loop.model.buffers()]
        floats = [(a, b) for a, b in zip(mine, theirs, strict=True) if a.is_floating_point()]
        torch._foreach_lerp_([a for a, _ in floats], [b.detach() for _, b in floats], 1.0 - decay)
        for a, b in zip(mine, theirs, strict=True):
            if not a.is_floating_point():
                a.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights and the number of updates."""
        return {"model": self.model.state_dict(), "updates": self.updates} if self.model is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep a checkpoint's average until on_train_start builds the averaged copy of the loop's model."""
        self._restored = state or None

    def averaged(self) -> torch.nn.Module | None:
        """The averaged network (same structure as the model), or None before training starts."""
        return self.model
