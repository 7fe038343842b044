"""Image kernels: named and custom, applied by cross-correlation exactly as nn.Conv2d does, and explained.

Cross-correlation: out[y, x] = sum_{i,j} in[y + i, x + j] * k[i, j]. True convolution flips the kernel first;
for symmetric kernels (blur, Laplacian) the two are equal, for Sobel and emboss they differ in sign/direction.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cnnlab.errors import UsageError, unknown_name

if TYPE_CHECKING:  # torch is imported by the functions that filter images: `cnnlab kernels` lists without it
    import torch

PADDINGS = ("zero", "reflect", "replicate", "circular", "valid")
_TORCH_PAD = {"zero": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}
MAX_KERNEL_SIDE = 255  # rows and columns of any kernel: typed, from a file, gaussian:N:S or box:N
SIGMA_RANGE = (0.01, 1000.0)  # gaussian:N:S, pixels; below 0.01 the Gaussian is the identity, above 1000 a box
# Work bound of one kernel application: channels x output pixels x kernel area multiply-adds (x matrices for a
# composite). 2e10 is about 7 s on 2 CPU cores (~3e9 multiply-adds/s for large kernels); `explore` uses less.
MAX_KERNEL_WORK = 2 * 10**10
KERNEL_FILE_SUFFIXES = (".npy", ".json", ".txt", ".csv")
MAX_KERNEL_FILE_BYTES = 16 * 2**20  # a 255x255 matrix as text is ~1 MB; anything far larger is not a kernel


def short(text: object, limit: int = 40) -> str:
    """User input quoted for an error message: an escaped prefix of at most `limit` characters, never all of it."""
    s = str(text)
    if len(s) <= limit:
        return repr(s)
    return f"{s[:limit]!r}... ({len(s):,} characters)"


@dataclass(frozen=True)
class Kernel:
    """A named kernel: one matrix, or several combined as a gradient magnitude sqrt(sum of squares)."""

    name: str
    description: str
    matrices: tuple[np.ndarray, ...]

    @property
    def matrix(self) -> np.ndarray:
        """The (first) matrix, float64 (kh, kw)."""
        return self.matrices[0]

    @property
    def is_composite(self) -> bool:
        """True for magnitude kernels built from several matrices (e.g. Sobel)."""
        return len(self.matrices) > 1


def _k(rows: Sequence[Sequence[float]], scale: float = 1.0) -> np.ndarray:
    return np.asarray(rows, dtype=np.float64) * scale


_BINOMIAL5 = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]).astype(np.float64)
_SOBEL_X = _k([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]])
_PREWITT_X = _k([[-1, 0, 1], [-1, 0, 1], [-1, 0, 1]])
_SCHARR_X = _k([[-3, 0, 3], [-10, 0, 10], [-3, 0, 3]])
_UNSHARP = -_BINOMIAL5 / 256.0
_UNSHARP[2, 2] = 476.0 / 256.0  # 2 * identity - gaussian5: the image plus its difference from a blur

_NAMED: dict[str, Kernel] = {}


def _register(name: str, description: str, *matrices: np.ndarray) -> None:
    _NAMED[name] = Kernel(name, description, tuple(m.copy() for m in matrices))


_register(
    "identity", "returns the image unchanged: 1 at the centre, 0 elsewhere", _k([[0, 0, 0], [0, 1, 0], [0, 0, 0]])
)
_register(
    "sharpen",
    "sharpen with the 4 neighbours: 5 at the centre, -1 above, below, left, right",
    _k([[0, -1, 0], [-1, 5, -1], [0, -1, 0]]),
)
_register(
    "sharpen8",
    "sharpen with all 8 neighbours: 9 at the centre, -1 around (the lecture's kernel)",
    _k([[-1, -1, -1], [-1, 9, -1], [-1, -1, -1]]),
)
_register("box-blur", "3x3 mean: every pixel becomes the average of its neighbourhood", _k(np.ones((3, 3)), 1 / 9))
_register("box-blur5", "5x5 mean", _k(np.ones((5, 5)), 1 / 25))
_register("gaussian", "3x3 Gaussian blur (binomial 1-2-1, sigma ~0.85)", _k([[1, 2, 1], [2, 4, 2], [1, 2, 1]], 1 / 16))
_register("gaussian5", "5x5 Gaussian blur (binomial 1-4-6-4-1, sigma ~1.0)", _BINOMIAL5 / 256.0)
_register(
    "laplacian",
    "edge detection, 4-neighbour Laplacian: -4 at the centre, 1 at the 4 neighbours",
    _k([[0, 1, 0], [1, -4, 1], [0, 1, 0]]),
)
_register(
    "laplacian8",
    "edge detection, 8-neighbour Laplacian: -8 at the centre, 1 around",
    _k([[1, 1, 1], [1, -8, 1], [1, 1, 1]]),
)
_register(
    "outline",
    "outline: 8 at the centre, -1 around (negated 8-neighbour Laplacian)",
    _k([[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]]),
)
_register("sobel-x", "horizontal gradient (responds to vertical edges), Sobel", _SOBEL_X)
_register("sobel-y", "vertical gradient (responds to horizontal edges), Sobel", _SOBEL_X.T)
_register("sobel", "Sobel gradient magnitude sqrt(sobel-x^2 + sobel-y^2) (composite)", _SOBEL_X, _SOBEL_X.T)
_register("prewitt-x", "horizontal gradient, Prewitt (uniform weights)", _PREWITT_X)
_register("prewitt-y", "vertical gradient, Prewitt", _PREWITT_X.T)
_register("scharr-x", "horizontal gradient, Scharr (better rotational symmetry)", _SCHARR_X)
_register("scharr-y", "vertical gradient, Scharr", _SCHARR_X.T)
_register("emboss", "emboss: light from the top left, relief look", _k([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]]))
_register("unsharp-mask", "5x5 unsharp masking: image + (image - Gaussian blur)", _UNSHARP)


def list_kernels() -> list[str]:
    """Names of the named kernels, in the order they are described."""
    return list(_NAMED)


def gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """A normalised size x size Gaussian with standard deviation sigma (pixels)."""
    lo, hi = SIGMA_RANGE
    if not (1 <= size <= MAX_KERNEL_SIDE and lo <= sigma <= hi):
        raise UsageError(
            f"gaussian kernel needs size 1..{MAX_KERNEL_SIDE} and sigma {lo:g}..{hi:g}, "
            f"got size {size}, sigma {sigma:g}"
        )
    ax = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(ax**2) / (2 * sigma**2))
    k = np.outer(g, g)
    return k / k.sum()


def parse_matrix(text: str, *, lines: bool = False) -> np.ndarray:
    """Parse an inline kernel: rows separated by ';' or newlines, values by ',' or spaces; '1/9' is allowed.

    Every row must hold numbers ('1;;2' is an error, not a 2x1 matrix). With `lines=True` (a kernel file) blank
    lines and lines starting with '#' are skipped.
    """
    label = short(text)
    rows: list[str] = []
    for line in text.strip().split("\n"):
        if lines and (not line.strip() or line.strip().startswith("#")):
            continue
        for row in line.split(";"):
            if not row.strip():
                raise UsageError(f"kernel {label}: row {len(rows) + 1} is empty (rows are separated by ';' or lines)")
            rows.append(row)
    values: list[list[float]] = []
    for row in rows:
        values.append([])
        for v in re.split(r"[,\s]+", row.strip()):
            if v:
                values[-1].append(_number(v, label))
    return _check_matrix(values, label)


def _number(text: str, label: str) -> float:
    """One matrix entry: a decimal or a fraction such as 1/9, finite.

    Plain float arithmetic, not fractions.Fraction: Fraction('1e99999999') builds a 10**99999999 integer (minutes).
    """
    num, slash, den = text.partition("/")
    try:
        value = float(num) / float(den) if slash else float(text)
    except (ValueError, ZeroDivisionError, OverflowError):
        raise UsageError(f"kernel {label}: not a matrix of numbers ({short(text, 20)} is not a number)") from None
    if not math.isfinite(value):
        raise UsageError(f"kernel {label}: values must be finite numbers")
    return value


def _check_matrix(values: object, label: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except RecursionError:  # a JSON list nested thousands deep
        raise UsageError(f"kernel {label}: nested too deeply; expected a list of rows of numbers") from None
    except (ValueError, TypeError, OverflowError):
        raise UsageError(f"kernel {label}: rows have different lengths, or values that are not numbers") from None
    if arr.ndim == 1 and arr.size:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.size == 0:
        raise UsageError(f"kernel {label}: expected a non-empty 2-D matrix, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise UsageError(f"kernel {label}: values must be finite numbers")
    if max(arr.shape) > MAX_KERNEL_SIDE:
        raise UsageError(
            f"kernel {label}: {arr.shape[0]}x{arr.shape[1]} is too large (at most {MAX_KERNEL_SIDE}x{MAX_KERNEL_SIDE})"
        )
    return arr


def read_kernel_file(path: Path) -> np.ndarray:
    """A kernel from .npy (no pickle), .json (a list of rows or {"kernel": rows}) or text (one row per line)."""
    label = short(path, 200)
    try:
        if path.stat().st_size > MAX_KERNEL_FILE_BYTES:
            raise UsageError(f"{label}: {path.stat().st_size:,} bytes is too large for a kernel file")
        if path.suffix.lower() == ".npy":
            return _check_matrix(np.load(path, allow_pickle=False), label)
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{label}: cannot read kernel file ({type(e).__name__}: {short(e, 80)})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except RecursionError:
            raise UsageError(f"{label}: JSON nested too deeply; expected a list of rows of numbers") from None
        except ValueError as e:
            raise UsageError(f"{label}: not valid JSON ({short(e, 80)})") from None
        if isinstance(data, dict):
            data = data.get("kernel")
        return _check_matrix(data, label)
    return parse_matrix(text, lines=True)


def _looks_like_path(spec: str) -> bool:
    """Text (that is not a matrix) naming a file: a path separator, '~', or a kernel file suffix."""
    return spec.startswith("~") or "/" in spec or "\\" in spec or spec.lower().endswith(KERNEL_FILE_SUFFIXES)


def _is_file(path: Path) -> bool:
    """Path.is_file() that says False for names the OS refuses (too long, NUL bytes)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _parametrised(spec: str) -> Kernel | None:
    """`gaussian:SIZE:SIGMA` or `box:SIZE`, with every parameter capped; None for any other text."""
    kind, colon, params = spec.partition(":")
    if kind not in ("gaussian", "box") or not colon:
        return None
    form = "gaussian:SIZE:SIGMA such as gaussian:7:1.5" if kind == "gaussian" else "box:SIZE such as box:5"
    m = re.fullmatch(r"(\d{1,6}):([0-9.eE+-]{1,32})" if kind == "gaussian" else r"(\d{1,6})", params)
    try:
        size = int(m.group(1)) if m else 0
        sigma = float(m.group(2)) if m and kind == "gaussian" else 1.0
    except ValueError:
        m = None
    if m is None:
        raise UsageError(f"kernel {short(spec)}: expected {form}")
    if not 1 <= size <= MAX_KERNEL_SIDE:
        raise UsageError(f"kernel {short(spec)}: size must be 1..{MAX_KERNEL_SIDE}")
    if kind == "box":
        return Kernel(spec, f"{size}x{size} mean", (np.full((size, size), 1.0 / size**2),))
    lo, hi = SIGMA_RANGE
    if not lo <= sigma <= hi:
        raise UsageError(f"kernel {short(spec)}: sigma must be {lo:g}..{hi:g} pixels")
    return Kernel(spec, f"{size}x{size} Gaussian blur, sigma {sigma:g}", (gaussian_kernel(size, sigma),))


