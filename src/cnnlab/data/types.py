"""The data's types: a set of images in memory, a named dataset with its splits, and the stratified split.

Only cnnlab.data.resize (a leaf) is imported here, so sources, folders and the pipeline can all build on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImageSet:
    """Images as uint8 (N, C, H, W) and labels, in memory or (`DiskImages`) in a decode cache file.

    Labels are class indices, int64 (N,), or for multi-label data a multi-hot uint8 (N, K) (1 where the label applies).

    Photo sources (image folders, CSVs) store canvases: `boxes` (N, 2) gives the (h, w) each image fills at its
    canvas's top-left, `size` the model's side and `resize` the policy that cuts the model's input from the canvas
    (data.resize). Built-in datasets hold the model's input itself (boxes None).
    """

    images: torch.Tensor  # or a DiskImages: indexing it reads the rows from the cache file
    labels: torch.Tensor
    boxes: torch.Tensor | None = None
    size: int | None = None
    resize: str = "crop"

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dim() not in (1, 2) or self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(f"{self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}")
        if self.boxes is not None and self.boxes.shape != (self.images.shape[0], 2):
            raise ValueError(f"{self.images.shape[0]} images but boxes of shape {tuple(self.boxes.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        # The dataclass default would print every pixel of the tensors.
        where = " on disk" if self.on_disk else ""
        return f"ImageSet({len(self):,} images of {self.channels}x{self.side}x{self.side}{where})"

    @property
    def channels(self) -> int:
        """Number of image channels C."""
        return self.images.shape[1]

    @property
    def multi_label(self) -> bool:
        """Whether each image has a set of labels (multi-hot (N, K)) rather than one class."""
        return self.labels.dim() == 2

    @property
    def side(self) -> int:
        """The side of the images the model sees."""
        return self.size if self.size is not None else self.images.shape[2]

    @property
    def on_disk(self) -> bool:
        """Whether the images stay in a cache file (read per batch) rather than in memory."""
        return not isinstance(self.images, torch.Tensor)

    def resident_bytes(self) -> int:
        """Bytes of image pixels held in memory (0 for a set read from disk)."""
        return 0 if self.on_disk else self.images.numel()

    def subset(self, index: torch.Tensor) -> ImageSet:
        """The images at `index` (a 1-D index tensor), in that order (still on disk for a set on disk)."""
        images = self.images.subset(index) if self.on_disk else self.images[index]  # type: ignore[attr-defined]
        boxes = self.boxes[index.to(self.boxes.device)] if self.boxes is not None else None
        return ImageSet(images, self.labels[index.to(self.labels.device)], boxes, self.size, self.resize)

    def stored(self, index: torch.Tensor) -> torch.Tensor:
        """The stored uint8 rows at `index` (canvases for photo sources), read from disk if they live there."""
        return self.images[index]

    def final(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """The model's uint8 input (B, C, side, side) at `index` (default: all), as evaluation sees it."""
        if index is None:
            index = torch.arange(len(self))
        rows = self.stored(index)
        if self.boxes is None:
            return rows
        from cnnlab.data.resize import fit

        return fit(rows, self.boxes[index.to(self.boxes.device)].to(rows.device), self.side, self.resize, train=False)


@dataclass
class Dataset:
    """A named dataset: its train and test splits, class names and sensible defaults for training on it."""

    name: str
    train: ImageSet
    test: ImageSet
    classes: tuple[str, ...]
    default_augment: tuple[str, ...] = ("crop",)
    augment_note: str = ""  # why default_augment suits this data (printed when a run uses it)
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
        return self.train.channels

    @property
    def image_size(self) -> int:
        """Side of the (square) images the model sees."""
        return self.train.side

    @property
    def multi_label(self) -> bool:
        """Whether each image has a set of labels (a CSV with `a;b` cells) rather than one class."""
        return self.train.multi_label


def strata(labels: torch.Tensor) -> torch.Tensor:
    """The class each image is stratified by, int64 (N,): its label, or for multi-hot labels (N, K) its rarest one.

    Stratifying multi-label images by their rarest label keeps rare labels in every split (a cheap stand-in for
    iterative stratification); an image without labels gets stratum K.
    """
    if labels.dim() == 1:
        return labels
    freq = labels.sum(0).double()  # (K,) images per label
    masked = torch.where(labels > 0, freq, torch.full_like(labels, float("inf"), dtype=torch.float64))
    return torch.where((labels > 0).any(1), masked.argmin(1), torch.full((len(labels),), labels.shape[1]))


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (rest, held_out) with `fraction` of every class held out, deterministically for `seed`.

    Multi-hot labels (N, K) are stratified by each image's rarest label (`strata`).
    """
    labels = strata(labels)
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
