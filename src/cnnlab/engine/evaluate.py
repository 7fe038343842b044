"""Evaluation of a model over batches: loss, top-1 and top-5 accuracy (multi-label: exact match and mAP), with optional
test-time augmentation."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from cnnlab.engine import distributed
from cnnlab.engine.device import autocast
from cnnlab.engine.loss import class_loss
from cnnlab.engine.metrics import exact_match, mean_average_precision, topk_correct


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
    keep: bool = False,
    multi_label: bool | None = None,
    thresholds: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Mean loss (with class `weight`s if given), top-1 and top-5 accuracy of `model` (in eval mode) over the batches.

    `tta`: the logits are averaged with those of the mirrored images. Multi-hot labels (B, K) make it a multi-label
    evaluation: BCE loss, "acc" is the exact-match ratio at probability 1/2, "top5" is NaN, and "mAP" is added;
    with `keep`, also the probabilities and labels (N, K) on the CPU (to choose thresholds on them). Data-parallel
    callers say `multi_label` (a process whose shard is empty sees no labels, yet must join the gathering).
    `thresholds` (K,): exact match at each label's own probability threshold instead of 1/2.
    """
    model.eval()
    loss_sum = correct1 = correct5 = None
    n = 0
    multi = bool(multi_label)
    probs, truth = [], []
    for x, y in batches:
        with autocast(x.device, dtype):
            logits = predict_logits(model, x, tta)
        logits = logits.float()
        multi = multi if multi_label is not None else y.dim() == 2
        loss = class_loss(logits, y, label_smoothing, weight, reduction="sum", multi_label=multi)
        if multi:
            c1 = c5 = exact_match(logits, y, thresholds)
            probs.append(logits.sigmoid().cpu())
            truth.append(y.cpu())
        else:
            c1, c5 = topk_correct(logits, y, (1, 5))
        # Accumulate on the device: one host sync at the end, not one per batch.
        loss_sum = loss if loss_sum is None else loss_sum + loss
        correct1 = c1 if correct1 is None else correct1 + c1
        correct5 = c5 if correct5 is None else correct5 + c5
        n += len(y)
    if distributed.env().enabled:  # every process evaluated its own shard: sum them, so all print the same numbers
        zero = torch.zeros((), device=next(model.parameters()).device)
        sums = [t if t is not None else zero for t in (loss_sum, correct1, correct5)] + [zero + n]
        loss_sum, correct1, correct5, total = distributed.all_sum(sums)
        n = int(total.item())
    if multi:  # every process joins the gathering, even one with no images
        empty = torch.empty(0)
        p, t = distributed.all_rows(torch.cat(probs) if probs else empty), distributed.all_rows(
            torch.cat(truth) if truth else empty.to(torch.uint8))  # fmt: skip
    if n == 0:
        return {"loss": float("nan"), "acc": float("nan"), "top5": float("nan"), "n": 0}
    out: dict[str, Any] = {"loss": loss_sum.item() / n, "acc": correct1.item() / n, "top5": correct5.item() / n, "n": n}
    if multi:
        out.update(top5=float("nan"), mAP=mean_average_precision(p, t)[0])
        if keep:
            out.update(probs=p, labels=t)
    return out
