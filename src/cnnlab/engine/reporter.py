"""The one channel through which training reports progress; the library itself never prints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnlab.engine.record import RunRecord


@dataclass(frozen=True)
class TrainStart:
    """What a reporter is told when training starts: the run's record and where the loop stands."""

    record: RunRecord
    run_dir: Path | None  # None when nothing is written (runs_dir=None)
    steps_per_epoch: int
    total_steps: int
    start_epoch: int  # epochs already done (a resumed run starts past 0)


class Reporter:
    """Receives training events. This base class ignores them all; the CLI subclasses it to draw progress."""

    def train_start(self, info: TrainStart) -> None:
        """Called once with the resolved run: model, dataset sizes, device, steps per epoch, run directory."""

    def epoch_start(self, epoch: int, steps: int) -> None:
        """Called before each epoch (1-based) with its number of optimizer steps."""

    def step(self, epoch: int, step: int, loss: float | None) -> None:
        """Called after each optimizer step; `loss` is None on steps where reading it would stall the device."""

    def epoch_end(self, row: dict[str, Any]) -> None:
        """Called with the epoch's metrics row (as written to metrics.csv)."""

    def message(self, text: str) -> None:
        """A one-line notice (early stopping, resume, ...)."""

    def plan_changed(self, total_steps: int, epochs: int) -> None:
        """A time budget re-planned the run: it now takes `total_steps` optimizer steps over `epochs` epochs."""

    def train_end(self, result: Any) -> None:
        """Called once with the TrainResult."""
