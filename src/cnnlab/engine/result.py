"""What a finished run reports."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainResult:
    """What a finished fit() reports: test metrics of the best-validation weights and where the run lives."""

    run_dir: Path | None
    model: str
    data: str
    test_acc: float
    test_loss: float
    test_top5: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    seconds: float
    device: str
    skipped_steps: int = 0  # steps skipped by --on-nan skip
    steps: int = 0  # optimizer steps taken
    time_budget: float | None = None  # seconds, when the schedule was planned to a time budget
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (without the per-epoch history)."""
        d = dataclasses.asdict(self)
        d.pop("history")
        d["run_dir"] = str(self.run_dir) if self.run_dir else None
        return d
