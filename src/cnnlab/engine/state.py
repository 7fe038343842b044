"""Run state for checkpoint and resume: where an epoch stands, and everything an exact resume needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class EpochProgress:
    """Where an epoch stands: its sample order, batches done, and running sums (all resumable)."""

    order: torch.Tensor  # (N,) sample indices of this epoch
    batch: int  # batches done
    loss_sum: torch.Tensor  # () sum of per-sample loss
    correct: torch.Tensor  # () top-1 hits (multi-label: images with every label right)
    first_bad: torch.Tensor  # () global step of the first non-finite loss, -1 if none
    seen: int  # samples done
    lr: float  # learning rate when the epoch started (the metrics row reports it)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, step: int) -> None:
        """Account for one step without a host sync."""
        self.first_bad = torch.where(
            (self.first_bad < 0) & ~torch.isfinite(loss), torch.full_like(self.first_bad, step), self.first_bad
        )
        self.loss_sum = self.loss_sum + loss * len(y)  # images, also for multi-hot labels (B, K)
        # Multi-hot labels (B, K): an image counts when every label is decided right at probability 1/2.
        hit = ((logits > 0) == (y > 0)).all(1) if y.dim() == 2 else logits.argmax(1) == y
        self.correct = self.correct + hit.sum()
        self.batch += 1
        self.seen += len(y)

    def state(self) -> dict[str, Any]:
        """Plain tensors and numbers for the checkpoint."""
        return {
            "order": self.order.cpu(),
            "batch": self.batch,
            "loss_sum": self.loss_sum.cpu(),
            "correct": self.correct.cpu(),
            "first_bad": self.first_bad.cpu(),
            "seen": self.seen,
            "lr": self.lr,
        }

    @classmethod
    def from_state(cls, d: dict[str, Any], device: torch.device) -> EpochProgress:
        """Inverse of state()."""
        return cls(
            d["order"].to(device),
            d["batch"],
            d["loss_sum"].to(device),
            d["correct"].to(device),
            d["first_bad"].to(device),
            d["seen"],
            d["lr"],
        )
