"""Pictures: training curves, confusion matrices, image grids, filters, activation maps and Grad-CAM overlays."""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cnnlab.fileio import atomic_write_bytes


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Render a matplotlib Figure to PNG and write it atomically."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # File and class names in titles can be in any script; a glyph the fonts lack is drawn as a box, and saying
        # so on stderr after a successful command is noise.
        warnings.filterwarnings("ignore", message="Glyph .* missing from", category=UserWarning)
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def plot_curves(
    rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str = "", best_epoch: int | None = None
) -> Path:
    """Loss and accuracy per epoch, train vs validation, saved as a PNG (see curves_figure)."""
    return save_figure(curves_figure(rows, title, best_epoch), path)


def curves_figure(rows: Sequence[dict[str, Any]], title: str = "", best_epoch: int | None = None) -> Figure:
    """Loss and accuracy per epoch, train vs validation: the picture that shows over- and under-fitting."""
    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    multi = any("val_mAP" in r for r in rows)  # multi-label: acc is the share of images with every label right
    acc = "exact match" if multi else "accuracy"
    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "acc", f"{acc} (%)")):
        scale = 100.0 if key == "acc" else 1.0
        for split, style in (("train", "-o"), ("val", "-s")):
            ys = [_num(r.get(f"{split}_{key}")) * scale for r in rows]
            if any(not math.isnan(y) for y in ys):
                ax.plot(epochs, ys, style, markersize=3, label="validation" if split == "val" else "train")
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best epoch ({best_epoch})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_loss.set_title("loss")
    ax_acc.set_title(acc + (" (every label right at 1/2)" if multi else ""))
    if title:
        fig.suptitle(title)
    return fig


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def plot_confusion(
    cm: torch.Tensor, classes: Sequence[str], path: str | os.PathLike[str], normalize: bool = False, title: str = ""
) -> Path:
    """The confusion matrix as a heat map with class names on both axes and the count (or row %) in each cell."""
    k = len(classes)
    values = cm.double()
    if normalize:
        values = values / values.sum(1, keepdim=True).clamp_min(1)
    side = min(22.0, max(5.0, 0.45 * k + 2.5))
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.subplots()
    im = ax.imshow(values.numpy(), cmap="Blues", vmin=0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class" if normalize else "images")
    if k <= 40:  # beyond that the labels and numbers are unreadable; the colours still show the structure
        ax.set_xticks(range(k), [str(c) for c in classes], rotation=90 if k > 10 else 45, ha="center")
        ax.set_yticks(range(k), [str(c) for c in classes])
        top = float(values.max()) or 1.0
        for i in range(k):
            for j in range(k):
                v = float(values[i, j])
                if v:
                    text = f"{v:.0%}" if normalize else str(int(v))
                    ax.text(j, i, text, ha="center", va="center", fontsize=8 if k <= 15 else 6,
                            color="white" if v > 0.5 * top else "black")  # fmt: skip
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or ("confusion matrix (rows sum to 100%)" if normalize else "confusion matrix"))
    return save_figure(fig, path)


def plot_image_grid(
    images: torch.Tensor, captions: Sequence[str], path: str | os.PathLike[str], title: str = "", cols: int = 8
) -> Path:
    """uint8 images (N, C, H, W) in a grid, each with a caption (e.g. 'true 4 / predicted 9 (97%)')."""
    n = len(images)
    cols = max(1, min(cols, n))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(1.9 * cols, 2.1 * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = images[i]
        if img.shape[0] == 1:
            ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(img[:3].permute(1, 2, 0).numpy())
        ax.set_title(captions[i], fontsize=8)
    if n == 0:
        axes.flat[0].text(0.5, 0.5, "no images", ha="center", va="center")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_filters(weight: torch.Tensor, path: str | os.PathLike[str], title: str, max_filters: int = 64) -> Path:
    """Conv kernels (out, in, kh, kw) as a grid: RGB kernels in colour, others one grey tile per input channel."""
    w = weight.detach().float().cpu()[:max_filters]
    out_c, in_c = w.shape[:2]
    colour = in_c == 3
    cols_in = 1 if colour else min(in_c, 16)
    cols = min(8, out_c) if colour or in_c == 1 else cols_in
    rows = math.ceil(out_c / cols) if colour or in_c == 1 else out_c
    fig = Figure(figsize=(1.2 * cols + 0.5, 1.2 * rows + 0.8))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for f in range(out_c):
        k = w[f]
        if colour or in_c == 1:
            ax = axes.flat[f]
            # Each filter scaled to its own range (symmetric about 0): the pattern matters, not the magnitude.
            lim = float(k.abs().max()) or 1.0
            if colour:
                ax.imshow(((k / lim + 1) / 2).permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            else:
                ax.imshow(k[0].numpy(), cmap="gray", vmin=-lim, vmax=lim, interpolation="nearest")
            ax.set_title(str(f), fontsize=7)
        else:
            lim = float(k.abs().max()) or 1.0
            for c in range(cols_in):
                axes[f, c].imshow(k[c].numpy(), cmap="gray", vmin=-lim, vmax=lim, interpolation="nearest")
                if f == 0:
                    axes[f, c].set_title(f"in {c}", fontsize=7)
            axes[f, 0].text(-0.6, 0.5, str(f), transform=axes[f, 0].transAxes, fontsize=7, va="center")
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_activation_maps(
    maps: torch.Tensor, path: str | os.PathLike[str], title: str, image: torch.Tensor | None = None, max_maps: int = 64
) -> Path:
    """One layer's feature maps (C, H, W) as a grid of heat maps, the input image first when given."""
    n = min(maps.shape[0], max_maps)
    tiles = n + (1 if image is not None else 0)
    cols = min(8, tiles)
    rows = math.ceil(tiles / cols)
    fig = Figure(figsize=(1.5 * cols, 1.6 * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    start = 0
    if image is not None:
        _show_image(axes.flat[0], image)
        axes.flat[0].set_title("input", fontsize=8)
        start = 1
    for i in range(n):
        ax = axes.flat[start + i]
        ax.imshow(maps[i].numpy(), cmap="viridis", interpolation="nearest")
        ax.set_title(f"map {i}", fontsize=7)
    more = f" (first {n} of {maps.shape[0]})" if maps.shape[0] > n else ""
    fig.suptitle(title + more)
    return save_figure(fig, path)


def plot_gradcam(image: torch.Tensor, heatmap: torch.Tensor, path: str | os.PathLike[str], title: str) -> Path:
    """The image, the Grad-CAM heat map, and the two overlaid (jet colours at 45% opacity)."""
    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 3)
    _show_image(axes[0], image)
    axes[0].set_title("input")
    axes[1].imshow(heatmap.numpy(), cmap="jet", vmin=0, vmax=1)
    axes[1].set_title("Grad-CAM")
    _show_image(axes[2], image)
    axes[2].imshow(heatmap.numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
    axes[2].set_title("overlay")
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title)
    return save_figure(fig, path)


def _show_image(ax: Any, image: torch.Tensor) -> None:
    """uint8 (C, H, W) into an axis, grey or colour."""
    if image.shape[0] == 1:
        ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(image[:3].permute(1, 2, 0).numpy())
