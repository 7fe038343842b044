"""`cnnlab filter` as a library call: read an image, apply a chain of kernels (and pooling), write the result.

Between chained kernels the values stay unclipped floats, as between two conv layers without an activation;
the output range rule (clip / abs / normalize) is applied once, at the end.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from cnnlab.arithmetic import conv_output_size
from cnnlab.data.images import SAMPLE_NAME, array_to_image, read_image, save_image
from cnnlab.errors import UsageError
from cnnlab.inspect.visualize import save_figure
from cnnlab.kernels import (
    Kernel,
    apply_kernel,
    explain_pixel,
    format_explanation,
    pool,
    read_kernel_file,
    resolve_kernel,
    to_display_range,
)


@dataclass
class FilterReport:
    """What a filter run did and wrote."""

    image: str
    in_shape: tuple[int, int, int]
    bits: int
    steps: list[str]
    out_shape: tuple[int, int, int]
    raw_min: float
    raw_max: float
    value_range: str
    output: str | None = None
    side_by_side: str | None = None
    explanations: list[str] = field(default_factory=list)
    explain_data: list[dict[str, Any]] = field(default_factory=list)

    def summary_lines(self) -> list[str]:
        """Human-readable lines for the CLI."""
        c, h, w = self.in_shape
        _oc, oh, ow = self.out_shape
        lines = [
            f"{self.image}: {w}x{h}, {c} channel(s), {self.bits}-bit -> {' -> '.join(self.steps)} -> "
            f"{ow}x{oh}; raw values {self.raw_min:g}..{self.raw_max:g}, output range: {self.value_range}"
        ]
        lines += [f"wrote {p}" for p in (self.output, self.side_by_side) if p]
        return lines

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"image": self.image, "in_shape": list(self.in_shape), "bits": self.bits, "steps": self.steps,
                "out_shape": list(self.out_shape), "raw_min": self.raw_min, "raw_max": self.raw_max,
                "value_range": self.value_range, "output": self.output, "side_by_side": self.side_by_side,
                "explain": self.explain_data}  # fmt: skip


def default_output(image: str, kernels: list[Kernel], pool_kind: str | None) -> Path:
    """`photo.jpg` + sharpen -> `photo_sharpen.png` in the current directory."""
    stem = "sample" if image == SAMPLE_NAME else Path(image).stem
    parts = [re.sub(r"[^A-Za-z0-9.-]+", "-", k.name) for k in kernels] + ([f"{pool_kind}pool"] if pool_kind else [])
    return Path(f"{stem}_{'_'.join(parts)}.png")


def run_filter(
    image: str,
    kernel_specs: list[str],
    *,
    out: str | None = None,
    gray: bool = False,
    padding: str = "zero",
    convolve: bool = False,
    value_range: str = "clip",
    side_by_side: bool = False,
    explain: tuple[int, int] | None = None,
    pool_kind: str | None = None,
    pool_size: int = 2,
    pool_stride: int | None = None,
) -> FilterReport:
    """Filter `image` with the kernels in order, then pool; write files unless only explaining."""
    kernels = [resolve_kernel(s, allow_files=True) for s in kernel_specs]  # the user's own files, on the CLI
    out_path = Path(out) if out else None
    if out_path is not None and not out_path.parent.exists():
        raise UsageError(f"--out {out}: directory {out_path.parent} does not exist")
    pixels, max_value = read_pixels(image, gray=gray)
    x = torch.from_numpy(pixels)  # (C, H, W) float32 in [0, max_value]
    original = x
    channels = ["gray"] if x.shape[0] == 1 else ["red", "green", "blue"]
    report = FilterReport(image, tuple(x.shape), 16 if max_value > 255 else 8, [], (0, 0, 0), 0.0, 0.0, value_range)
    for kernel in kernels:
        if explain is not None:
            _explain_kernel(report, x, kernel, explain, padding, convolve, channels)
        x = apply_kernel(x, kernel, padding, convolve)
        report.steps.append(f"{kernel.name}{' (convolve)' if convolve else ''}, {padding} padding")
    if pool_kind:
        if explain is not None:
            _explain_pool(report, x, pool_kind, pool_size, pool_stride or pool_size, explain, channels)
        x = pool(x, pool_kind, pool_size, pool_stride)
        report.steps.append(f"{pool_kind} pool {pool_size}x{pool_size} stride {pool_stride or pool_size}")
    report.out_shape = tuple(x.shape)
    report.raw_min, report.raw_max = float(x.min()) + 0.0, float(x.max()) + 0.0  # + 0.0: no -0 printed
    shown = to_display_range(x, max_value, value_range)
    if explain is None or out_path is not None:
        out_path = out_path or default_output(image, kernels, pool_kind)
        save_image(array_to_image(shown.numpy(), max_value), out_path)
        report.output = str(out_path)
        if side_by_side:
            pair = out_path.with_name(out_path.stem + "-side-by-side.png")
            title = " -> ".join(report.steps) + f" ({value_range})"
            plot_side_by_side(original.numpy(), shown.numpy(), max_value, title, pair)
            report.side_by_side = str(pair)
    return report


MATRIX_SUFFIXES = (".txt", ".csv", ".json", ".npy")


def read_pixels(image: str, gray: bool = False) -> tuple[np.ndarray, int]:
    """An image file, or a small grayscale picture written as a matrix of 0..255 values (.txt/.csv/.json/.npy)."""
    path = Path(image)
    if path.suffix.lower() not in MATRIX_SUFFIXES:
        return read_image(image, gray=gray)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    values = read_kernel_file(path)  # same reader as kernel files: rows of numbers
    return values.astype(np.float32)[None], 255


def _explain_kernel(
    report: FilterReport,
    x: torch.Tensor,
    kernel: Kernel,
    xy: tuple[int, int],
    padding: str,
    convolve: bool,
    channels: list[str],
) -> None:
    per_matrix = [explain_pixel(x, m, xy[0], xy[1], padding, convolve) for m in kernel.matrices]
    for c, name in enumerate(channels):
        parts = []
        for i, expl in enumerate(per_matrix):
            label = name if len(per_matrix) == 1 else f"{name}, {kernel.name} part {i + 1}"
            parts.append(format_explanation(expl[c], label, padding, convolve))
        if len(per_matrix) > 1:
            totals = [e[c].total + 0.0 for e in per_matrix]  # + 0.0: print 0, never -0
            mag = math.sqrt(sum(t * t for t in totals))
            parts.append(f"  magnitude = sqrt({' + '.join(f'({t:g})^2' for t in totals)}) = {mag:.6g}")
        report.explanations.append(f"[{kernel.name}] " + "\n".join(parts))
        report.explain_data += [
            {
                "kernel": kernel.name,
                "channel": name,
                "x": xy[0],
                "y": xy[1],
                "window": e[c].window.tolist(),
                "kernel_matrix": e[c].kernel.tolist(),
                "products": e[c].products.tolist(),
                "sum": e[c].total,
            }
            for e in per_matrix
        ]


def _explain_pool(
    report: FilterReport, x: torch.Tensor, kind: str, size: int, stride: int, xy: tuple[int, int], channels: list[str]
) -> None:
    px, py = xy
    out_h, out_w = conv_output_size(x.shape[1], size, stride), conv_output_size(x.shape[2], size, stride)
    if not (0 <= px < out_w and 0 <= py < out_h):
        raise UsageError(f"--explain {px},{py}: outside the {out_w}x{out_h} pooled output")
    r0, c0 = py * stride, px * stride
    for c, name in enumerate(channels):
        window = x[c, r0 : r0 + size, c0 : c0 + size].double().numpy() + 0.0  # + 0.0: -0.0 prints as 0
        value = float(window.max() if kind == "max" else window.mean()) + 0.0
        rows = "\n".join("    " + "  ".join(f"{v:g}" for v in row) for row in window)
        report.explanations.append(
            f"[{kind} pool] output pixel x={px}, y={py}, channel {name}: window rows {r0}..{r0 + size - 1}, "
            f"columns {c0}..{c0 + size - 1}\n{rows}\n  {kind} = {value:g}"
        )
        report.explain_data.append(
            {"kernel": f"{kind}pool", "channel": name, "x": px, "y": py, "window": window.tolist(), "sum": float(value)}
        )


def plot_side_by_side(original: np.ndarray, result: np.ndarray, max_value: int, title: str, path: Path) -> Path:
    """The lecture's picture: the original and the filtered image next to each other, titled."""

    def to_rgb(a: np.ndarray) -> np.ndarray:
        a = np.clip(a / max_value, 0, 1)
        return a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)

    h, w = original.shape[1:]
    rh, rw = result.shape[1:]
    fig = Figure(figsize=(10, max(2.5, 4.6 * h / max(w, 1)) + 0.7), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, img, label in ((axes[0], original, f"original ({w}x{h})"), (axes[1], result, f"result ({rw}x{rh})")):
        ax.imshow(
            to_rgb(img),
            cmap="gray" if img.shape[0] == 1 else None,
            vmin=0,
            vmax=1,
            interpolation="nearest" if max(img.shape[1:]) < 64 else "antialiased",
        )
        ax.set_title(label)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