def resolve_kernel(spec: str, *, allow_files: bool = False) -> Kernel:
    """A named kernel, `gaussian:SIZE:SIGMA`, `box:SIZE`, an inline matrix like '0,-1,0;...', or (with
    `allow_files=True`, as `cnnlab filter` does) a kernel file.

    Without `allow_files` no path is ever opened or even looked up: the text is a name, parameters or numbers.
    """
    spec = spec.strip()
    if spec in _NAMED:
        return _NAMED[spec]
    kernel = _parametrised(spec)
    if kernel is not None:
        return kernel
    if allow_files:
        path = Path(spec)
        if path.suffix.lower() in KERNEL_FILE_SUFFIXES or _is_file(path):
            if not _is_file(path):
                raise UsageError(f"{short(spec, 200)}: no such kernel file")
            return Kernel(path.name, f"custom kernel from {path}", (read_kernel_file(path),))
    if (re.search(r"[\d.]", spec) and re.fullmatch(r"[\d\s,;./eE+-]+", spec)) or (
        re.search(r"\d", spec) and re.search(r"[,;]", spec)  # numbers in rows with a typo: say which value is bad
    ):
        return Kernel("custom", "custom kernel", (parse_matrix(spec),))
    if not allow_files and _looks_like_path(spec):
        raise UsageError(
            f"kernel {short(spec)}: kernel files are not read here; give a named kernel, gaussian:SIZE:SIGMA, "
            "box:SIZE or a matrix like '0,-1,0;-1,5,-1;0,-1,0'"
        )
    name = spec if len(spec) <= 40 else spec[:40] + "..."
    raise unknown_name("kernel", name, _NAMED, "see `cnnlab kernels`; or give a matrix like '0,-1,0;-1,5,-1;0,-1,0'")


