"""The decode cache of image folders and CSVs: every image decoded once onto a canvas, in one safetensors file.

Layout: per split, `{split}_labels` int64 (N,), `{split}_boxes` int16 (N, 2) (each image's (h, w) at its canvas's
top-left), `{split}_ok` uint8 (N,) (0: the file could not be decoded), then every `{split}_images` uint8
(N, S, S, C): channels last, as Pillow decodes and as the resize's uint8 fast path reads fastest (230 against 380 us
per 224 px crop here); in memory they are (N, C, S, S) views of it. The file is written as images are decoded, so
decoding never holds more than a few chunks in memory; the header (which lists the bad files, known only at the end)
goes last into space kept for it at the front. It is a plain safetensors file: `safetensors.safe_open` reads it.

Reading: a batch's rows are read with positional reads (`os.preadv`) into one tensor. Memory-mapping the file would
be simpler, but the pages of a mapped file count in the process's resident memory once touched, so an epoch over a
3.6 GB cache would show 3.6 GB resident; read pages stay in the kernel's page cache instead, which it reclaims.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cnnlab.data.images import GRAY_MODES, eight_bit
from cnnlab.data.resize import fit_box
from cnnlab.errors import CnnlabError

HEADER_MIN, HEADER_PER_IMAGE, HEADER_MAX = 1 << 14, 64, 16 << 20  # bytes kept for the JSON header (written last)
CHUNK = 32  # images per decoding task at most: tasks in flight stay a few tens of MB (fewer for huge canvases)
CHUNK_BYTES = 16 << 20  # canvases per task up to this many bytes
MAX_READ = 64 << 20  # bytes per positional read when consecutive rows are read together


def to_canvas(img: Image.Image, side: int, channels: int) -> tuple[np.ndarray, int, int]:
    """A decoded image -> (uint8 (side, side, C) canvas with the whole image at its top-left, box h, box w).

    8-bit from any mode (`eight_bit`). The image keeps its aspect; its longer side becomes the canvas's.
    """
    img = eight_bit(img, gray=channels == 1)
    h, w = fit_box(img.height, img.width, side)
    if (w, h) != img.size:
        img = img.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=3.0)  # Pillow's resize antialiases
    canvas = np.zeros((side, side, channels), dtype=np.uint8)
    pixels = np.asarray(img, dtype=np.uint8)
    canvas[:h, :w] = pixels[:, :, None] if pixels.ndim == 2 else pixels
    return canvas, h, w


@dataclass
class Decoded:
    """One decoding task's chunk: canvases (n, S, S, C), boxes (n, 2), and per image an error or None."""

    start: int
    images: np.ndarray
    boxes: np.ndarray
    errors: list[str | None]


class DecodeProgress:
    """The first pass's progress on stderr: rewritten in place on a terminal, a line every 30 s elsewhere."""

    def __init__(self, total: int, what: str) -> None:
        self.total, self.what, self.done = total, what, 0
        self.start = self.last = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.shown = False

    def add(self, n: int) -> None:
        """Count n more decoded images; show the line if it is time to."""
        self.done += n
        now = time.monotonic()
        if (self.tty and now - self.last >= 0.2) or (not self.tty and now - self.last >= 30):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            left = (self.total - self.done) / max(rate, 1e-9)
            line = (f"{self.what}: {self.done:,}/{self.total:,} images ({self.done / self.total:.0%}), "
                    f"{rate:,.0f}/s, {left:,.0f} s left")  # fmt: skip
            sys.stderr.write(f"\r\x1b[K{line}" if self.tty else line + "\n")
            sys.stderr.flush()
            self.shown = True

    def close(self) -> None:
        """Erase the in-place line."""
        if self.tty and self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def decode_chunks(
    files: list[Path], side: int, channels: int, open_fn: Callable[[Path], Image.Image], progress: DecodeProgress | None
) -> Iterator[Decoded]:
    """Decode `files` onto canvases in every core's thread (Pillow releases the GIL), yielding chunks in order."""
    chunk = chunk_size(side, channels)

    def task(start: int) -> Decoded:
        part = files[start : start + chunk]
        images = np.zeros((len(part), side, side, channels), dtype=np.uint8)
        boxes = np.zeros((len(part), 2), dtype=np.int16)
        errors: list[str | None] = []
        for i, path in enumerate(part):
            try:
                canvas, h, w = to_canvas(open_fn(path), side, channels)
            except CnnlabError as e:
                errors.append(str(e).removeprefix(f"{path}: "))
                continue
            images[i] = canvas
            boxes[i] = (h, w)
            errors.append(None)
        return Decoded(start, images, boxes, errors)

    threads = workers()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: list[Future[Decoded]] = []
        starts = iter(range(0, len(files), chunk))
        for s in starts:  # a bounded window of tasks in flight: memory does not grow with the number of images
            pending.append(pool.submit(task, s))
            if len(pending) >= 2 * threads:
                break
        while pending:
            done = pending.pop(0).result()
            nxt = next(starts, None)
            if nxt is not None:
                pending.append(pool.submit(task, nxt))
            if progress is not None:
                progress.add(len(done.errors))
            yield done


