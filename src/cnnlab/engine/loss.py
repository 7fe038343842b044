"""The training loss: cross-entropy with label smoothing, optionally weighted per class."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0, weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:  # fmt: skip
    """Cross-entropy of logits (B, K) against labels (B,); with `weight` (K,), each image's loss times its class's.

    Labels may also be probabilities (B, K) (MixUp, CutMix): an image's weight is then the mix of its classes'.
    Weighted, the mean is over images (not over the weights, as F.cross_entropy's is): a batch split into accumulated
    parts then sums to the same loss, and each image's whole smoothed loss is scaled by one number.
    """
    if weight is None:
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction=reduction)
    per_image = F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="none")
    per_image = per_image * (labels @ weight if labels.dim() == 2 else weight[labels])
    return per_image.sum() if reduction == "sum" else per_image.mean()
