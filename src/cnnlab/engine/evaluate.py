"""Evaluation of a model over batches: loss, top-1 and top-5 accuracy, with optional test-time augmentation."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from cnnlab.engine import distributed
from cnnlab.engine.device import autocast
from cnnlab.engine.loss import class_loss
from cnnlab.engine.metrics import topk_correct


def predict_logits(model: nn.Module, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """Logits (B, K) for a batch (B, C, H, W); with `tta`, the mean of the logits of the batch and of its mirror."""
    logits = model(x)
    if tta:
        logits = (logits.float() + model(x.flip(3)).float()) * 0.5
    return logits


@torch.no_grad()
def evaluate_batches(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    label_smoothing: float = 0.0,
    dtype: torch.dtype = torch.float32,
    tta: bool = False,
    weight: torch.Tensor | None = None,
) -> dict[str, float]:
    """Mean loss (with class `weight`s if given), top-1 and top-5 accuracy of `model` (in eval mode) over the batches.

    `tta`: the logits are averaged with those of the mirrored images.
    """
    model.eval()
    loss_sum = correct1 = correct5 = None
    n = 0
    for x, y in batches:
        with autocast(x.device, dtype):
            logits = predict_logits(model, x, tta)
        logits = logits.float()
        loss = class_loss(logits, y, label_smoothing, weight, reduction="sum")
        c1, c5 = topk_correct(logits, y, (1, 5))
        # Accumulate on the device: one host sync at the end, not one per batch.
        loss_sum = loss if loss_sum is None else loss_sum + loss
        correct1 = c1 if correct1 is None else correct1 + c1
        correct5 = c5 if correct5 is None else correct5 + c5
        n += y.numel()
    if distributed.env().enabled:  # every process evaluated its own shard: sum them, so all print the same numbers
        zero = torch.zeros((), device=next(model.parameters()).device)
        sums = [t if t is not None else zero for t in (loss_sum, correct1, correct5)] + [zero + n]
        loss_sum, correct1, correct5, total = distributed.all_sum(sums)
        n = int(total.item())
    if n == 0:
        return {"loss": float("nan"), "acc": float("nan"), "top5": float("nan"), "n": 0}
    return {"loss": loss_sum.item() / n, "acc": correct1.item() / n, "top5": correct5.item() / n, "n": n}
