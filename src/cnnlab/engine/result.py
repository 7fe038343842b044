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
    test_map: float | None = None  # multi-label data: mean average precision on the test split (test_acc: exact match)
    history: list[dict[str, Any]] = field(default_factory=list)

    def headline(self, details: bool = True) -> str:
        """The test numbers in words: accuracy (top-5, loss), or for multi-label data mAP (exact match, loss)."""
        if self.test_map is not None:
            main, more = f"test mAP {self.test_map:.3f}", f"exact match {self.test_acc:.2%}"
        else:
            main, more = f"test accuracy {self.test_acc:.2%}", f"top-5 {self.test_top5:.2%}"
        return f"{main} ({more}, loss {self.test_loss:.4f})" if details else main

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (without the per-epoch history)."""
        d = dataclasses.asdict(self)
        d.pop("history")
        d["run_dir"] = str(self.run_dir) if self.run_dir else None
        return d
