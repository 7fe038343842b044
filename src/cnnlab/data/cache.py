"""What cnnlab keeps in its per-user cache: decoded image folders (and CSVs) and downloaded datasets.

Each decode cache file carries its source, image size and format version in its safetensors header, so listing reads
headers only, and writing a new version of a source deletes the versions it replaces.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from cnnlab.data.locate import cache_root, download_root

CACHE_VERSION = 1  # bump when decoding changes: files of another version are never read, and are deleted


@dataclass(frozen=True)
class CacheEntry:
    """One thing in the cache, with what it holds and its size on disk."""

    path: Path
    kind: str  # "decoded" (an image folder or CSV at one size) or "download" (a dataset's files)
    source: str  # the folder or CSV it was decoded from, or the dataset's folder name
    image_size: int | None
    images: int | None
    bytes: int
    last_used: float  # seconds since the epoch (decode caches: the last run that read it)
    current: bool  # False: written by another cache format version; never read again


def decode_dir() -> Path:
    """Where decoded folders and CSVs are cached."""
    return cache_root() / "folders"


def _decoded(path: Path) -> CacheEntry:
    meta: dict[str, str] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # a damaged file is listed (and cleared) as what it is
        meta = {}
    st = path.stat()
    size, images = meta.get("size", ""), meta.get("images", "")
    return CacheEntry(
        path=path, kind="decoded", source=meta.get("source", "unknown (damaged or older file)"),
        image_size=int(size) if size.isdigit() else None, images=int(images) if images.isdigit() else None,
        bytes=st.st_size, last_used=st.st_mtime, current=meta.get("version") == str(CACHE_VERSION),
    )  # fmt: skip


def _tree_bytes(path: Path) -> tuple[int, float]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), max((p.stat().st_mtime for p in files), default=path.stat().st_mtime)


def entries() -> list[CacheEntry]:
    """Everything in the cache: decode caches (most recently used first), then downloaded datasets."""
    found = []
    for path in decode_dir().glob("*.safetensors") if decode_dir().is_dir() else ():
        with contextlib.suppress(OSError):  # deleted while listing
            found.append(_decoded(path))
    found.sort(key=lambda e: -e.last_used)
    if download_root().is_dir():
        for d in sorted(p for p in download_root().iterdir() if p.is_dir()):
            size, used = _tree_bytes(d)
            found.append(CacheEntry(d, "download", d.name, None, None, size, used, True))
    return found


def remove_superseded(current: Path) -> int:
    """Delete the decode caches that `current` replaces (same source and size) or that an older format wrote."""
    try:
        mine = _decoded(current)
    except OSError:  # replaced meanwhile by another process writing the same cache
        return 0
    removed = 0
    for other in decode_dir().glob("*.safetensors"):
        if other == current:
            continue
        try:
            entry = _decoded(other)
        except OSError:  # deleted meanwhile (another rank, another run): nothing to do
            continue
        if not entry.current or (entry.source == mine.source and entry.image_size == mine.image_size):
            other.unlink(missing_ok=True)
            removed += 1
    return removed


def clear(which: list[CacheEntry]) -> int:
    """Delete these entries; the bytes freed."""
    freed = 0
    for e in which:
        if e.kind == "download":
            shutil.rmtree(e.path, ignore_errors=True)
        else:
            e.path.unlink(missing_ok=True)
        freed += e.bytes
    return freed


def human_bytes(n: float) -> str:
    """'812 B', '4.0 KiB', '37.5 MiB', '3.2 GiB'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:.0f} B"


def age(seconds_since_epoch: float) -> str:
    """'3 min ago', '2 h ago', '5 days ago'."""
    s = max(0.0, time.time() - seconds_since_epoch)
    for unit, length in (("days", 86400), ("h", 3600), ("min", 60)):
        if s >= length:
            return f"{s / length:.0f} {unit} ago"
    return "just now"
