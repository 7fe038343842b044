"""The one channel through which training reports progress; the library itself never prints."""

from __future__ import annotations

from typing import Any


class Reporter:
    """Receives training events. This base class ignores them all; the CLI subclasses it to draw progress."""

    def train_start(self, info: dict[str, Any]) -> None:
        """Called once with the resolved run: model, dataset sizes, device, steps per epoch, run directory."""

    def epoch_start(self, epoch: int, steps: int) -> None:
        """Called before each epoch (1-based) with its number of optimizer steps."""

    def step(self, epoch: int, step: int, loss: float | None) -> None:
        """Called after each optimizer step; `loss` is None on steps where reading it would stall the device."""

    def epoch_end(self, row: dict[str, Any]) -> None:
        """Called with the epoch's metrics row (as written to metrics.csv)."""

    def message(self, text: str) -> None:
        """A one-line notice (early stopping, resume, ...)."""

    def train_end(self, result: Any) -> None:
        """Called once with the TrainResult."""
