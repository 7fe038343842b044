"""Classification metrics computed on tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1,)) -> list[torch.Tensor]:
    """Number of samples whose label is among the top-k logits, for each k: (B, K), (B,) -> [scalar tensors]."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # (B, kmax)
    hit = top == labels[:, None]  # (B, kmax)
    return [hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy as a fraction in [0, 1]."""
    return topk_correct(logits, labels, (1,))[0].item() / max(1, labels.numel())


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts: row = true class, column = predicted class."""
    idx = labels.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_report(cm: torch.Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """Precision, recall, F1 and support per class, with macro and support-weighted averages, from a confusion matrix.

    A class never predicted has precision 0 (as scikit-learn's zero_division=0); one with no samples has recall 0.
    """
    cm = cm.double()
    tp = cm.diag()
    support = cm.sum(1)  # true samples per class
    predicted = cm.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp_min(1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp_min(1e-12), torch.zeros_like(tp))
    rows = [
        {"class": c, "precision": p, "recall": r, "f1": f, "support": int(s)}
        for c, p, r, f, s in zip(
            classes, precision.tolist(), recall.tolist(), f1.tolist(), support.tolist(), strict=True
        )
    ]
    total = support.sum().item()
    weights = support / max(total, 1)

    def avg(w: torch.Tensor) -> dict[str, float]:
        return {"precision": float((precision * w).sum()), "recall": float((recall * w).sum()),
                "f1": float((f1 * w).sum()), "support": int(total)}  # fmt: skip

    k = len(classes)
    return {"per_class": rows, "macro": avg(torch.full_like(tp, 1.0 / k)), "weighted": avg(weights)}


def balanced_accuracy(cm: torch.Tensor) -> float:
    """Mean recall over the classes that have true samples, from a (K, K) confusion matrix (as scikit-learn's)."""
    support = cm.sum(1).double()
    present = support > 0
    return float((cm.diag().double()[present] / support[present]).mean()) if bool(present.any()) else float("nan")


def macro_f1(cm: torch.Tensor) -> float:
    """Unweighted mean F1 over the classes that occur as true or predicted labels (as scikit-learn's 'macro')."""
    cm = cm.double()
    tp, support, predicted = cm.diag(), cm.sum(1), cm.sum(0)
    seen = (support > 0) | (predicted > 0)
    f1 = torch.where(support + predicted > 0, 2 * tp / (support + predicted).clamp_min(1), torch.zeros_like(tp))
    return float(f1[seen].mean()) if bool(seen.any()) else float("nan")


def most_confused(cm: torch.Tensor, classes: Sequence[str], n: int = 5) -> list[dict[str, Any]]:
    """The n largest off-diagonal cells: (true class, predicted class, count), largest first."""
    off = cm.clone()
    off.fill_diagonal_(0)
    flat = off.flatten()
    order = torch.argsort(flat, descending=True, stable=True)[:n]
    k = cm.shape[0]
    return [
        {"true": classes[i // k], "predicted": classes[i % k], "count": int(flat[i])}
        for i in order.tolist()
        if flat[i] > 0
    ]
