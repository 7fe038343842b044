"""The training loss: cross-entropy with label smoothing, optionally weighted per class; BCE for multi-label data."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0, weight: torch.Tensor | None = None,
    reduction: str = "mean", multi_label: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Cross-entropy of logits (B, K) against labels (B,); with `weight` (K,), each image's loss times its class's.

    Labels may also be probabilities (B, K) (MixUp, CutMix): an image's weight is then the mix of its classes'.
    Weighted, the mean is over images (not over the weights, as F.cross_entropy's is): a batch split into accumulated
    parts then sums to the same loss, and each image's whole smoothed loss is scaled by one number.

    `multi_label`: labels are multi-hot (B, K) (or their MixUp/CutMix blend); the loss is binary cross-entropy per
    label (a sigmoid head), averaged over the K labels of each image. Label smoothing pulls each target towards 1/2
    (1 -> 1 - e/2, 0 -> e/2: the two-class case of smoothing), and `weight` (K,) weighs each label's positives
    (`pos_weight`: negatives / positives balances a rare label).
    """
    if multi_label:
        target = labels.float() * (1 - label_smoothing) + label_smoothing / 2
        per_image = F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight, reduction="none").mean(1)
        return per_image.sum() if reduction == "sum" else per_image.mean() if reduction == "mean" else per_image
    if weight is None:
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction=reduction)
    per_image = F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="none")
    per_image = per_image * (labels @ weight if labels.dim() == 2 else weight[labels])
    return per_image.sum() if reduction == "sum" else per_image.mean()
