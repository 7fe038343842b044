"""Readers for the classic dataset file formats, straight into uint8 tensors: IDX (MNIST family) and CIFAR batches.

No per-sample work and no PIL: a file becomes one numpy buffer, checked, then viewed as (N, C, H, W).
"""

from __future__ import annotations

import codecs
import gzip
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnlab.errors import CnnlabError

# IDX type codes (third byte of the magic number) -> numpy dtype, big-endian as the format says.
IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
             0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}  # fmt: skip


def read_bytes(path: Path) -> bytes:
    """A file's bytes, gunzipped when it ends in .gz; damaged gzip data is a one-line error naming the file."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise CnnlabError(f"{path}: cannot read ({e})") from e


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (plain or .gz) into a numpy array of the shape its header gives."""
    data = read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_TYPES:
        magic = data[:4].hex() if len(data) >= 4 else f"{len(data)} bytes"
        raise CnnlabError(f"{path}: not an IDX file (magic number {magic}; expected 0000 then a type code and rank)")
    dtype, ndim = IDX_TYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CnnlabError(f"{path}: IDX header cut short ({len(data)} bytes for {ndim} dimensions)")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise CnnlabError(f"{path}: IDX header says {'x'.join(map(str, dims))} values but the file has "
                          f"{len(data) - header} data bytes (expected {expected - header})")  # fmt: skip
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def idx_images_and_labels(images_path: Path, labels_path: Path, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An (images, labels) IDX pair -> uint8 (N, 1, H, W) and int64 (N,), with counts and label range checked."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise CnnlabError(f"{images_path}: expected uint8 images of shape N x H x W, got {images.dtype} {images.shape}")
    if labels.ndim != 1:
        raise CnnlabError(f"{labels_path}: expected one label per image (rank 1), got shape {labels.shape}")
    if len(images) != len(labels):
        raise CnnlabError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path.name}")
    return torch.from_numpy(images.copy()).unsqueeze(1), _labels(labels, num_classes, labels_path)


def _labels(values: Any, num_classes: int, path: Path) -> torch.Tensor:
    labels = torch.as_tensor(np.asarray(values, dtype=np.int64))
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise CnnlabError(f"{path}: labels range {int(labels.min())}..{int(labels.max())}, "
                          f"expected 0..{num_classes - 1}")  # fmt: skip
    return labels


class _CifarUnpickler(pickle.Unpickler):
    """Unpickle CIFAR's python batches allowing only the numpy array machinery: never arbitrary code."""

    ALLOWED = frozenset({("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")})  # fmt: skip
    # _codecs.encode: how Python 3 writes bytes into protocol-2 pickles (str -> bytes, nothing more).

    def find_class(self, module: str, name: str) -> Any:
        """Resolve only the numpy names that a pickled array needs."""
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module == "_codecs":
            return codecs.encode
        return getattr(np, name) if module == "numpy" else _np_attr(name)


def _np_attr(name: str) -> Any:
    # CIFAR pickles name numpy.core.multiarray; numpy 2 moved it to numpy._core (and warns on the old path).
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    return getattr(multiarray, name)


def read_cifar_pickle(path: Path) -> dict[str, Any]:
    """Load one CIFAR python batch (a pickled dict) safely; keys come back as str."""
    data = read_bytes(path)
    try:
        obj = _CifarUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as e:  # a damaged pickle raises many types; all mean the same to the user
        raise CnnlabError(f"{path}: not a CIFAR python batch ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise CnnlabError(f"{path}: not a CIFAR python batch (holds a {type(obj).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A CIFAR batch file -> uint8 (N, 3, 32, 32) images and int64 labels."""
    batch = read_cifar_pickle(path)
    if "data" not in batch or label_key not in batch:
        raise CnnlabError(f"{path}: CIFAR batch without 'data' and '{label_key}' entries (has {sorted(batch)})")
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise CnnlabError(f"{path}: 'data' should be uint8 N x 3072, got {data.dtype} {data.shape}")
    labels = _labels(batch[label_key], num_classes, path)
    if len(labels) != len(data):
        raise CnnlabError(f"{path}: {len(labels)} labels for {len(data)} images")
    # Each row holds the red plane, then green, then blue, each 32x32 row-major: exactly (3, 32, 32).
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), labels


def cifar_names(path: Path, key: str) -> tuple[str, ...]:
    """Class names from a CIFAR meta file (batches.meta / meta)."""
    meta = read_cifar_pickle(path)
    if key not in meta:
        raise CnnlabError(f"{path}: CIFAR meta file without '{key}'")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[key])
