"""Image folders: one sub-folder per class (like torchvision's ImageFolder), decoded once into a cache file.

Layouts: `root/<class>/*` (a fixed, stratified 20% becomes the test split), or `root/train/<class>/*` with
`root/test/` and/or `root/val/` beside it. Every image is decoded by every core (threads: Pillow releases the GIL),
oriented by EXIF, and stored whole, aspect kept, on a canvas 4/3 of the training side (data.resize cuts the model's
input from it per batch). The decode cache (data.store) lives in the per-user cache, keyed by the files' names,
sizes and modification times, so later runs skip decoding; its images are kept in memory when they fit comfortably,
and read from the file per batch otherwise (`data_cache`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from cnnlab.data.balance import class_counts
from cnnlab.data.cache import CACHE_VERSION, decode_dir, human_bytes, remove_superseded
from cnnlab.data.images import eight_bit, enable_heif, is_heif, open_image
from cnnlab.data.resize import RESIZE_POLICIES, canvas_side, fit
from cnnlab.data.store import (
    HEADER_MAX,
    DecodeProgress,
    DiskImages,
    OpenFile,
    SplitLayout,
    data_start,
    decode_chunks,
    decoding_bytes,
    header,
    header_bytes,
    image_channels,
    layout,
    pwrite_all,
    to_canvas,
)
from cnnlab.data.types import Dataset, ImageSet, stratified_split
from cnnlab.errors import CnnlabError, OptionError, UsageError
from cnnlab.memory import available_bytes, check_fits, gib

DEFAULT_FOLDER_SIZE = 64  # square side when --image-size is not given (224 is used with pretrained weights)
FOLDER_TEST_FRACTION = 0.2  # flat layout: held-out test images per class
FOLDER_SPLIT_SEED = 0  # fixed, so the test split never changes between runs
SPLIT_NAMES = ("train", "val", "test")
DATA_CACHE_MODES = ("auto", "memory", "disk", "none")
AUTO_MEMORY_FRACTION = 0.25  # auto: decoded images up to this share of the free memory stay in memory


@dataclass(frozen=True)
class BadImage:
    """A file that could not be used, and why."""

    path: str
    reason: str


def model_input(img: Image.Image, size: int, channels: int, resize: str | None) -> torch.Tensor:
    """One decoded image -> the model's uint8 (C, size, size), as evaluation saw training's images.

    Photos of a run with a `resize` policy go through the canvas and the policy's evaluation cut, exactly as the
    decode cache and data.resize do; runs without one (built-in datasets, and folder runs recorded before the
    policies existed) take the shorter side and its centre square (`fit_image`).
    """
    if resize is None:
        return torch.from_numpy(fit_image(img, size, channels)).permute(2, 0, 1).contiguous()
    canvas, h, w = to_canvas(img, canvas_side(size), channels)
    rows = torch.from_numpy(canvas).permute(2, 0, 1)[None].contiguous()  # (1, C, S, S)
    return fit(rows, torch.tensor([[h, w]]), size, resize, train=False)[0]


def file_input(path: Path, size: int, channels: int, resize: str | None) -> torch.Tensor:
    """An image file -> the model's uint8 (C, size, size), decoded exactly as the decode cache decoded it.

    JPEG's draft (a reduced-scale decode) is the cache's (the canvas side), or, for runs without a policy, the old
    centre-square decoding's: another scale gives other pixels.
    """
    side = canvas_side(size) if resize is not None else size
    img = open_image(path, draft=(side, side))
    try:
        return model_input(img, size, channels, resize)
    except CnnlabError as e:
        raise type(e)(f"{path}: {e}") from None


def fit_image(img: Image.Image, size: int, channels: int) -> np.ndarray:
    """A decoded image -> uint8 (size, size, C) pixels: 8-bit (`eight_bit`), shorter side resized, centre square."""
    img = eight_bit(img, gray=channels == 1)
    # Shorter side -> size, then the centre square: the training-time version of torchvision's Resize+CenterCrop.
    scale = size / min(img.size)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=3.0)
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on Pillow's read-only buffer
    return arr[:, :, None] if arr.ndim == 2 else arr


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
    h = hashlib.sha256(f"{CACHE_VERSION}|{root.resolve()}|{size}|{canvas_side(size)}".encode())
    for split, items in splits.items():
        for path, label in items:
            st = path.stat()
            h.update(f"|{split}|{os.path.relpath(path, root)}|{label}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def _mode(path: Path) -> str | None:
    """An image file's mode from its header (no pixels decoded); None if it cannot be opened."""
    try:
        if is_heif(path):
            enable_heif(path)
        with Image.open(path) as img:
            return img.mode
    except Exception:  # unreadable files are named by the decoding pass, with the reason
        return None


