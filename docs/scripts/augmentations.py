"""Draw docs/images/augmentations.jpg: each augmentation (and resize policy) on the same eight photos.

    python docs/scripts/augmentations.py

Rows use resize=squash unless they show a policy, so that each row shows one operation alone. The photos are the
two that ship with matplotlib (Grace Hopper's portrait, public domain; a present), alternating.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import torch
from matplotlib.figure import Figure

from cnnlab.data import BatchLoader, ImageSet, Normalization
from cnnlab.data.folders import to_canvas
from cnnlab.data.images import open_image
from cnnlab.data.pipeline import batch_mixer
from cnnlab.data.resize import canvas_side

SIZE, N = 96, 8
OUT = Path(__file__).resolve().parents[1] / "images" / "augmentations.jpg"


def photos(resize: str) -> ImageSet:
    """Eight canvases (two photos, alternating) with their boxes, under `resize`."""
    sample = Path(matplotlib.get_data_path()) / "sample_data"
    rows, boxes = [], []
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"):
        canvas, h, w = to_canvas(open_image(sample / name), canvas_side(SIZE), 3)
        rows.append(torch.from_numpy(canvas).permute(2, 0, 1))
        boxes.append([h, w])
    idx = torch.arange(N) % 2
    return ImageSet(torch.stack(rows)[idx].contiguous(), idx, torch.tensor(boxes)[idx], SIZE, resize)


def main() -> None:
    """Draw the figure."""
    norm = Normalization((0.0,) * 3, (1.0,) * 3)
    rows = [("evaluation (resize=crop)", "crop", (), False, None), ("resize=crop, training", "crop", (), True, None),
            ("resize=pad", "pad", (), False, None), ("resize=squash", "squash", (), False, None)]  # fmt: skip
    rows += [(f"--augment {op}", "squash", (op,), True, None) for op in
             ("flip", "crop", "rotate", "erase", "jitter", "trivial")]  # fmt: skip
    rows += [("--mixup 0.4", "squash", (), True, (0.4, 0.0)), ("--cutmix 1.0", "squash", (), True, (0.0, 1.0))]
    fig = Figure(figsize=(1.25 * N + 1.8, 1.3 * len(rows)))
    axes = fig.subplots(len(rows), N, squeeze=False)
    for r, (label, resize, ops, train, mix) in enumerate(rows):
        g = torch.Generator().manual_seed(r)
        x, y = next(iter(BatchLoader(photos(resize), N, norm, shuffle=train, augment=ops, generator=g)))
        if mix is not None:
            x, _ = batch_mixer(*mix, 2)(x, y, g)  # type: ignore[misc]
        for c in range(N):
            ax = axes[r, c]
            ax.imshow(x[c].clamp(0, 1).permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    fig.subplots_adjust(left=0.17, right=0.99, top=0.99, bottom=0.01, wspace=0.05, hspace=0.08)
    fig.savefig(OUT, dpi=72, pil_kwargs={"quality": 85})
    print(OUT)


if __name__ == "__main__":
    main()
