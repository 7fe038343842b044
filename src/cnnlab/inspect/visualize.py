"""Pictures: training curves (more to come: filters, activation maps, Grad-CAM, confusion matrices)."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from cnnlab.fileio import atomic_write_bytes


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Render a matplotlib Figure to PNG and write it atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def plot_curves(
    rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str = "", best_epoch: int | None = None
) -> Path:
    """Loss and accuracy per epoch, train vs validation: the picture that shows over- and under-fitting."""
    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "accuracy (%)")):
        scale = 100.0 if key == "acc" else 1.0
        for split, style in (("train", "-o"), ("val", "-s")):
            ys = [_num(r.get(f"{split}_{key}")) * scale for r in rows]
            if any(not math.isnan(y) for y in ys):
                ax.plot(epochs, ys, style, markersize=3, label="validation" if split == "val" else "train")
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best epoch ({best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_loss.set_title("loss")
    ax_acc.set_title("accuracy")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")
