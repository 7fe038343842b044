"""The data's types: a set of images in memory, a named dataset with its splits, and the stratified split.

Nothing else of cnnlab.data is imported here, so sources, folders and the pipeline can all build on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImageSet:
    """Images as uint8 (N, C, H, W) and labels as int64 (N,), held in memory."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        # The dataclass default would print every pixel of the tensors.
        c, h, w = self.images.shape[1:]
        return f"ImageSet({len(self):,} images of {c}x{h}x{w})"

    def subset(self, index: torch.Tensor) -> ImageSet:
        """The images at `index` (a 1-D index tensor), in that order."""
        return ImageSet(self.images[index], self.labels[index])


@dataclass
class Dataset:
    """A named dataset: its train and test splits, class names and sensible defaults for training on it."""

    name: str
    train: ImageSet
    test: ImageSet
    classes: tuple[str, ...]
    default_augment: tuple[str, ...] = ("crop",)
    description: str = ""
    extra: dict[str, object] = field(default_factory=dict)  # recorded in config.json: files used, skipped images
    val: ImageSet | None = None  # a validation split given by the source (an image folder's val/); else held out
    notes: list[str] = field(default_factory=list)  # lines for the user: where the data came from, what was skipped

    def __repr__(self) -> str:
        val = f" / {len(self.val):,} val" if self.val is not None else ""
        return (f"Dataset({self.name!r}: {len(self.train):,} train{val} / {len(self.test):,} test images of "
                f"{self.channels}x{self.image_size}x{self.image_size}, {len(self.classes)} classes)")  # fmt: skip

    @property
    def channels(self) -> int:
        """Number of image channels C."""
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:
        """Side of the (square) images."""
        return self.train.images.shape[2]


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (rest, held_out) with `fraction` of every class held out, deterministically for `seed`."""
    g = torch.Generator().manual_seed(seed)
    rest, held = [], []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = round(len(idx) * fraction)
        held.append(idx[:k])
        rest.append(idx[k:])
    # Shuffle the concatenations so that neither split is ordered by class.
    rest_t, held_t = torch.cat(rest), torch.cat(held)
    return rest_t[torch.randperm(len(rest_t), generator=g)], held_t[torch.randperm(len(held_t), generator=g)]