@dataclass
class Decoding:
    """The decoded splits as stored tensors: canvases (in memory or a file), labels, boxes, which images decoded."""

    images: dict[str, torch.Tensor | DiskImages]
    labels: dict[str, torch.Tensor]
    boxes: dict[str, torch.Tensor]
    ok: dict[str, torch.Tensor]
    bad: list[BadImage]
    channels: int


def _decode(
    splits: dict[str, list[tuple[Path, int]]], side: int, channels: int, fd: int | None,
    where: dict[str, SplitLayout] | None, start: int = 0,
) -> tuple[dict, dict, dict, list[BadImage]]:  # fmt: skip
    """Decode every split's files onto canvases: into the cache file's rows (fd) or into tensors in memory."""
    progress = DecodeProgress(sum(len(v) for v in splits.values()), f"decoding at {side}x{side}")
    images, boxes, ok, bad = {}, {}, {}, []
    try:
        for s, items in splits.items():
            files = [p for p, _ in items]
            box, good = np.zeros((len(files), 2), np.int16), np.zeros(len(files), np.uint8)
            mem = None if fd is not None else torch.zeros((len(files), side, side, channels), dtype=torch.uint8)
            # The draft (reduced-scale JPEG decode) at the canvas side, as `file_input` decodes a file to predict.
            for chunk in decode_chunks(files, side, channels, lambda p: open_image(p, draft=(side, side)), progress):
                end = chunk.start + len(chunk.errors)
                if fd is not None and where is not None:
                    row = channels * side * side
                    pwrite_all(fd, chunk.images, start + where[s].images + chunk.start * row)
                elif mem is not None:
                    mem[chunk.start : end] = torch.from_numpy(chunk.images)
                box[chunk.start : end] = chunk.boxes
                for i, err in enumerate(chunk.errors):
                    if err is None:
                        good[chunk.start + i] = 1
                    else:
                        bad.append(BadImage(str(files[chunk.start + i]), err))
            boxes[s], ok[s] = torch.from_numpy(box), torch.from_numpy(good)
            if mem is not None:
                images[s] = mem.permute(0, 3, 1, 2)  # (N, C, S, S) view of channels-last rows, as the file holds
    finally:
        progress.close()
    return images, boxes, ok, bad


def _labels(items: list[tuple[Path, int]]) -> torch.Tensor:
    """The class indices of listed files, int64 (N,): what the cache stores and is checked against."""
    return torch.tensor([lab for _, lab in items], dtype=torch.int64)


def _bad_meta(bad: list[BadImage], room: int) -> str:
    """The bad files as JSON for the header, as many as fit in `room` bytes (the count is kept apart)."""
    listed, used = [], 0
    for b in bad:
        item = {"path": b.path[:1000], "reason": b.reason[:300]}
        used += len(json.dumps(item)) + 2
        if used > room:
            break
        listed.append(item)
    return json.dumps(listed)


