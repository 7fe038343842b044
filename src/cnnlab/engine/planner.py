"""--time-budget: how many optimizer steps fit in the time left, from measured step and evaluation times.

Pure functions of numbers and a clock: they return a plan and never touch the config, so tests drive them with a
fake clock and every process of a data-parallel run can compute (and agree on) the same plan.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from cnnlab.errors import OptionError

# The fraction of the budget planned for, seconds per checkpoint, seconds to finish a run (results and curves).
BUDGET_SAFETY, BUDGET_SAVE_S, BUDGET_FINISH_S = 0.96, 0.05, 0.5
Clock = Callable[[], float]


@dataclass(frozen=True)
class Costs:
    """What a run costs besides its steps, in seconds, measured before it starts."""

    step_s: float  # one training step
    per_epoch_s: float  # one epoch's validation and checkpoint
    fixed_s: float  # after the last step: the test evaluation, results and curves
    steps_per_epoch: int


def costs(step_s: float, image_s: float, n_val: int, n_test: int, steps_per_epoch: int, saves: bool) -> Costs:
    """The costs of a run from one step's time and one evaluated image's time."""
    per_epoch = n_val * image_s + (BUDGET_SAVE_S if saves else 0.0)
    return Costs(step_s, per_epoch, n_test * image_s + BUDGET_FINISH_S, steps_per_epoch)


@dataclass(frozen=True)
class Plan:
    """The number of optimizer steps that ends training, evaluation and saving within the budget."""

    steps: int
    costs: Costs

    def describe(self, budget: float, image_s: float) -> str:
        """One line for the progress output."""
        return (
            f"time budget {budget:g} s: one step takes {self.costs.step_s * 1e3:.1f} ms, evaluating one image "
            f"{image_s * 1e6:.0f} us -> {self.steps} steps ({self.steps / self.costs.steps_per_epoch:.2f} epochs)"
        )


def plan(budget: float, started: float, c: Costs, max_steps: int | None = None, clock: Clock = time.perf_counter
         ) -> Plan:  # fmt: skip
    """The steps that fit in `budget` seconds counted from `started` (a `clock()` reading); OptionError if none."""
    spent = clock() - started
    left = budget * BUDGET_SAFETY - spent - c.fixed_s
    # s steps run ceil(s / steps_per_epoch) <= s / steps_per_epoch + 1 epochs, each with its own overhead.
    one_step = c.step_s + c.per_epoch_s / c.steps_per_epoch
    steps = int((left - c.per_epoch_s) / one_step)
    if max_steps:
        steps = min(steps, max_steps)
    if steps < 1:
        # The smallest budget for which this plan has one step, with the same set-up time.
        need = (spent + c.fixed_s + c.per_epoch_s + one_step) / BUDGET_SAFETY
        raise OptionError(
            "time_budget",
            f"{budget:g}: too short; one step takes {c.step_s:.3g} s and evaluation {c.fixed_s:.3g} s after "
            f"{spent:.3g} s of set-up; give at least {max(math.ceil(need), math.floor(budget) + 1)} s",
        )
    return Plan(steps, c)


def replan(budget: float, started: float, fixed_s: float, pace: float, step: int,
           max_steps: int | None = None, clock: Clock = time.perf_counter) -> int:  # fmt: skip
    """After an epoch at `pace` seconds per step (its validation and checkpoint included): the total steps that fit."""
    left = budget * BUDGET_SAFETY - (clock() - started) - fixed_s
    new = step + max(1, int(left / pace))
    return min(new, max_steps) if max_steps else new


def ends_past(budget: float, started: float, fixed_s: float, step_s: float, step: int, total: int,
              clock: Clock = time.perf_counter) -> bool:  # fmt: skip
    """Whether the steps from `step` to `total` at `step_s` seconds each, then `fixed_s`, end past the whole budget."""
    return clock() - started + (total - step) * step_s + fixed_s > budget


def worth_changing(new: int, total: int) -> bool:
    """Whether a re-plan differs enough (over 0.5%, or 2 steps) from the current plan to rebuild the schedule."""
    return abs(new - total) > max(2, total // 200)
