"""Image folders: one sub-folder per class (like torchvision's ImageFolder), decoded once into uint8 tensors.

Layouts: `root/<class>/*` (a fixed, stratified 20% becomes the test split), or `root/train/<class>/*` with
`root/test/` and/or `root/val/` beside it. Every image is decoded in parallel threads (Pillow releases the GIL),
oriented by EXIF, resized so its shorter side is `image_size`, centre-cropped to a square, and cached in the
per-user cache keyed by the files' names, sizes and modification times, so later runs skip decoding.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save

from cnnlab.data.cache import CACHE_VERSION, remove_superseded
from cnnlab.data.images import open_image
from cnnlab.data.locate import cache_root
from cnnlab.data.types import Dataset, ImageSet, stratified_split
from cnnlab.errors import CnnlabError, OptionError, UsageError
from cnnlab.fileio import atomic_write_bytes
from cnnlab.memory import check_fits

DEFAULT_FOLDER_SIZE = 64  # square side when --image-size is not given (224 is used with pretrained weights)
FOLDER_TEST_FRACTION = 0.2  # flat layout: held-out test images per class
FOLDER_SPLIT_SEED = 0  # fixed, so the test split never changes between runs
SPLIT_NAMES = ("train", "val", "test")
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass(frozen=True)
class BadImage:
    """A file that could not be used, and why."""

    path: str
    reason: str


def decode(path: Path, size: int, channels: int | None = None) -> tuple[np.ndarray, bool]:
    """One image file -> (uint8 (H=size, W=size, C) pixels, whether it is grayscale); errors name the file.

    `channels` forces 1 (grayscale) or 3 (RGB); by default the file's own mode decides.
    """
    img = open_image(path, draft=(size, size))
    try:
        return fit_image(img, size, channels)
    except CnnlabError as e:
        raise type(e)(f"{path}: {e}") from None


def fit_image(img: Image.Image, size: int, channels: int | None = None) -> tuple[np.ndarray, bool]:
    """A decoded image -> (uint8 (size, size, C) pixels, grayscale?): 8-bit, shorter side resized, centre square."""
    gray = img.mode in GRAY_MODES if channels is None else channels == 1
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit (or float) grayscale: scale its range to 8 bits rather than clipping everything above 255.
        arr = np.asarray(img, dtype=np.float32)
        if not np.isfinite(arr).all():  # a float TIFF can hold NaN/inf: no 8-bit image to make of it
            raise UsageError("floating-point image with NaN or infinite pixel values")
        top = 65535.0 if img.mode != "F" else max(1.0, float(arr.max()))
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8))
    elif img.mode == "P":
        img = img.convert("RGBA")  # a palette may carry transparency; go through RGBA, as Pillow advises
    img = img.convert("L" if gray else "RGB")  # alpha dropped, like torchvision's default loader
    # Shorter side -> size, then the centre square: the training-time version of torchvision's Resize+CenterCrop.
    scale = size / min(img.size)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=3.0)
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on Pillow's read-only buffer
    return (arr[:, :, None] if arr.ndim == 2 else arr), gray


def class_folders(root: Path) -> list[Path]:
    """Sub-folders of `root` that are classes (hidden ones such as .git are not)."""
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def list_images(class_dir: Path) -> list[Path]:
    """Every non-hidden file below a class folder (nested folders included), sorted; Pillow decides what is an image."""
    files = [p for p in class_dir.rglob("*") if p.is_file()]
    return sorted(p for p in files if not any(part.startswith(".") for part in p.relative_to(class_dir).parts))


def scan(root: Path) -> tuple[dict[str, list[tuple[Path, int]]], tuple[str, ...], list[str]]:
    """The folder's splits as {split: [(file, class index)]}, the class names, and notes on what was ignored."""
    if not root.exists():
        raise OptionError("data", f"{root}: no such folder (and not a registered dataset name)")
    if not root.is_dir():
        raise OptionError("data", f"{root}: not a folder; an image folder holds one sub-folder per class")
    split_dirs = {s: root / s for s in SPLIT_NAMES if (root / s).is_dir()}
    notes = []
    if "train" in split_dirs:
        extra = [p.name for p in class_folders(root) if p.name not in SPLIT_NAMES]
        if extra:
            notes.append(f"ignored folders beside train/: {', '.join(extra)}")
    else:
        if split_dirs:
            raise UsageError(f"{root}: has {'/'.join(split_dirs)}/ but no train/ folder")
        split_dirs = {"train": root}
    classes = tuple(p.name for p in class_folders(split_dirs["train"]))
    if len(classes) < 2:
        found = f"only the class {classes[0]!r}" if classes else "no class sub-folders"
        raise UsageError(f"{split_dirs['train']}: {found}; an image folder needs one sub-folder per class, at least 2")
    loose = [p.name for p in split_dirs["train"].iterdir() if p.is_file() and not p.name.startswith(".")]
    if loose:
        notes.append(f"ignored {len(loose)} file(s) outside class folders in {split_dirs['train']}: "
                     f"{', '.join(sorted(loose)[:3])}{' ...' if len(loose) > 3 else ''}")  # fmt: skip
    splits = {}
    for split, d in split_dirs.items():
        names = [p.name for p in class_folders(d)]
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise UsageError(f"{d}: class folder(s) {', '.join(unknown)} not in {split_dirs['train']}")
        items = []
        for c, name in enumerate(classes):
            files = list_images(d / name) if (d / name).is_dir() else []
            if not files and split == "train":
                raise UsageError(f"{d / name}: empty class folder (no image files)")
            items += [(f, c) for f in files]
        if not items:
            raise UsageError(f"{d}: no image files")
        splits[split] = items
    return splits, classes, notes


