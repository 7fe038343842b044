"""Speed and agreement of `cnnlab filter` on a 4000x3000 RGB photo with 5x5 kernels, vs SciPy and OpenCV.

    python benchmarks/filter_speed.py      (OpenCV is optional: pip install opencv-python-headless)

The photo is matplotlib's sample portrait, enlarged to 4000x3000. Times are the best of 5 runs of the kernel
operation alone (the image already decoded, float32, 3 channels); agreement is the largest absolute difference
from each peer with the same border mode, before and after rounding to 8-bit.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.ndimage as ndi
import torch
from _common import machine_line, write_section
from PIL import Image

from cnnlab.data.images import sample_image_path
from cnnlab.kernels import apply_kernel, resolve_kernel

try:
    import cv2
except ImportError:  # optional peer
    cv2 = None

SCIPY_MODE = {"zero": "constant", "reflect": "mirror", "replicate": "nearest", "circular": "wrap"}
CV2_BORDER = {"zero": "BORDER_CONSTANT", "reflect": "BORDER_REFLECT_101", "replicate": "BORDER_REPLICATE"}


def best_of(fn, n: int = 5) -> tuple[float, object]:
    """Smallest wall time of n calls (after one warm-up) and the last result."""
    out = fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    """Measure and write the section of RESULTS.md."""
    photo = Image.open(sample_image_path()).convert("RGB").resize((4000, 3000), Image.BICUBIC)
    hwc = np.asarray(photo, dtype=np.float32)  # (3000, 4000, 3)
    chw = torch.from_numpy(hwc.transpose(2, 0, 1).copy())  # (3, 3000, 4000)
    rows = []
    for name in ("gaussian5", "unsharp-mask", "gaussian:5:1.3"):
        k = resolve_kernel(name)
        k32 = k.matrix.astype(np.float32)
        for padding in ("zero", "reflect", "replicate", "circular"):
            t_ours, ours = best_of(lambda k=k, p=padding: apply_kernel(chw, k, p))
            ours = ours.numpy()
            t_sp, ref = best_of(
                lambda p=padding, k32=k32: np.stack(
                    [ndi.correlate(hwc[..., c], k32, mode=SCIPY_MODE[p], cval=0.0) for c in range(3)]
                )
            )
            diff_sp = float(np.abs(ours - ref).max())
            round_sp = int(np.abs(np.rint(ours.clip(0, 255)) - np.rint(ref.clip(0, 255))).max())
            row = [name, padding, f"{t_ours:.3f}", f"{t_sp:.3f}", f"{t_sp / t_ours:.1f}x"]
            row.append(f"{diff_sp:.1e} / {round_sp}")
            if cv2 is not None and padding in CV2_BORDER:
                border = getattr(cv2, CV2_BORDER[padding])
                t_cv, ref_cv = best_of(lambda b=border, k32=k32: cv2.filter2D(hwc, cv2.CV_32F, k32, borderType=b))
                ref_cv = ref_cv.transpose(2, 0, 1)
                diff_cv = float(np.abs(ours - ref_cv).max())
                round_cv = int(np.abs(np.rint(ours.clip(0, 255)) - np.rint(ref_cv.clip(0, 255))).max())
                row += [f"{t_cv:.3f}", f"{t_cv / t_ours:.2f}x", f"{diff_cv:.1e} / {round_cv}"]
            else:
                row += ["n/a (no wrap border)" if cv2 is not None else "not installed", "", ""]
            rows.append(row)
            print(" | ".join(row))
    header = (
        "| kernel | padding | cnnlab s | SciPy s | SciPy / cnnlab | max diff vs SciPy (raw / 8-bit) | "
        "OpenCV s | OpenCV / cnnlab | max diff vs OpenCV (raw / 8-bit) |\n|" + " --- |" * 9
    )
    table = "\n".join("| " + " | ".join(r) + " |" for r in rows)
    versions = f"SciPy {__import__('scipy').__version__}" + (f", OpenCV {cv2.__version__}" if cv2 else "")
    body = f"""4000x3000 RGB photo, 5x5 kernels, the kernel operation alone (decoded float32 image in memory),
best of 5.
cnnlab: `apply_kernel`, which hands zero, reflect and replicate borders to OpenCV's `filter2D` per channel (where
it computes the same correlation) and computes circular ones as one depthwise `conv2d` (groups = channels) in
channels-last layout. Peers: `scipy.ndimage.correlate` per channel (float32) and `cv2.filter2D` (float32, 3
channels), each with the same border mode. A ratio above 1 means cnnlab is faster.
Command: `python benchmarks/filter_speed.py`.

Machine: {machine_line()}; {versions}

{header}
{table}
"""
    write_section("Kernels: filter speed on a 4000x3000 photo", body)


if __name__ == "__main__":
    main()
