"""A run directory: config.json, metrics.csv, best.safetensors, last.ckpt, curves.png, results.json, and for
multi-label data thresholds.json."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from cnnlab.errors import OptionError, UsageError
from cnnlab.fileio import atomic_write_json, atomic_write_text

CONFIG, METRICS, BEST, LAST, CURVES, RESULTS, THRESHOLDS = (
    "config.json", "metrics.csv", "best.safetensors", "last.ckpt", "curves.png", "results.json", "thresholds.json",
)  # fmt: skip
METRIC_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "elapsed")


def check_writable(directory: Path, label: str = "runs_dir") -> None:
    """Raise a UsageError unless `directory` is, or could be created as, a writable directory. Creates nothing.

    `label` is the option that named the directory: a keyword (runs_dir, spelled --runs-dir on the command line) or,
    starting with '-', a flag of one command only.
    """
    existing = directory
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing != directory and not existing.is_dir():
        raise _dir_error(label, f"{directory}: cannot create directory ({existing} is not a directory)")
    if not existing.is_dir():
        raise _dir_error(label, f"{directory}: not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _dir_error(label, f"{directory}: {existing} is not writable")


def make_dir(directory: Path, label: str) -> Path:
    """Create `directory` (and its parents) for an output option, or raise a UsageError naming the option."""
    check_writable(directory, label)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _dir_error(label, f"{directory}: cannot create directory ({e.strerror or e})") from None
    return directory


def _dir_error(label: str, why: str) -> UsageError:
    return UsageError(f"{label} {why}") if label.startswith("-") else OptionError(label, why)


def new_run_dir(runs_dir: str | os.PathLike[str], model: str, data: str, name: str | None = None) -> Path:
    """Create `runs_dir/<YYYY-mm-dd_HHMM>_<model>_<data>` (or `runs_dir/<name>`), never reusing an existing one."""
    root = Path(runs_dir)
    if name is not None:
        check_run_name(name)
    check_writable(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OptionError("runs_dir", f"{root}: cannot create directory ({e.strerror or e})") from e
    stem = name or f"{datetime.now():%Y-%m-%d_%H%M}_{model}_{_slug(data)}"
    for i in range(1, 1000):
        path = root / (stem if i == 1 else f"{stem}-{i}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            raise OptionError("runs_dir", f"{root}: cannot create {path.name} ({e.strerror or e})") from e
        return path
    raise OptionError("runs_dir", f"{root}: too many runs named {stem}")


def check_run_name(name: str) -> str:
    """Refuse a --name that is not one plain directory name (it must not lead outside --runs-dir)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or os.sep in name or "\0" in name:
        raise OptionError("name", f"{name!r}: give a plain directory name (no '/', not '.' or '..')")
    return name


def _slug(text: str) -> str:
    # A folder path as dataset name becomes its last component; keep names filesystem-friendly.
    return safe_name(Path(text.rstrip("/\\")).name or "data")


def safe_name(text: str) -> str:
    """Text made safe for a file name: runs of anything but letters, digits, '.', '_', '-' become '-'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)


def resolve_run(path: str | os.PathLike[str]) -> Path:
    """The run directory for RUN: the directory itself or the directory of a file inside it."""
    p = Path(path)
    if p.is_file():
        p = p.parent
    if not p.exists():
        raise UsageError(f"{path}: no such run directory")
    if not (p / CONFIG).is_file():
        raise UsageError(f"{path}: not a cnnlab run directory (no {CONFIG})")
    return p


def read_config(run: Path) -> dict[str, Any]:
    """Read a run's config.json."""
    try:
        return json.loads((run / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"{run / CONFIG}: unreadable config ({e})") from e


def write_config(run: Path, config: dict[str, Any]) -> Path:
    """Write config.json atomically."""
    return atomic_write_json(run / CONFIG, config)


def write_thresholds(run: Path, classes: tuple[str, ...], thresholds: list[float], how: str) -> Path:
    """Write a multi-label run's decision threshold per label (a label is predicted at probability >= it)."""
    return atomic_write_json(run / THRESHOLDS, {"thresholds": dict(zip(classes, thresholds, strict=True)),
                                                "chosen": how})  # fmt: skip


def read_thresholds(run: Path, classes: tuple[str, ...]) -> tuple[list[float], str]:
    """A multi-label run's thresholds in class order and how they were chosen; 1/2 each if the run has none yet.

    The file is checked as any input is: one number in (0, 1) per class of the run, or a one-line error.
    """
    path = run / THRESHOLDS
    if not path.exists():
        return [0.5] * len(classes), f"no {THRESHOLDS} (the run has not finished): 1/2 for every label"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        given = doc["thresholds"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path}: unreadable ({type(e).__name__}: {str(e)[:80]}); one threshold per class "
                         "is expected") from None  # fmt: skip
    missing = [c for c in classes if not isinstance(given, dict) or c not in given]
    if missing:
        raise UsageError(f"{path}: no threshold for label {missing[0][:40]!r}")
    values = [given[c] for c in classes]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < 1 for v in values):
        raise UsageError(f"{path}: every threshold must be a number between 0 and 1")
    return [float(v) for v in values], str(doc.get("chosen", ""))[:200]


def write_metrics(run: Path, rows: list[dict[str, Any]]) -> Path:
    """Rewrite metrics.csv with one row per epoch (small: rewriting whole keeps it atomic)."""
    buf = io.StringIO()
    # The standard columns, then any a callback added to the rows (in the order they first appear).
    fields = list(dict.fromkeys([*METRIC_FIELDS, *(k for row in rows for k in row)]))
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in fields})
    return atomic_write_text(run / METRICS, buf.getvalue())


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """The rows of metrics.csv as numbers (None where a value was not measured); [] if there is none."""
    path = run / METRICS
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        return []
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: unreadable ({e})") from e
    return [_metrics_row(row, path, line) for line, row in enumerate(rows, start=2)]


def _metrics_row(row: dict[str, Any], path: Path, line: int) -> dict[str, Any]:
    """One metrics.csv row with its numbers parsed; a hand-edited cell that is no number is named, line and column."""
    out: dict[str, Any] = {}
    for key in METRIC_FIELDS:
        text = (row.get(key) or "").strip()
        try:
            out[key] = float(text) if text else None  # 'nan' stays: an epoch can have measured nothing
        except ValueError:
            raise UsageError(f"{path}, line {line}: {key} is not a number ({text[:20]!r})") from None
    if out["epoch"] is None or not math.isfinite(out["epoch"]) or out["epoch"] != int(out["epoch"]) or out["epoch"] < 1:
        raise UsageError(f"{path}, line {line}: epoch must be a whole number >= 1")
    out["epoch"] = int(out["epoch"])
    for key in row.keys() - set(METRIC_FIELDS):  # a callback's own columns: numbers where they parse, else text
        text = (row.get(key) or "").strip()
        try:
            out[key] = float(text) if text else None
        except ValueError:
            out[key] = text
    return out


def best_epoch(rows: list[dict[str, Any]]) -> int | None:
    """The epoch with the lowest validation loss in metrics.csv rows (None without validation)."""
    with_val = [r for r in rows if r.get("val_loss") not in (None, "") and math.isfinite(float(r["val_loss"]))]
    return int(min(with_val, key=lambda r: float(r["val_loss"]))["epoch"]) if with_val else None


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)