def _write_file(path: Path, splits: dict, side: int, channels: int, meta: dict[str, str]) -> list[BadImage]:
    """Decode into a new cache file (a temporary name, renamed when complete); the bad files."""
    counts = {s: len(items) for s, items in splits.items()}
    row = channels * side * side
    where, total = layout(counts, row)
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in path.parent.glob(".*.tmp"):  # left by a run killed while decoding, a day or more ago
        with contextlib.suppress(OSError):
            if time.time() - old.stat().st_mtime > 86400:
                old.unlink()
    tmp = path.parent / f".{path.stem}.{os.getpid()}.tmp"
    hsize = header_bytes(sum(counts.values()))
    start = 8 + hsize
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o644)
    try:
        os.ftruncate(fd, start + total)
        _, boxes, ok, bad = _decode(splits, side, channels, fd, where, start)
        for s, lay in where.items():
            labels = _labels(splits[s]).numpy()
            for offset, arr in ((lay.labels, labels), (lay.boxes, boxes[s].numpy()), (lay.ok, ok[s].numpy())):
                pwrite_all(fd, arr.tobytes(), start + offset)
        meta = {**meta, "bad": "[]", "bad_count": str(len(bad)), "channels": str(channels), "canvas": str(side)}
        room = hsize - len(header(where, (channels, side, side), row, meta, HEADER_MAX)[8:].rstrip(b" ")) - 64
        meta["bad"] = _bad_meta(bad, room // 2)  # JSON-in-JSON escapes each quote: half the room is safe
        pwrite_all(fd, header(where, (channels, side, side), row, meta, hsize), 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    return bad


def _open_file(path: Path, splits: dict[str, list[tuple[Path, int]]], size: int) -> Decoding | None:
    """The decoded splits of a cache file, images left on disk; None if it is damaged, of another format, or does
    not hold exactly what `splits` lists (the cache may sit on a shared disk: every number in it is checked)."""
    try:
        handle = OpenFile(path)  # first: what is checked below is the file this run then reads
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("version") != str(CACHE_VERSION) or sorted(f.keys()) != sorted(
                    f"{s}_{t}" for s in splits for t in ("images", "labels", "boxes", "ok")):  # fmt: skip
                return None
            labels = {s: f.get_tensor(f"{s}_labels") for s in splits}
            boxes = {s: f.get_tensor(f"{s}_boxes") for s in splits}
            ok = {s: f.get_tensor(f"{s}_ok") for s in splits}
            bad = [BadImage(**b) for b in json.loads(meta["bad"])]
            channels, side = int(meta["channels"]), int(meta["canvas"])
        if channels not in (1, 3) or side != canvas_side(size) or meta.get("size") != str(size):
            return None
        for s, items in splits.items():
            if not torch.equal(labels[s], _labels(items)) or ok[s].shape != (len(items),) or bool((ok[s] > 1).any()):
                return None
            good = boxes[s][ok[s] == 1]
            if boxes[s].shape != (len(items), 2) or bool(((good < 1) | (good > side)).any()):
                return None
        counts = {s: len(labels[s]) for s in splits}
        where, total = layout(counts, channels * side * side)
        start = data_start(handle.fd())
        if os.fstat(handle.fd()).st_size != start + total:
            return None
        images: dict[str, torch.Tensor | DiskImages] = {
            s: DiskImages(handle, start + where[s].images, (channels, side, side), torch.arange(counts[s]))
            for s in splits
        }
        bad_count = int(meta["bad_count"])
        if sum(int((o == 0).sum()) for o in ok.values()) != bad_count or len(bad) > bad_count:
            return None
        if bad_count > len(bad):
            bad.append(BadImage("...", f"and {bad_count - len(bad):,} more bad file(s), not listed in the cache"))
    except Exception:  # a damaged, truncated or foreign file is simply decoded again (and replaced)
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # "last used", as `cnnlab cache` lists it
    return Decoding(images, labels, boxes, ok, bad, channels)


def _choose_mode(data_cache: str, need: int) -> tuple[str, str]:
    """memory or disk for `need` bytes of canvases under `data_cache`, and why (for the run's log)."""
    if data_cache in ("memory", "disk"):
        return data_cache, f"as asked (data_cache='{data_cache}', --data-cache {data_cache})"
    free = available_bytes("cpu")
    if need <= AUTO_MEMORY_FRACTION * free:
        return "memory", f"at most {AUTO_MEMORY_FRACTION:.0%} of the {gib(free)} of memory available"
    return "disk", (f"more than {AUTO_MEMORY_FRACTION:.0%} of the {gib(free)} of memory available; "
                    "data_cache='memory' (--data-cache memory) would keep it in memory")  # fmt: skip


def _decoding(root: Path, splits: dict, size: int, data_cache: str, description: str,
              notes: list[str]) -> tuple[Decoding, str, str]:  # fmt: skip
    """The decoded splits (from the cache file, or decoded now), where their images live, and why."""
    side = canvas_side(size)
    n = sum(len(v) for v in splits.values())
    cache_file = decode_dir() / f"{cache_key(root, splits, size)}.safetensors"
    if data_cache != "none" and cache_file.is_file():
        opened = _open_file(cache_file, splits, size)
        if opened is not None:
            need = n * opened.channels * side * side
            mode, why = _choose_mode(data_cache, need)
            notes.append(f"decoded images read from the cache {cache_file}")
            return opened, mode, why + f" ({human_bytes(need)} decoded)"
    channels = image_channels([p for items in splits.values() for p, _ in items], _mode)
    need = n * channels * side * side
    if data_cache == "none":
        mode, why = "memory", "data_cache='none' (--data-cache none): decoded into memory, no cache file"
    else:
        mode, why = _choose_mode(data_cache, need)
    if data_cache != "none":
        free = shutil.disk_usage(_existing_parent(cache_file)).free
        if need + 2**28 > free:  # a margin of 256 MiB: the disk is not ours alone
            if mode == "disk":
                raise UsageError(
                    f"{cache_file.parent}: the decode cache needs {human_bytes(need)} and the disk has "
                    f"{gib(free)} free; set $CNNLAB_CACHE to a larger disk, or lower {{image_size}}",
                    options=True,
                )
            notes.append(f"the decode cache needs {human_bytes(need)} and {cache_file.parent} has {gib(free)} free: "
                         "decoded into memory, without a cache file")  # fmt: skip
            data_cache, mode, why = "none", "memory", "too little disk for the decode cache"
    check_fits(f"decoding at {side}x{side}", decoding_bytes(side, channels), hint="lower {image_size}")
    if mode == "memory" or data_cache == "none":
        check_fits(f"decoding {n:,} images onto {side}x{side} canvases", need + 64 * 2**20,
                   hint="lower {image_size}, or {data_cache=disk} to read them from a cache file")  # fmt: skip
    why += f" ({human_bytes(need)} decoded)"
    if data_cache == "none":
        images, boxes, ok, bad = _decode(splits, side, channels, None, None)
        labels = {s: _labels(items) for s, items in splits.items()}
        return Decoding(images, labels, boxes, ok, bad, channels), "memory", why
    meta = {"source": description, "size": str(size), "version": str(CACHE_VERSION), "images": str(n)}
    try:
        _write_file(cache_file, splits, side, channels, meta)
    except OSError as e:
        problem = f"could not write the decode cache {cache_file} ({e.strerror or e})"
        if mode == "disk":
            raise UsageError(f"{problem}; set $CNNLAB_CACHE to a writable folder with room") from None
        notes.append(f"{problem}: decoded into memory; the next run decodes again")
        return _decoding(root, splits, size, "none", description, notes)
    try:
        removed = remove_superseded(cache_file)
        if removed:
            notes.append(f"removed {removed} outdated decode cache file(s) of this data")
    except OSError as e:  # an old cache we may not delete (another user's, read-only): left where it is
        notes.append(f"could not delete an outdated decode cache ({e.strerror or e})")
    opened = _open_file(cache_file, splits, size)
    if opened is None:
        raise CnnlabError(f"{cache_file}: the decode cache just written cannot be read back")
    notes.append(f"decoded {n:,} images into the cache {cache_file}")
    return opened, mode, why


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def load_image_folder(
    path: str | os.PathLike[str], image_size: int | None = None, on_bad_image: str = "error",
    data_cache: str = "auto", resize: str = "crop",
) -> Dataset:  # fmt: skip
    """Load an image folder as a Dataset, decoding once into the decode cache (kept in memory or read from disk)."""
    root = Path(path).expanduser()
    splits, classes, notes = scan(root)
    size = image_size or DEFAULT_FOLDER_SIZE
    name = root.resolve().name or "folder"
    return load_listed(
        root, splits, classes, size, on_bad_image, name=name, description=f"image folder {root.resolve()}",
        extra={"folder": str(root.resolve())}, data_cache=data_cache, resize=resize,
        notes=[f"data: image folder {root.resolve()}: {len(classes)} classes, {size}x{size}", *notes],
    )  # fmt: skip


def load_listed(
    root: Path, splits: dict[str, list[tuple[Path, int]]], classes: tuple[str, ...], size: int, on_bad_image: str,
    *, name: str, description: str, extra: dict, notes: list[str], data_cache: str = "auto", resize: str = "crop",
    multi_hot: dict[str, torch.Tensor] | None = None,
) -> Dataset:  # fmt: skip
    """Decode listed files {split: [(file, class index)]} (cached under a key of root and files) into a Dataset.

    `multi_hot` {split: uint8 (N, K)} gives multi-label data its labels, row for row with the listed files.
    """
    if data_cache not in DATA_CACHE_MODES:
        raise OptionError("data_cache", f": expected one of {', '.join(DATA_CACHE_MODES)}, got {data_cache!r}")
    if resize not in RESIZE_POLICIES:
        raise OptionError("resize", f": expected one of {', '.join(RESIZE_POLICIES)}, got {resize!r}")
    dec, mode, why = _decoding(root, splits, size, data_cache, description, notes)
    bad = dec.bad
    if bad and on_bad_image == "error":
        more = f" ({len(bad) - 1} more bad file(s))" if len(bad) > 1 else ""
        raise CnnlabError(f"{bad[0].path}: {bad[0].reason}{more}; {{on_bad_image=skip}} leaves bad files out",
                          options=True)  # fmt: skip
    if bad:
        listed = "; ".join(f"{b.path}: {b.reason}" for b in bad[:5])
        notes.append(f"skipped {len(bad)} bad image(s) (on_bad_image=skip): {listed}{' ...' if len(bad) > 5 else ''}")
    sets = {}
    for s, images in dec.images.items():
        keep = dec.ok[s].nonzero().flatten()
        every = len(keep) == len(dec.ok[s])
        if mode == "memory" and isinstance(images, DiskImages):
            images = images[keep]  # one read of the rows that decoded (consecutive rows in large reads)
        elif not every:
            images = images.subset(keep) if isinstance(images, DiskImages) else images[keep]
        labels = multi_hot[s][keep] if multi_hot is not None else dec.labels[s][keep]
        sets[s] = ImageSet(images, labels, dec.boxes[s][keep].to(torch.int64), size, resize)
    for s, data in sets.items():
        counts = class_counts(data.labels, len(classes))
        if s == "train" and bool((counts == 0).any()):
            empty = [classes[i] for i in (counts == 0).nonzero().flatten().tolist()]
            raise CnnlabError(f"{description}: class(es) {', '.join(empty)} have no usable images after skipping "
                              "bad files")  # fmt: skip
    where = "kept in memory" if mode == "memory" else "read from the disk cache per batch"
    notes.append(f"images {where}: {why}")
    notes.append(f"resize={resize}: {RESIZE_POLICIES[resize]}")
    train = sets["train"]
    if "test" in sets:
        test = sets["test"]
    elif "val" in sets:
        test = sets.pop("val")  # only train/ + val/: val/ is the held-out test set, validation comes from train/
        notes.append("val/ is used as the test split (no test/ folder); validation is held out from train/")
    else:
        rest, held = stratified_split(train.labels, FOLDER_TEST_FRACTION, FOLDER_SPLIT_SEED)
        train, test = train.subset(rest), train.subset(held)
        each = "label (of each image's rarest label)" if train.multi_label else "class"
        notes.append(f"no test split given: a fixed {FOLDER_TEST_FRACTION:.0%} of each {each} is the test split")
    # The random resized crop already moves and scales the image; the translation crop is for squash and pad.
    augment = ("flip",) if resize == "crop" else ("crop", "flip")
    why = ("left-right mirrors (resize=crop already crops each photo at random)" if resize == "crop"
           else "shifts of up to ~7% of the side and left-right mirrors")  # fmt: skip
    why += "; for digits or text: --augment none"
    return Dataset(
        name=name, train=train, test=test, classes=classes, default_augment=augment, augment_note=why,
        description=description, val=sets.get("val"),
        extra={**extra, "skipped": [b.__dict__ for b in bad], "data_cache": mode}, notes=notes,
    )  # fmt: skip