def cache_key(root: Path, splits: dict[str, list[tuple[Path, int]]], size: int) -> str:
    """A digest of everything the decoded tensors depend on: file names, sizes, mtimes, labels, the size."""
    h = hashlib.sha256(f"{CACHE_VERSION}|{root.resolve()}|{size}".encode())
    for split, items in splits.items():
        for path, label in items:
            st = path.stat()
            h.update(f"|{split}|{os.path.relpath(path, root)}|{label}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def _decode_all(items: list[tuple[Path, int]], size: int) -> tuple[list, list[BadImage]]:
    """Decode files in parallel threads; returns [(pixels, gray, label) or None] in order, and the bad files."""

    def one(item: tuple[Path, int]) -> tuple[np.ndarray, bool, int] | BadImage:
        path, label = item
        try:
            arr, gray = decode(path, size)
        except CnnlabError as e:
            return BadImage(str(path), str(e).removeprefix(f"{path}: "))
        return arr, gray, label

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(one, items, chunksize=64))
    bad = [r for r in results if isinstance(r, BadImage)]
    return [r if not isinstance(r, BadImage) else None for r in results], bad


def _decode_folder(root: Path, splits: dict, size: int) -> tuple[dict[str, ImageSet], list[BadImage], int]:
    """Decode every split; all splits share one channel count (1 if every image is grayscale, else 3)."""
    decoded, bad = {}, []
    for split, items in splits.items():
        decoded[split], b = _decode_all(items, size)
        bad += b
    good = [r for rs in decoded.values() for r in rs if r is not None]
    channels = 1 if good and all(g for _, g, _ in good) else 3
    sets = {}
    for split, rs in decoded.items():
        kept = [r for r in rs if r is not None]
        pixels = [a if a.shape[2] == channels else np.repeat(a, 3, axis=2) for a, _, _ in kept]  # gray -> RGB
        images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous() if pixels else None
        if images is None:
            images = torch.empty((0, channels, size, size), dtype=torch.uint8)
        sets[split] = ImageSet(images, torch.tensor([lab for _, _, lab in kept], dtype=torch.int64))
    return sets, bad, channels


def _read_cache(path: Path) -> tuple[dict[str, ImageSet], list[BadImage]] | None:
    try:
        with safe_open(str(path), framework="pt") as f:  # one open: the tensors and the header's metadata
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
            bad = [BadImage(**b) for b in json.loads(f.metadata()["bad"])]
        sets = {
            s: ImageSet(tensors[f"{s}_images"], tensors[f"{s}_labels"]) for s in SPLIT_NAMES if f"{s}_images" in tensors
        }
    except Exception:  # a damaged or foreign cache file is simply decoded again (and rewritten)
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # "last used", as `cnnlab cache` lists it
    return sets, bad


