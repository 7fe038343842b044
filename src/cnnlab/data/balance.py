"""Imbalanced classes: the note on load, inverse-frequency loss weights, and the class-balanced epoch order."""

from __future__ import annotations

from collections.abc import Sequence

import torch

IMBALANCE_RATIO = 3.0  # the note appears when the largest class has more than this many times the smallest's images
MULTI_LABEL_SAMPLER = (
    "balanced draws a class, then one of its images; multi-label images have several labels: use "
    "{class_weights=auto} (each label's positives weighted by its negatives / positives) instead"
)
LISTED_CLASSES = 8  # classes named in the note (largest and smallest first), the rest counted


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Images per class: int64 (num_classes,) from int64 labels (N,), or from multi-hot labels (N, K) per label."""
    if labels.dim() == 2:
        return labels.cpu().sum(0, dtype=torch.int64)
    return torch.bincount(labels.cpu(), minlength=num_classes)


def imbalance_note(labels: torch.Tensor, classes: Sequence[str]) -> str | None:
    """A line on the training classes when one has no images, or the largest has over 3x the smallest's; else None."""
    counts = class_counts(labels, len(classes))
    empty = [name for name, n in zip(classes, counts.tolist(), strict=True) if n == 0]
    present = counts[counts > 0]
    lines = []
    if len(present) >= 2 and present.max() > IMBALANCE_RATIO * present.min():
        ranked = sorted(((name, n) for name, n in zip(classes, counts.tolist(), strict=True) if n), key=lambda t: -t[1])
        parts = [f"{name} {n:,}" for name, n in ranked]
        if len(parts) > LISTED_CLASSES:  # the largest and the two smallest, which are what the ratio is about
            hidden = len(parts) - LISTED_CLASSES
            parts = [*parts[: LISTED_CLASSES - 2], f"({hidden} more)", *parts[-2:]]
        ratio = int(present.max()) / int(present.min())
        lines.append(f"imbalanced classes (training images per class: {', '.join(parts)}; the largest is "
                     f"{ratio:.1f}x the smallest)")  # fmt: skip
    if empty:
        shown = ", ".join(empty[:LISTED_CLASSES]) + (f" and {len(empty) - LISTED_CLASSES} more"
                                                     if len(empty) > LISTED_CLASSES else "")  # fmt: skip
        lines.append(f"no training images for class(es) {shown}: the model cannot learn to predict them")
    return "; ".join(lines) or None


def inverse_frequency(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Loss weights (num_classes,) float32: N / (K x count) for the K classes present, 0 for absent ones.

    The mean weight over the training images is then exactly 1, so the loss keeps its usual scale (and learning
    rate); every class contributes the same total weight. This is scikit-learn's class_weight='balanced'.
    """
    counts = class_counts(labels, num_classes).double()
    present = counts > 0
    weights = torch.zeros(num_classes, dtype=torch.float64)
    weights[present] = counts.sum() / (int(present.sum()) * counts[present])
    return weights.float()


def positive_weights(labels: torch.Tensor) -> torch.Tensor:
    """Multi-label loss weights (K,) float32: each label's negatives / positives (1 for a label never seen).

    Given to binary cross-entropy as `pos_weight`, a label's positive images then weigh as much in total as its
    negative ones: the multi-label counterpart of inverse-frequency class weights.
    """
    positives = labels.cpu().sum(0, dtype=torch.float64)
    negatives = len(labels) - positives
    return torch.where(positives > 0, negatives / positives.clamp_min(1), torch.ones_like(positives)).float()


def balanced_order(labels: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """`n` sample indices (N,) where each draw picks a class uniformly (among those present), then one of its images.

    Draws are with replacement, so a rare class's images repeat within an epoch and a large class's are sampled.
    Everything runs on `labels`' device with `generator`; the same generator state gives the same order everywhere
    (data-parallel processes draw the same order and each takes its own share of every batch).
    """
    device = labels.device
    by_class = torch.argsort(labels, stable=True)  # indices grouped by class, in label order
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1 if len(labels) else 1)
    starts = torch.cumsum(counts, 0) - counts
    present = (counts > 0).nonzero().flatten()
    cls = present[torch.randint(len(present), (n,), generator=generator, device=device)]
    offset = (torch.rand(n, generator=generator, device=device) * counts[cls]).long().clamp_max(counts[cls] - 1)
    return by_class[starts[cls] + offset]
