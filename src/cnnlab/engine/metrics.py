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


# --- multi-label: each image has a set of labels, each label a yes/no decision ------------------------------------


def exact_match(logits: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor | None = None) -> torch.Tensor:
    """Images whose every label is decided right: logits (B, K), multi-hot (B, K); a label is predicted at probability
    1/2 (logit 0), or at its own `thresholds` (K,) probability."""
    pred = logits > 0 if thresholds is None else logits.sigmoid() >= thresholds.to(logits.device)[None, :]
    return (pred == (labels > 0)).all(dim=1).sum()


def _ranked(scores: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """True and false positives when everything scoring >= each distinct score is called positive, highest first.

    scores (N,), truth (N,) -> (distinct scores (D,), true positives (D,), false positives (D,)), float64.
    """
    order = torch.argsort(scores.double(), descending=True, stable=True)
    s, t = scores.double()[order], truth.double()[order]
    tps, fps = t.cumsum(0), (1 - t).cumsum(0)
    # The last index of each run of equal scores: tied images are called positive together.
    last = torch.cat([(s[1:] != s[:-1]).nonzero().flatten(), torch.tensor([len(s) - 1])])
    return s[last], tps[last], fps[last]


def average_precision(scores: torch.Tensor, truth: torch.Tensor) -> float:
    """Average precision of one label: sum over thresholds of (recall gain) x precision, as scikit-learn computes it.

    scores (N,) any real numbers, truth (N,) 0/1. NaN when no image has the label (recall is undefined).
    """
    if len(scores) == 0 or not bool((truth > 0).any()):
        return float("nan")
    _, tps, fps = _ranked(scores, truth > 0)
    precision, recall = tps / (tps + fps), tps / tps[-1]
    gain = torch.diff(recall, prepend=torch.zeros(1, dtype=recall.dtype))
    return float((gain * precision).sum())


def mean_average_precision(scores: torch.Tensor, truth: torch.Tensor) -> tuple[float, list[float]]:
    """(mAP, AP per label): the mean over the labels that occur in `truth`; scores and truth (N, K)."""
    ap = [average_precision(scores[:, k], truth[:, k]) for k in range(scores.shape[1])]
    present = [a for a in ap if a == a]
    return (sum(present) / len(present) if present else float("nan")), ap


def best_thresholds(probs: torch.Tensor, truth: torch.Tensor, default: float = 0.5) -> torch.Tensor:
    """Per label, the probability threshold with the best F1 on these images: probs, truth (N, K) -> (K,) float.

    The threshold sits halfway between the lowest score called positive and the next one below it, so that a
    new image scoring near the boundary is judged as the chosen split would judge it. A label no image has keeps
    `default`.
    """
    out = torch.full((probs.shape[1],), default, dtype=torch.float64)
    for k in range(probs.shape[1]):
        positives = int((truth[:, k] > 0).sum())
        if positives == 0:
            continue
        s, tps, fps = _ranked(probs[:, k], truth[:, k] > 0)
        f1 = 2 * tps / (tps + fps + positives)
        best = int(torch.argmax(f1))  # the first maximum: the highest threshold among equally good ones
        below = float(s[best + 1]) if best + 1 < len(s) else 0.0
        out[k] = min(max((float(s[best]) + below) / 2, 1e-6), 1 - 1e-6)
    return out.float()


def multilabel_report(probs: torch.Tensor, truth: torch.Tensor, thresholds: torch.Tensor,
                      classes: Sequence[str]) -> dict[str, Any]:  # fmt: skip
    """AP, threshold, precision, recall, F1 and support per label, with macro and micro averages.

    probs and truth (N, K); a label is predicted where its probability reaches its threshold. Precision is 0 for a
    label never predicted, recall 0 for one no image has (scikit-learn's zero_division=0).
    """
    truth = truth > 0
    pred = probs >= thresholds[None, :].to(probs.dtype)
    tp = (pred & truth).sum(0).double()
    fp = (pred & ~truth).sum(0).double()
    fn = (~pred & truth).sum(0).double()
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp_min(1), torch.zeros_like(tp))
    f1 = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp_min(1), torch.zeros_like(tp))
    m_ap, ap = mean_average_precision(probs, truth)
    rows = [
        {"class": c, "ap": a, "threshold": float(t), "precision": p, "recall": r, "f1": f, "support": int(s)}
        for c, a, t, p, r, f, s in zip(classes, ap, thresholds.tolist(), precision.tolist(), recall.tolist(),
                                       f1.tolist(), (tp + fn).tolist(), strict=True)
    ]  # fmt: skip
    support = int((tp + fn).sum())
    micro_tp, micro_fp, micro_fn = float(tp.sum()), float(fp.sum()), float(fn.sum())
    micro_p = micro_tp / (micro_tp + micro_fp) if micro_tp + micro_fp else 0.0
    micro_r = micro_tp / (micro_tp + micro_fn) if micro_tp + micro_fn else 0.0
    micro_f1 = 2 * micro_tp / (2 * micro_tp + micro_fp + micro_fn) if micro_tp + micro_fp + micro_fn else 0.0
    return {
        "mAP": m_ap, "per_class": rows,
        "macro": {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean()),
                  "support": support},
        "micro": {"precision": micro_p, "recall": micro_r, "f1": micro_f1, "support": support},
        "exact_match": float((pred == truth).all(1).double().mean()) if len(truth) else float("nan"),
    }  # fmt: skip