def _write_cache(path: Path, sets: dict[str, ImageSet], bad: list[BadImage], source: str, size: int) -> str | None:
    """Write the decoded splits; then delete this source's older versions at this size (they can never be read)."""
    tensors = {}
    for s, data in sets.items():
        tensors[f"{s}_images"], tensors[f"{s}_labels"] = data.images.contiguous(), data.labels.contiguous()
    meta = {"bad": json.dumps([b.__dict__ for b in bad]), "source": source, "size": str(size),
            "version": str(CACHE_VERSION), "images": str(sum(len(v) for v in sets.values()))}  # fmt: skip
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, save(tensors, metadata=meta))
    except OSError as e:
        return f"could not write the decode cache {path} ({e.strerror or e}); the next run decodes again"
    try:
        removed = remove_superseded(path)
    except OSError as e:  # an old cache we may not delete (another user's, read-only): left where it is
        return f"could not delete an outdated decode cache ({e.strerror or e})"
    return f"removed {removed} outdated decode cache file(s) of this data" if removed else None


def load_image_folder(
    path: str | os.PathLike[str], image_size: int | None = None, on_bad_image: str = "error", cache: bool = True
) -> Dataset:
    """Load an image folder as a Dataset of uint8 tensors, decoding once and caching the result."""
    root = Path(path).expanduser()
    splits, classes, notes = scan(root)
    size = image_size or DEFAULT_FOLDER_SIZE
    name = root.resolve().name or "folder"
    return load_listed(
        root, splits, classes, size, on_bad_image, cache, name=name, description=f"image folder {root.resolve()}",
        extra={"folder": str(root.resolve())},
        notes=[f"data: image folder {root.resolve()}: {len(classes)} classes, {size}x{size}", *notes],
    )  # fmt: skip


def load_listed(
    root: Path, splits: dict[str, list[tuple[Path, int]]], classes: tuple[str, ...], size: int, on_bad_image: str,
    cache: bool, *, name: str, description: str, extra: dict, notes: list[str],
) -> Dataset:  # fmt: skip
    """Decode listed files {split: [(file, class index)]} (cached under a key of root and files) into a Dataset."""
    key = cache_key(root, splits, size)
    cache_file = cache_root() / "folders" / f"{key}.safetensors"
    cached = _read_cache(cache_file) if cache and cache_file.is_file() else None
    if cached is not None:
        sets, bad = cached
        notes.append(f"decoded images read from the cache {cache_file}")
    else:
        n = sum(len(items) for items in splits.values())
        # Decoding holds each image, the stacked split, its (N, C, H, W) copy and the splits cut from it: measured
        # 4.1x the decoded size (40 images at 4096 px: 6.6 GB resident for 1.6 GB of pixels).
        check_fits(
            f"decoding {n:,} images at {size}x{size}", 5 * n * 3 * size * size,
            hint="lower {image_size}" if size > DEFAULT_FOLDER_SIZE else "",
        )  # fmt: skip
        sets, bad, _ = _decode_folder(root, splits, size)
        if cache:
            problem = _write_cache(cache_file, sets, bad, description, size)
            notes += [problem] if problem else []
    if bad and on_bad_image == "error":
        more = f" ({len(bad) - 1} more bad file(s))" if len(bad) > 1 else ""
        raise CnnlabError(f"{bad[0].path}: {bad[0].reason}{more}; {{on_bad_image=skip}} leaves bad files out",
                          options=True)  # fmt: skip
    if bad:
        listed = "; ".join(f"{b.path}: {b.reason}" for b in bad[:5])
        notes.append(f"skipped {len(bad)} bad image(s) (on_bad_image=skip): {listed}{' ...' if len(bad) > 5 else ''}")
    for s, data in sets.items():
        counts = torch.bincount(data.labels, minlength=len(classes))
        if s == "train" and bool((counts == 0).any()):
            empty = [classes[i] for i in (counts == 0).nonzero().flatten().tolist()]
            raise CnnlabError(f"{description}: class(es) {', '.join(empty)} have no usable images after skipping "
                              "bad files")  # fmt: skip
    train = sets["train"]
    if "test" in sets:
        test = sets["test"]
    elif "val" in sets:
        test = sets.pop("val")  # only train/ + val/: val/ is the held-out test set, validation comes from train/
        notes.append("val/ is used as the test split (no test/ folder); validation is held out from train/")
    else:
        rest, held = stratified_split(train.labels, FOLDER_TEST_FRACTION, FOLDER_SPLIT_SEED)
        train, test = train.subset(rest), train.subset(held)
        notes.append(f"no test split given: a fixed {FOLDER_TEST_FRACTION:.0%} of each class is the test split")
    return Dataset(
        name=name, train=train, test=test, classes=classes, default_augment=("crop", "flip"),
        description=description, val=sets.get("val"), extra={**extra, "skipped": [b.__dict__ for b in bad]},
        notes=notes,
    )  # fmt: skip