def workers() -> int:
    """Decoding threads: every core (Pillow releases the GIL), at most 32."""
    return max(1, min(32, os.cpu_count() or 1))


def chunk_size(side: int, channels: int) -> int:
    """Images per decoding task: CHUNK, fewer when the canvases are large."""
    return max(1, min(CHUNK, CHUNK_BYTES // (side * side * channels)))


def decoding_bytes(side: int, channels: int) -> int:
    """Memory the decoding pass holds at most: the tasks in flight, and per thread a decoded photo (up to twice the
    canvas per side, from JPEG's draft) in RGBA float while it is converted."""
    in_flight = 2 * workers() * chunk_size(side, channels) * side * side * channels
    return in_flight + workers() * (2 * side) ** 2 * 4 * 4


def image_channels(files: list[Path], open_header: Callable[[Path], str | None]) -> int:
    """1 if every readable file is grayscale (by its header's mode, no pixels decoded), else 3."""
    with ThreadPoolExecutor(max_workers=workers()) as pool:
        modes = set(pool.map(open_header, files, chunksize=256))
    modes.discard(None)
    return 1 if modes and modes <= GRAY_MODES else 3


# --- the file -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitLayout:
    """Where one split's tensors lie in the data section (byte offsets from its start)."""

    n: int
    labels: int
    boxes: int
    ok: int
    images: int


def layout(counts: dict[str, int], row_bytes: int) -> tuple[dict[str, SplitLayout], int]:
    """Every split's offsets: small tensors first, then the images; and the data section's total size."""
    at, small = 0, {}
    for s, n in counts.items():
        small[s] = (at, at + 8 * n, at + 12 * n)  # labels int64, boxes 2 x int16, ok uint8
        at += 13 * n
    out = {}
    for s, n in counts.items():
        out[s] = SplitLayout(n, *small[s], at)
        at += n * row_bytes
    return out, at


def header_bytes(images: int) -> int:
    """The space kept for the header of a file of `images` images: the bad files it lists are cut to fit."""
    return min(HEADER_MAX, HEADER_MIN + HEADER_PER_IMAGE * images)


def data_start(fd: int) -> int:
    """Where an open safetensors file's data section starts (after its 8-byte length and its header)."""
    return 8 + struct.unpack("<Q", os.pread(fd, 8, 0))[0]


def header(
    where: dict[str, SplitLayout], shape: tuple[int, int, int], row_bytes: int, meta: dict[str, str], size: int
) -> bytes:  # fmt: skip
    """The safetensors header for this layout, padded with spaces to `size` bytes (JSON allows the padding)."""
    h: dict[str, object] = {"__metadata__": meta}
    for s, lay in where.items():
        h[f"{s}_labels"] = {"dtype": "I64", "shape": [lay.n], "data_offsets": [lay.labels, lay.labels + 8 * lay.n]}
        h[f"{s}_boxes"] = {"dtype": "I16", "shape": [lay.n, 2], "data_offsets": [lay.boxes, lay.boxes + 4 * lay.n]}
        h[f"{s}_ok"] = {"dtype": "U8", "shape": [lay.n], "data_offsets": [lay.ok, lay.ok + lay.n]}
        h[f"{s}_images"] = {"dtype": "U8", "shape": [lay.n, shape[1], shape[2], shape[0]],
                            "data_offsets": [lay.images, lay.images + lay.n * row_bytes]}  # fmt: skip
    text = json.dumps(h).encode()
    if len(text) > size:
        raise ValueError("header too large")
    return struct.pack("<Q", size) + text + b" " * (size - len(text))


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of `data` at `offset` (os.pwrite may write less than asked)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def read_into(fd: int, out: memoryview, offset: int) -> None:
    """Fill `out` from `offset` of the file (positional reads, no seek: safe across threads)."""
    while out:
        n = os.preadv(fd, [out], offset) if hasattr(os, "preadv") else _pread_copy(fd, out, offset)
        if n == 0:
            raise OSError(f"cache file ends early (at byte {offset:,})")
        out, offset = out[n:], offset + n


def _pread_copy(fd: int, out: memoryview, offset: int) -> int:
    data = os.pread(fd, len(out), offset)
    out[: len(data)] = data
    return len(data)


class OpenFile:
    """One descriptor of a cache file, shared by every split and subset read from it, opened when the cache is.

    Held open, the file stays readable even if another run replaces it meanwhile (a newer decode of a changed
    folder, `cnnlab cache --clear`): on POSIX a deleted file lives on while a descriptor refers to it. After a fork,
    the child opens the path again.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._pid = -1
        self.fd()

    def fd(self) -> int:
        """This process's descriptor."""
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0)), os.getpid()
        return self._fd

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": -1}  # a descriptor means nothing in another process

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: os may be gone
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)