def kernel_work(shape: Sequence[int], kernel: Kernel, padding: str = "zero") -> int:
    """Multiply-adds to apply `kernel` to a (C, H, W) image: channels x output pixels x kernel area, per matrix."""
    c, h, w = (int(v) for v in shape[-3:])
    total = 0
    for m in kernel.matrices:
        kh, kw = m.shape
        oh, ow = (max(0, h - kh + 1), max(0, w - kw + 1)) if padding == "valid" else (h, w)
        total += c * oh * ow * kh * kw
    return total


def check_work(shape: Sequence[int], kernel: Kernel, padding: str = "zero", limit: int = MAX_KERNEL_WORK) -> None:
    """Refuse a kernel application that would need more than `limit` multiply-adds (named one-line error)."""
    work = kernel_work(shape, kernel, padding)
    if work > limit:
        c, h, w = shape[-3:]
        raise UsageError(
            f"kernel {short(kernel.name)} on a {w}x{h} image with {c} channel(s) needs {work:.2g} multiply-adds, "
            f"over the limit of {limit:.2g} per kernel; use a smaller kernel or a smaller image"
        )


def same_padding(kh: int, kw: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding that keeps the size; an even kernel puts the extra pixel right/bottom."""
    return ((kw - 1) // 2, kw - 1 - (kw - 1) // 2, (kh - 1) // 2, kh - 1 - (kh - 1) // 2)


def pad_image(x: torch.Tensor, kh: int, kw: int, padding: str) -> torch.Tensor:
    """Pad (C, H, W) or (N, C, H, W) for a kh x kw kernel; `valid` pads nothing."""
    import torch.nn.functional as F

    if padding not in PADDINGS:
        raise UsageError(f"--padding must be one of {', '.join(PADDINGS)}, got {short(padding)}")
    if padding == "valid":
        return x
    pads = same_padding(kh, kw)
    if padding == "reflect" and (max(pads[:2]) >= x.shape[-1] or max(pads[2:]) >= x.shape[-2]):
        raise UsageError(
            f"--padding reflect needs an image larger than the kernel's half-size, "
            f"got {x.shape[-2]}x{x.shape[-1]} with a {kh}x{kw} kernel"
        )
    squeeze = x.dim() == 3
    x4 = x[None] if squeeze else x
    out = F.pad(x4, pads, mode=_TORCH_PAD[padding])
    return out[0] if squeeze else out


_CV2_BORDERS = {
    "zero": "BORDER_CONSTANT",
    "valid": "BORDER_CONSTANT",
    "reflect": "BORDER_REFLECT_101",
    "replicate": "BORDER_REPLICATE",
}  # torch's reflect is OpenCV's reflect-101 (the edge not repeated)
CV2_MAX_SIDE = 9  # from 11x11 up, OpenCV's filter2D goes through a DFT (other rounding): torch's conv there


def _opencv_correlate(image: torch.Tensor, k: torch.Tensor, padding: str) -> torch.Tensor | None:
    """OpenCV's filter2D where it computes exactly this correlation, else None: odd kernels up to CV2_MAX_SIDE on
    float32 CPU images, zero / reflect / replicate borders or none (valid). Per channel, (C, H, W) -> (C, H', W').

    Why: torch's depthwise conv2d is a general convolution; on a 12 MP photo and a 5x5 kernel it took 0.22-0.7 s on
    2 cores, OpenCV's SIMD stencil 0.04-0.12 s for the same output (benchmarks/filter_speed.py, issue #19).
    """
    import torch

    kh, kw = k.shape
    h, w = image.shape[-2:]
    usable = (
        image.dtype == torch.float32
        and image.device.type == "cpu"
        and not image.requires_grad
        and kh % 2 == 1
        and kw % 2 == 1
        and max(kh, kw) <= CV2_MAX_SIDE
        and padding in _CV2_BORDERS
        and h > kh
        and w > kw
    )  # fmt: skip  (small images: torch's path and its own error messages)
    if not usable:
        return None
    try:
        import cv2
    except ImportError:  # an install without OpenCV still filters, through torch
        return None
    planes = image.detach().contiguous().numpy()  # (C, H, W): each channel a contiguous plane, no copy
    out = np.empty_like(planes)
    border = getattr(cv2, _CV2_BORDERS[padding])
    matrix = np.ascontiguousarray(k.numpy(), dtype=np.float32)
    for c in range(planes.shape[0]):
        cv2.filter2D(planes[c], cv2.CV_32F, matrix, dst=out[c], borderType=border)
    result = torch.from_numpy(out)
    if padding == "valid":  # OpenCV pads; the valid part is the centre
        result = result[:, kh // 2 : h - kh // 2, kw // 2 : w - kw // 2].contiguous()
    return result


def correlate(
    image: torch.Tensor, matrix: np.ndarray | torch.Tensor, padding: str = "zero", convolve: bool = False
) -> torch.Tensor:
    """Cross-correlate every channel of a (C, H, W) image with one (kh, kw) kernel: (C, H', W').

    Same arithmetic as nn.Conv2d with the kernel as weight; `convolve=True` flips the kernel (true convolution).
    """
    import torch
    import torch.nn.functional as F

    k = torch.as_tensor(np.asarray(matrix), dtype=image.dtype)
    if convolve:
        k = k.flip(0, 1)
    kh, kw = k.shape
    if padding == "valid" and (kh > image.shape[-2] or kw > image.shape[-1]):
        raise UsageError(
            f"a {kh}x{kw} kernel does not fit a {image.shape[-2]}x{image.shape[-1]} image "
            f"without padding (--padding valid)"
        )
    fast = _opencv_correlate(image, k, padding)
    if fast is not None:
        return fast
    c = image.shape[0]
    # One depthwise conv (groups=C) in channels-last layout: on CPU this is ~4x faster than treating channels as
    # a batch of 1-channel images (0.22 s vs 0.78 s for a 3x3000x4000 image and a 5x5 kernel on 2 cores).
    x = pad_image(image, kh, kw, padding)[None].contiguous(memory_format=torch.channels_last)  # (1, C, H+, W+)
    weight = k[None, None].expand(c, 1, kh, kw).contiguous()  # (C, 1, kh, kw)
    return F.conv2d(x, weight, groups=c)[0].contiguous()  # (C, H', W')


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every value is finite. A finite sum says so at once (an inf or NaN anywhere would make it inf or NaN):
    8 ms on a 12 MP photo, where isfinite(x).all() takes 0.2 s on 2 cores; a sum that overflows is checked exactly."""
    import torch

    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def apply_kernel(
    image: torch.Tensor,
    kernel: Kernel,
    padding: str = "zero",
    convolve: bool = False,
    *,
    max_work: int = MAX_KERNEL_WORK,
) -> torch.Tensor:
    """Apply a (possibly composite) kernel to a (C, H, W) float image; composites give sqrt(sum of squares).

    Refused (UsageError) when it would take more than `max_work` multiply-adds (see `check_work`), or when the
    result leaves the image's float range (weights like 1e300 overflow 32-bit floats: inf, then NaN).
    """
    import torch

    check_work(image.shape, kernel, padding, max_work)
    outs = [correlate(image, m, padding, convolve) for m in kernel.matrices]
    out = outs[0] if len(outs) == 1 else torch.sqrt(sum(o * o for o in outs))
    if image.is_floating_point() and _all_finite(image) and not _all_finite(out):
        raise UsageError(
            f"kernel {short(kernel.name)}: the result overflows {str(out.dtype).removeprefix('torch.')} "
            f"(beyond {torch.finfo(out.dtype).max:.2g}); use smaller weights"
        )
    return out


def pool(image: torch.Tensor, kind: str, size: int, stride: int | None = None) -> torch.Tensor:
    """Max or average pooling of a (C, H, W) image, like nn.MaxPool2d / nn.AvgPool2d (no padding)."""
    import torch.nn.functional as F

    stride = stride or size
    if kind not in ("max", "avg"):
        raise UsageError(f"--pool must be max or avg, got {short(kind)}")
    if size < 1 or stride < 1:
        raise UsageError(f"--size and --stride must be at least 1, got {size} and {stride}")
    if size > image.shape[-1] or size > image.shape[-2]:
        raise UsageError(f"a {size}x{size} pooling window does not fit a {image.shape[-2]}x{image.shape[-1]} image")
    fn = F.max_pool2d if kind == "max" else F.avg_pool2d
    return fn(image[None], size, stride)[0]


def to_display_range(x: torch.Tensor, max_value: int, mode: str = "clip") -> torch.Tensor:
    """Map filter output to [0, max_value]: `clip` cuts, `abs` takes |x| then cuts, `normalize` rescales min..max."""
    import torch

    if mode == "clip":
        return x.clamp(0, max_value)
    if mode == "abs":
        return x.abs().clamp(0, max_value)
    if mode == "normalize":
        lo, hi = x.min(), x.max()
        if float(hi - lo) == 0.0:
            return torch.zeros_like(x)
        return (x - lo) / (hi - lo) * max_value
    raise UsageError(f"unknown output range mode {short(mode)}; use clip, abs or normalize")


@dataclass
class PixelExplanation:
    """The weighted sum behind one output pixel of one channel."""

    channel: int
    x: int
    y: int
    window: np.ndarray  # (kh, kw) input values under the kernel (padding values included)
    padded: np.ndarray  # (kh, kw) bool: True where the value comes from padding, not the image
    origin: tuple[int, int]  # input (row, col) of window[0, 0]; negative or beyond the edge inside padding
    kernel: np.ndarray  # (kh, kw), already flipped for --convolve
    products: np.ndarray  # window * kernel
    total: float


def explain_pixel(
    image: torch.Tensor, matrix: np.ndarray, x: int, y: int, padding: str = "zero", convolve: bool = False
) -> list[PixelExplanation]:
    """For output pixel (x=column, y=row), every channel's neighbourhood, kernel, products and sum."""
    import torch

    k = np.asarray(matrix, dtype=np.float64)
    if convolve:
        k = k[::-1, ::-1]
    kh, kw = k.shape
    h, w = image.shape[-2:]
    left, _, top, _ = same_padding(kh, kw) if padding != "valid" else (0, 0, 0, 0)
    out_h, out_w = (h - kh + 1, w - kw + 1) if padding == "valid" else (h, w)
    if not (0 <= x < out_w and 0 <= y < out_h):
        raise UsageError(f"--explain {x},{y}: outside the {out_w}x{out_h} output (x is the column, y the row, from 0)")
    padded_img = pad_image(image.double(), kh, kw, padding).numpy()
    # Mark which window cells come from padding by padding an all-ones mask with zeros.
    ones = torch.ones(1, h, w, dtype=torch.float64)
    inside = pad_image(ones, kh, kw, "zero" if padding != "valid" else "valid").numpy()[0]
    rows, cols = slice(y, y + kh), slice(x, x + kw)
    result = []
    for c in range(image.shape[0]):
        window = padded_img[c, rows, cols] + 0.0  # + 0.0 turns -0.0 (from an earlier kernel) into 0.0
        products = window * k + 0.0
        result.append(
            PixelExplanation(
                c, x, y, window, inside[rows, cols] == 0, (y - top, x - left), k, products, float(products.sum())
            )
        )
    return result


def _num(v: float) -> str:
    v = float(v) + 0.0  # -0.0 + 0.0 is +0.0: a product like 0 x -1 prints as 0, not -0
    return f"{v:g}" if v.is_integer() or abs(v) >= 1e-3 else f"{v:.3g}"


def format_matrix(m: np.ndarray, mark: np.ndarray | None = None) -> list[str]:
    """Right-aligned rows of a matrix; cells flagged in `mark` get a trailing '*'."""
    cells = [
        [_num(v) + ("*" if mark is not None and mark[i, j] else "") for j, v in enumerate(row)]
        for i, row in enumerate(m)
    ]
    width = max(len(c) for row in cells for c in row)
    return ["  ".join(c.rjust(width) for c in row) for row in cells]


def format_explanation(e: PixelExplanation, channel_name: str, padding: str, convolve: bool) -> str:
    """The lecture's layout: neighbourhood and kernel side by side, one line per product, then the total."""
    op = "convolution (kernel flipped)" if convolve else "cross-correlation, as nn.Conv2d"
    lines = [f"output pixel x={e.x}, y={e.y}, channel {channel_name}: {op}, {padding} padding"]
    neigh = format_matrix(e.window, e.padded)
    kern = format_matrix(e.kernel)
    wn = max(len(s) for s in neigh)
    lines.append(f"  {'neighbourhood'.ljust(wn)}    kernel")
    lines += [f"  {a.ljust(wn)}    {b}" for a, b in zip(neigh, kern, strict=True)]
    if e.padded.any():
        lines.append("  (* = value from padding, outside the image)")
    r0, c0 = e.origin
    for i in range(e.kernel.shape[0]):
        for j in range(e.kernel.shape[1]):
            lines.append(
                f"  in[{r0 + i},{c0 + j}] = {_num(e.window[i, j]):>8} x {_num(e.kernel[i, j]):>8} "
                f"= {_num(e.products[i, j]):>10}"
            )
    lines.append(f"  sum = {_num(e.total)}")
    return "\n".join(lines)


def kernel_sum(kernel: Kernel) -> float:
    """Sum of the (first) matrix: 1 keeps brightness, 0 gives an edge/gradient response."""
    return float(kernel.matrix.sum())


def describe_gain(kernel: Kernel) -> str:
    """Why an output may leave [0, 255]: negative weights or a sum other than 1."""
    s = kernel_sum(kernel)
    neg = (kernel.matrix < 0).any()
    if kernel.is_composite:
        return "magnitude >= 0, may exceed the input range"
    if math.isclose(s, 1.0) and not neg:
        return "weights >= 0 summing to 1: output stays in range"
    if math.isclose(s, 0.0, abs_tol=1e-12):
        return "weights sum to 0: flat regions give 0, edges give +/- values"
    return f"weights sum to {s:g}" + (" with negative weights: output can leave the input range" if neg else "")
