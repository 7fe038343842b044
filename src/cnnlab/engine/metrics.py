"""Classification metrics computed on tensors."""

from __future__ import annotations

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
