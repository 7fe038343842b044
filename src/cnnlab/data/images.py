"""Reading and writing image files strictly: bombs, truncation and non-images are errors, never warnings."""

from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from cnnlab.errors import CnnlabError, UsageError
from cnnlab.fileio import atomic_write_bytes

# Refuse images with more pixels than this (Pillow's own default limit, but as an error at 1x, not a warning).
MAX_IMAGE_PIXELS = 89_478_485
MAX_FLOAT_PIXEL = 65535  # float ('F') images: values above this have no 8- or 16-bit output to go to
SAMPLE_NAME = "sample"  # `cnnlab filter sample ...`: a real photo that ships with matplotlib
SAVE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF",
                ".webp": "WEBP"}  # fmt: skip


def sample_image_path() -> Path:
    """Grace Hopper's portrait (public domain, US Navy), shipped in matplotlib's sample data."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def resolve_image_path(path: str | os.PathLike[str]) -> Path:
    """The file for an IMAGE argument: the word `sample` means the bundled photo."""
    return sample_image_path() if str(path) == SAMPLE_NAME else Path(path)


def open_image(path: str | os.PathLike[str], draft: tuple[int, int] | None = None) -> Image.Image:
    """Open and fully decode an image, with EXIF orientation applied; one-line errors naming the file.

    `draft` lets JPEG decoding scale down by 2/4/8 in the DCT while staying at least that size (much faster).
    """
    path = resolve_image_path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory, not an image")
    if path.stat().st_size == 0:
        raise UsageError(f"{path}: empty file (0 bytes), not an image")
    if is_heif(path):
        enable_heif(path)
    return decode_image(path, str(path), draft)


# The brands of an ISO-BMFF 'ftyp' box that mean HEIF/HEIC (phones' photos), whatever the file is called.
HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}


def is_heif(path: Path) -> bool:
    """Whether the file is a HEIF/HEIC image, by its first 12 bytes."""
    try:
        with path.open("rb") as f:
            head = f.read(12)
    except OSError:
        return False  # decode_image names the real problem
    return head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS


def enable_heif(path: Path) -> None:
    """Let Pillow read HEIF through pillow-heif (the `heic` extra), or say which extra PATH needs."""
    try:
        import pillow_heif
    except ImportError:
        extra = "pip install 'cnnlab[heic]'"
        raise UsageError(f"{path}: a HEIC/HEIF photo; reading it needs the heic extra: {extra}") from None
    # Registered only when a file needs it (idempotent): uploads to `cnnlab explore` never reach this path.
    pillow_heif.register_heif_opener()


def decode_image(
    source: Path | io.BytesIO, label: str, draft: tuple[int, int] | None = None, max_pixels: int | None = None
) -> Image.Image:
    """Decode a file or in-memory bytes strictly (bomb limit, truncation, non-images are errors naming `label`).

    `max_pixels` lowers the bomb limit (explore takes smaller uploads); float images must hold finite numbers.
    """
    path = label
    limit = min(MAX_IMAGE_PIXELS, max_pixels or MAX_IMAGE_PIXELS)
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently padded with grey
    old_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                # Also checked here, before any pixel is decoded: warning filters are process-wide, so with threaded
                # decoding another thread leaving its catch_warnings() can remove ours, and a bomb would only warn.
                if img.width * img.height > limit:
                    raise Image.DecompressionBombError(f"{img.width}x{img.height} pixels")
                if draft is not None and img.format == "JPEG":
                    img.draft(img.mode, draft)
                img.load()
                img = ImageOps.exif_transpose(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise CnnlabError(f"{path}: refused: more than {limit:,} pixels (decompression bomb limit)") from e
    except UnidentifiedImageError as e:
        raise UsageError(f"{path}: not an image, or a format Pillow cannot read") from e
    except PermissionError as e:
        raise UsageError(f"{path}: permission denied") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise CnnlabError(f"{path}: damaged or truncated image ({e})") from e
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit
    if img.width == 0 or img.height == 0:
        raise CnnlabError(f"{path}: image has no pixels")
    if img.mode == "F" and not np.isfinite(np.asarray(img)).all():
        raise UsageError(f"{path}: float image with NaN or infinite pixel values")
    return img


GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})  # modes without colour


def eight_bit(img: Image.Image, gray: bool) -> Image.Image:
    """A decoded image -> 8-bit L (`gray`) or RGB, as training stores it.

    16-bit and float grayscale are scaled to their range rather than clipped at 255; palettes go through RGBA (they
    may carry transparency, and Pillow advises it); alpha is dropped, as torchvision's loader does. A float image
    holding NaN or infinite values has no 8-bit version: a UsageError.
    """
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float32)
        if not np.isfinite(arr).all():  # a float TIFF can hold NaN/inf
            raise UsageError("floating-point image with NaN or infinite pixel values")
        top = 65535.0 if img.mode != "F" else max(1.0, float(arr.max()))
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8))
    elif img.mode == "P":
        img = img.convert("RGBA")
    return img.convert("L" if gray else "RGB")


def image_to_array(img: Image.Image, gray: bool = False) -> tuple[np.ndarray, int]:
    """Pixels as float32 (C, H, W) in [0, max_value], and max_value (255 or 65535); alpha is dropped."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.array(img, dtype=np.float32)  # a writable copy: torch.from_numpy warns on read-only arrays
        # Pillow's 'I' mode holds 32-bit ints; from 16-bit PNG/TIFF its values are 0..65535.
        return arr[None], 65535
    if mode == "F":
        arr = np.array(img, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise UsageError("float image with NaN or infinite pixel values")
        top = float(arr.max()) if arr.size else 1.0
        if top > MAX_FLOAT_PIXEL:
            raise UsageError(f"float image with values up to {top:g}: at most {MAX_FLOAT_PIXEL:,} is read")
        return arr[None], max(1, math.ceil(top))
    if gray or mode in ("1", "L", "LA"):
        arr = np.asarray(img.convert("L"), dtype=np.float32)
        return arr[None], 255
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    return arr.transpose(2, 0, 1).copy(), 255


def read_image(path: str | os.PathLike[str], gray: bool = False) -> tuple[np.ndarray, int]:
    """Read an image file as float32 (C, H, W) pixels in [0, max_value] and max_value."""
    img = open_image(path)
    try:
        return image_to_array(img, gray=gray)
    except UsageError as e:
        raise UsageError(f"{resolve_image_path(path)}: {e}") from None


def array_to_image(arr: np.ndarray, max_value: int) -> Image.Image:
    """(C, H, W) values already in [0, max_value] -> a Pillow image (8-bit L/RGB, or 16-bit grayscale)."""
    if arr.shape[0] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got {arr.shape[0]}")
    if max_value > 255:
        if arr.shape[0] == 1:
            return Image.fromarray(np.rint(arr[0]).astype(np.uint16))  # mode I;16
        # Pillow cannot hold 16-bit colour: write 8 bits per channel.
        arr, max_value = arr * (255.0 / max_value), 255
    data = np.rint(arr).clip(0, 255).astype(np.uint8)
    return Image.fromarray(data[0]) if data.shape[0] == 1 else Image.fromarray(data.transpose(1, 2, 0))


def save_image(img: Image.Image, path: str | os.PathLike[str]) -> Path:
    """Write an image atomically; the format comes from the file extension."""
    path = Path(path)
    fmt = SAVE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(f"{path}: unknown image extension; use one of {', '.join(sorted(SAVE_FORMATS))}")
    if fmt == "JPEG" and img.mode == "I;16":
        img = Image.fromarray((np.asarray(img, dtype=np.float32) / 257.0).round().astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    if not path.parent.exists():
        raise UsageError(f"{path}: directory {path.parent} does not exist")
    return atomic_write_bytes(path, buf.getvalue())
