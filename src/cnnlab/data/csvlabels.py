"""Labels from a CSV file: one row per image, `file,label` (and optionally `split`), as Kaggle and fastai lay them out.

The first column names the image (a path relative to the CSV's folder, or absolute), the second its class; a header
row is required. Columns may instead be named: `file`/`filename`/`path`/`image`/`id`, `label`/`class`/`category`/
`target`, and `split` (train, val/valid/validation, test). Without a split column a fixed 20% of each class is the
test split, as for image folders. Decoding, the cache and bad-image handling are the image folders' own.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from cnnlab.data.folders import DEFAULT_FOLDER_SIZE, load_listed
from cnnlab.data.types import Dataset
from cnnlab.errors import OptionError, UsageError

FILE_COLUMNS = ("file", "filename", "file_name", "path", "image", "image_id", "id", "fname")
LABEL_COLUMNS = ("label", "class", "category", "target", "labels")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}  # fmt: skip
MAX_CSV_BYTES = 512 * 2**20  # a labels file beyond this is not a labels file (10M rows of 50 characters)


def _column(header: list[str], wanted: tuple[str, ...], fallback: int | None) -> int | None:
    lowered = [h.strip().lower() for h in header]
    for w in wanted:
        if w in lowered:
            return lowered.index(w)
    return fallback


def read_rows(path: Path) -> tuple[list[tuple[str, str, str]], str]:
    """(file, label, split) per data row, and a note on the columns used; errors name the file and the row."""
    if not path.is_file():
        raise OptionError("data", f"{path}: no such CSV file")
    if path.stat().st_size > MAX_CSV_BYTES:
        raise UsageError(f"{path}: {path.stat().st_size / 2**20:.0f} MiB is too large for a labels file")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
            rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a UTF-8 text file") from None
    except csv.Error as e:
        raise UsageError(f"{path}: not a readable CSV ({e})") from None
    if len(rows) < 2:
        raise UsageError(f"{path}: needs a header row and at least one row per image")
    header = rows[0]
    has_names = _column(header, FILE_COLUMNS, None) is not None or _column(header, LABEL_COLUMNS, None) is not None
    file_col = _column(header, FILE_COLUMNS, 0 if not has_names else None)
    label_col = _column(header, LABEL_COLUMNS, 1 if not has_names else None)
    if file_col is None or label_col is None or file_col == label_col or len(header) < 2:
        raise UsageError(f"{path}: the header needs a file column ({'/'.join(FILE_COLUMNS[:4])}) and a label column "
                         f"({'/'.join(LABEL_COLUMNS[:3])}), or file and label as the first two columns")  # fmt: skip
    split_col = _column(header, ("split", "set", "subset"), None)
    out = []
    for n, row in enumerate(rows[1:], start=2):
        needed = max(file_col, label_col, split_col or 0)
        if len(row) <= needed:
            raise UsageError(f"{path}: row {n} has {len(row)} column(s), the header {len(header)}")
        file, label = row[file_col].strip(), row[label_col].strip()
        split = row[split_col].strip().lower() if split_col is not None else "train"
        if not file or not label:
            raise UsageError(f"{path}: row {n} has an empty {'file' if not file else 'label'}")
        if split not in SPLIT_ALIASES:
            raise UsageError(f"{path}: row {n}: split {split[:20]!r} is not train, val or test")
        out.append((file, label, SPLIT_ALIASES[split]))
    used = f"file column {header[file_col]!r}, label column {header[label_col]!r}" + (
        f", split column {header[split_col]!r}" if split_col is not None else ""
    )
    return out, used


def _sorted_classes(labels: set[str]) -> tuple[str, ...]:
    """Class names in a stable order: numerically when every label is a whole number ('2' before '10')."""
    if all(label.lstrip("-").isdigit() for label in labels):
        return tuple(sorted(labels, key=int))
    return tuple(sorted(labels))


def load_csv_labels(
    path: str | os.PathLike[str], image_size: int | None = None, on_bad_image: str = "error",
    data_cache: str = "auto", resize: str = "crop",
) -> Dataset:  # fmt: skip
    """Images listed in a CSV with their labels (and optional split), decoded and cached like an image folder."""
    csv_path = Path(path).expanduser()
    rows, used = read_rows(csv_path)
    root = csv_path.resolve().parent
    classes = _sorted_classes({label for _, label, split in rows if split == "train"})
    if len(classes) < 2:
        raise UsageError(f"{csv_path}: the training rows have {len(classes)} class(es); at least 2 are needed")
    index = {c: i for i, c in enumerate(classes)}
    splits: dict[str, list[tuple[Path, int]]] = {}
    seen: dict[Path, int] = {}
    for n, (file, label, split) in enumerate(rows, start=2):
        if label not in index:
            raise UsageError(f"{csv_path}: row {n}: label {label[:40]!r} ({split}) never appears in the training rows")
        image = (root / Path(file).expanduser()).resolve()
        if not image.is_file():
            raise UsageError(f"{csv_path}: row {n}: {file[:200]}: no such image file (paths are relative to "
                             f"{root})")  # fmt: skip
        if image in seen:
            raise UsageError(f"{csv_path}: row {n}: {file[:200]} is listed twice (first in row {seen[image]})")
        seen[image] = n
        splits.setdefault(split, []).append((image, index[label]))
    if "train" not in splits:
        raise UsageError(f"{csv_path}: no training rows")
    size = image_size or DEFAULT_FOLDER_SIZE
    counts = ", ".join(f"{len(v):,} {k}" for k, v in splits.items())
    return load_listed(
        root, splits, classes, size, on_bad_image, name=csv_path.stem, data_cache=data_cache, resize=resize,
        description=f"labels file {csv_path.resolve()}",
        extra={"csv": str(csv_path.resolve())},
        notes=[f"data: labels file {csv_path.resolve()}: {len(classes)} classes, {counts} images, {size}x{size} "
               f"({used})"],
    )  # fmt: skip