class DiskImages:
    """uint8 images (N, C, S, S) that stay in a cache file: indexing reads those rows (a tensor-like for ImageSet).

    `rows` maps this set's images to rows of the file's split (subsets and splits share one file). Rows are stored
    channels last (S, S, C); what is read is an (B, C, S, S) view of them.
    """

    dtype = torch.uint8

    def __init__(self, file: OpenFile, start: int, shape: tuple[int, int, int], rows: torch.Tensor) -> None:
        self.file, self.start, self.row_shape, self.rows = file, start, shape, rows
        self.path = file.path
        self.row_bytes = int(np.prod(shape))

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"DiskImages({len(self):,} x {self.row_shape} in {self.path})"

    @property
    def shape(self) -> torch.Size:
        """(N, C, S, S), as a tensor's."""
        return torch.Size((len(self.rows), *self.row_shape))

    def dim(self) -> int:
        """4, as a tensor's."""
        return 4

    def numel(self) -> int:
        """Elements, as a tensor's (none of them in memory)."""
        return len(self.rows) * self.row_bytes

    def subset(self, index: torch.Tensor) -> DiskImages:
        """The images at `index`, still on disk."""
        return DiskImages(self.file, self.start, self.row_shape, self.rows[index.cpu()])

    def __getitem__(self, index: torch.Tensor | slice) -> torch.Tensor:
        """Read the images at `index` (1-D indices or a slice) into a uint8 tensor (B, C, S, S), in that order."""
        return self.read(index)

    def read(self, index: torch.Tensor | slice, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """The images at `index` as uint8 (B, C, S, S), read into the front of `buffer` if given (reused memory:
        a fresh tensor's first write costs as much again as the read, in page faults).

        `buffer` is (>= B, S, S, C), contiguous, as the file stores rows (see `buffer_for`).
        """
        wanted = self.rows[index.cpu() if isinstance(index, torch.Tensor) else index].numpy()
        out = self.buffer_for(len(wanted), buffer)
        if len(wanted) == 0:
            return out.permute(0, 3, 1, 2)
        flat = memoryview(out.numpy()).cast("B")
        order = np.argsort(wanted, kind="stable")  # file order: the disk (and its read-ahead) prefers it
        fd, rb, i = self.file.fd(), self.row_bytes, 0
        while i < len(order):
            j = i + 1  # rows consecutive in the file and in `order` positions are read with one call
            while (j < len(order) and wanted[order[j]] == wanted[order[j - 1]] + 1 and order[j] == order[j - 1] + 1
                   and (j - i) * rb < MAX_READ):  # fmt: skip
                j += 1
            pos = int(order[i])
            try:
                read_into(fd, flat[pos * rb : (pos + j - i) * rb], self.start + int(wanted[order[i]]) * rb)
            except OSError as e:
                raise CnnlabError(f"{self.path}: reading the decode cache failed ({e}); `cnnlab cache --clear` "
                                  "removes it, and the next run decodes again") from None  # fmt: skip
            i = j
        return out.permute(0, 3, 1, 2)

    def buffer_for(self, n: int, buffer: torch.Tensor | None = None, pin: bool = False) -> torch.Tensor:
        """The front of `buffer` if it holds n rows as stored, (n, S, S, C) contiguous; else a new one (in page-locked
        memory with `pin`, which a GPU copies from without the host waiting)."""
        c, s, _ = self.row_shape
        if buffer is not None and buffer.is_contiguous() and buffer.shape[1:] == (s, s, c) and len(buffer) >= n:
            return buffer[:n]
        return torch.empty((n, s, s, c), dtype=torch.uint8, pin_memory=pin)
