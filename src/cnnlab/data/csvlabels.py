"""Labels from a CSV file: one row per image, `image,label` (and optionally `split`), as Kaggle and fastai lay them out.

The image column names the file (a path relative to the CSV's folder, or absolute), the label column its class; a
header row is required. Columns are found by name - `image`/`file`/`filename`/`path`/`id`, `label`/`class`/`category`/
`target`, and `split` (train, val/valid/validation, test) - or by position (image, label), or named by the user
(`csv_image_column`, `csv_label_column`). A label cell holding several labels separated by `;` makes the dataset
multi-label: labels become a multi-hot (N, K) uint8 tensor. Without a split column a fixed 20% of each class (of each
image's rarest label, for multi-label data) is the test split, as for image folders. Decoding, the cache and
bad-image handling are the image folders' own; bad rows (a missing file, an empty cell) follow `on_bad_image`.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from cnnlab.data.folders import DEFAULT_FOLDER_SIZE, load_listed
from cnnlab.data.types import Dataset
from cnnlab.errors import CnnlabError, OptionError, UsageError

FILE_COLUMNS = ("image", "file", "filename", "file_name", "path", "image_id", "id", "fname")
LABEL_COLUMNS = ("label", "labels", "class", "category", "target", "tags")
SPLIT_COLUMNS = ("split", "set", "subset")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}  # fmt: skip
LABEL_SEPARATOR = ";"  # several labels in one cell: a multi-label dataset
MAX_CSV_BYTES = 512 * 2**20  # a labels file beyond this is not a labels file (10M rows of 50 characters)
BAD_ROWS_LISTED = 5  # bad rows named in the note when they are skipped


@dataclass(frozen=True)
class Row:
    """One usable data row: its line in the file, the image as written, its labels, its split."""

    line: int
    file: str
    labels: tuple[str, ...]
    split: str


def _find(header: list[str], wanted: tuple[str, ...]) -> int | None:
    lowered = [h.strip().lower() for h in header]
    return next((lowered.index(w) for w in wanted if w in lowered), None)


def _named(path: Path, header: list[str], name: str, option: str) -> int:
    """The index of the column the user named (exactly, else ignoring case and spaces); an error lists the columns."""
    if name in header:
        return header.index(name)
    loose = ["".join(h.split()).lower() for h in header]
    if "".join(name.split()).lower() in loose:
        return loose.index("".join(name.split()).lower())
    shown = ", ".join(repr(h) for h in header[:12]) + (" ..." if len(header) > 12 else "")
    raise OptionError(option, f"{name[:40]!r}: {path} has no such column (its columns: {shown})")


def _columns(path: Path, header: list[str], image_column: str | None, label_column: str | None
             ) -> tuple[int, int, int | None]:  # fmt: skip
    """The (image, label, split) column indices of a header: as named by the user, by known names, or by position."""
    file_col = _named(path, header, image_column, "csv_image_column") if image_column else _find(header, FILE_COLUMNS)
    label_col = _named(path, header, label_column, "csv_label_column") if label_column else _find(header, LABEL_COLUMNS)
    if image_column and label_column and file_col == label_col:
        raise OptionError("csv_label_column", f"{label_column[:40]!r} names the same column as {{csv_image_column}}")
    if file_col is None and label_col is None and len(header) >= 2:
        file_col, label_col = 0, 1  # no known names: image and label are the first two columns
    if file_col is None or label_col is None or file_col == label_col:
        raise UsageError(f"{path}: the header needs an image column ({'/'.join(FILE_COLUMNS[:3])}) and a label column "
                         f"({'/'.join(LABEL_COLUMNS[:4])}), or --csv-image-column/--csv-label-column naming them "
                         f"(its columns: {', '.join(repr(h) for h in header[:12])})")  # fmt: skip
    split_col = _find(header, SPLIT_COLUMNS)
    return file_col, label_col, split_col if split_col not in (file_col, label_col) else None


def read_rows(
    path: Path, image_column: str | None = None, label_column: str | None = None
) -> tuple[list[Row], list[tuple[int, str]], str, bool]:  # fmt: skip
    """The usable rows, the bad ones as (line, why), a note on the columns used, and whether it is multi-label.

    A bad row (too few cells, an empty image or label cell) is one a skipping run can leave out; a file that is not a
    CSV, or a split name it does not know, is an error naming the file and line. The data is multi-label when a usable
    row holds two or more labels (`cat;` is the single label cat).
    """
    if not path.is_file():
        raise OptionError("data", f"{path}: no such CSV file")
    if path.stat().st_size > MAX_CSV_BYTES:
        raise UsageError(f"{path}: {path.stat().st_size / 2**20:.0f} MiB is too large for a labels file")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
            reader = csv.reader(f)
            # csv's line_num after a row is the row's last line: a quoted cell may span several.
            lines = [(reader.line_num, r) for r in reader if any(c.strip() for c in r)]
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a UTF-8 text file") from None
    except csv.Error as e:
        raise UsageError(f"{path}: not a readable CSV ({e})") from None
    if len(lines) < 2:
        raise UsageError(f"{path}: needs a header row and at least one row per image")
    header = lines[0][1]
    file_col, label_col, split_col = _columns(path, header, image_column, label_column)
    needed = max(file_col, label_col, split_col or 0)
    rows: list[Row] = []
    bad: list[tuple[int, str]] = []
    multi = False
    for line, cells in lines[1:]:
        if len(cells) <= needed:
            bad.append((line, f"{len(cells)} cell(s), the header has {len(header)}"))
            continue
        file, cell = cells[file_col].strip(), cells[label_col].strip()
        split = cells[split_col].strip().lower() if split_col is not None else "train"
        if split not in SPLIT_ALIASES:
            raise UsageError(f"{path}: line {line}: split {split[:20]!r} is not train, val or test")
        labels = tuple(dict.fromkeys(s.strip() for s in cell.split(LABEL_SEPARATOR) if s.strip()))
        multi = multi or len(labels) > 1
        if not file or not labels:
            bad.append((line, f"empty {'image' if not file else 'label'} cell"))
            continue
        rows.append(Row(line, file, labels, SPLIT_ALIASES[split]))
    used = f"image column {header[file_col]!r}, label column {header[label_col]!r}" + (
        f", split column {header[split_col]!r}" if split_col is not None else ""
    )
    return rows, bad, used, multi


def _sorted_classes(labels: set[str]) -> tuple[str, ...]:
    """Class names in a stable order: numerically when every label is a whole number ('2' before '10')."""
    if all(label.lstrip("-").isdigit() for label in labels):
        return tuple(sorted(labels, key=int))
    return tuple(sorted(labels))


def load_csv_labels(
    path: str | os.PathLike[str], image_size: int | None = None, on_bad_image: str = "error",
    data_cache: str = "auto", resize: str | None = None, image_column: str | None = None,
    label_column: str | None = None,
) -> Dataset:  # fmt: skip
    """Images listed in a CSV with their labels (and optional split), decoded and cached like an image folder.

    `resize` defaults to crop, and for multi-label data to squash: a random crop of a photo with several labelled
    objects can cut one of them out while its label stays.
    """
    csv_path = Path(path).expanduser()
    rows, bad, used, multi = read_rows(csv_path, image_column, label_column)
    root = csv_path.resolve().parent
    classes = _sorted_classes({label for r in rows if r.split == "train" for label in r.labels})
    if len(classes) < 2 and not (multi and classes):
        raise UsageError(f"{csv_path}: the training rows have {len(classes)} class(es); at least 2 are needed")
    index = {c: i for i, c in enumerate(classes)}
    listed: dict[str, list[tuple[Path, list[int]]]] = {}  # per split: each usable image and its class indices
    seen: dict[Path, int] = {}
    for r in rows:
        unseen = [label for label in r.labels if label not in index]
        if unseen:
            raise UsageError(f"{csv_path}: line {r.line}: label {unseen[0][:40]!r} ({r.split}) never appears in the "
                             "training rows")  # fmt: skip
        image = (root / Path(r.file).expanduser()).resolve()
        if image in seen:
            raise UsageError(f"{csv_path}: line {r.line}: {r.file[:200]} is listed twice (first on line {seen[image]})")
        seen[image] = r.line
        if not image.is_file():
            bad.append((r.line, f"{r.file[:200]}: no such image file (paths are relative to {root})"))
            continue
        listed.setdefault(r.split, []).append((image, [index[label] for label in r.labels]))
    bad.sort()
    notes = []
    if bad and on_bad_image == "error":
        line, why = bad[0]
        more = f" ({len(bad) - 1} more bad row(s))" if len(bad) > 1 else ""
        raise CnnlabError(f"{csv_path}: line {line}: {why}{more}; {{on_bad_image=skip}} leaves bad rows out",
                          options=True)  # fmt: skip
    if bad:
        shown = "; ".join(f"line {line}: {why}" for line, why in bad[:BAD_ROWS_LISTED])
        notes.append(f"skipped {len(bad)} bad row(s) of {csv_path.name} (on_bad_image=skip): {shown}"
                     + (" ..." if len(bad) > BAD_ROWS_LISTED else ""))  # fmt: skip
    if "train" not in listed:
        raise UsageError(f"{csv_path}: no usable training rows")
    if multi and not any(len(labels) > 1 for items in listed.values() for _, labels in items):
        multi = False  # the rows with several labels were all left out
        notes.append("every row with several labels was left out: the data is single-label")
    if resize is None:
        resize = "squash" if multi else "crop"
        if multi:
            notes.insert(0, "multi-label data: resize=squash by default (the whole photo, so that no labelled "
                            "object is cropped out); resize=crop (--resize crop) crops at random anyway")  # fmt: skip
    # Multi-label images are cached under label 0: the decoded pixels do not depend on the labels.
    splits = {s: [(p, 0 if multi else labels[0]) for p, labels in items] for s, items in listed.items()}
    multi_hot = None
    if multi:
        multi_hot = {}
        for s, items in listed.items():
            t = torch.zeros((len(items), len(classes)), dtype=torch.uint8)
            for i, (_, labels) in enumerate(items):
                t[i, labels] = 1
            multi_hot[s] = t
    size = image_size or DEFAULT_FOLDER_SIZE
    counts = ", ".join(f"{len(v):,} {k}" for k, v in splits.items())
    kind = f"{len(classes)} labels (multi-label: several per image)" if multi else f"{len(classes)} classes"
    return load_listed(
        root, splits, classes, size, on_bad_image, name=csv_path.stem, data_cache=data_cache, resize=resize,
        description=f"labels file {csv_path.resolve()}", multi_hot=multi_hot,
        extra={"csv": str(csv_path.resolve()), "skipped_rows": [{"line": n, "reason": w} for n, w in bad]},
        notes=[f"data: labels file {csv_path.resolve()}: {kind}, {counts} images, {size}x{size} ({used})", *notes],
    )  # fmt: skip
