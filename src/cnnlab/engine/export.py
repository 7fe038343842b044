"""Export a trained run to ONNX or TorchScript with a dynamic batch size, and prove the file computes the same logits.

Beside the model file goes `<file>.json`: the preprocessing (size, channels, mean/std) and the class names.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cnnlab.engine.inference import LoadedRun
from cnnlab.engine.rundir import make_dir
from cnnlab.errors import CnnlabError, OptionError, UsageError
from cnnlab.fileio import atomic_write_bytes, atomic_write_json

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
PARITY_TOLERANCE = 1e-4  # max abs logit difference allowed between the exported file and the PyTorch model


@dataclass
class ExportResult:
    """Where the export went and how closely it matches the model."""

    path: Path
    metadata: Path
    format: str
    max_abs_diff: float
    batch_sizes: tuple[int, ...]
    exporter: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        return {"path": str(self.path), "metadata": str(self.metadata), "format": self.format,
                "max_abs_diff": self.max_abs_diff, "batch_sizes": list(self.batch_sizes),
                "exporter": self.exporter}  # fmt: skip


def _onnx_bytes(model: torch.nn.Module, example: torch.Tensor) -> tuple[bytes, str]:
    """The model as ONNX with a dynamic batch axis: torch.export-based exporter, the TorchScript one as fallback."""
    try:
        import onnx  # noqa: F401  (both exporters need it)
    except ImportError:
        raise CnnlabError("ONNX export needs the onnx package: pip install 'cnnlab[onnx]'") from None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        quiet = contextlib.redirect_stdout(io.StringIO())
        try:
            with quiet, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                batch = torch.export.Dim("batch", min=1)
                torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["logits"],
                                  dynamic_shapes=({0: batch},), dynamo=True, external_data=False)  # fmt: skip
            exporter = "torch.export (dynamo)"
        except Exception as first:  # some graphs only export through the older TorchScript-based path
            try:
                with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    axes = {"input": {0: "batch"}, "logits": {0: "batch"}}
                    torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["logits"],
                                      dynamic_axes=axes, dynamo=False)  # fmt: skip
                exporter = "TorchScript-based"
            except Exception as second:
                raise CnnlabError(f"ONNX export failed: {_line(first)}; fallback: {_line(second)}") from None
        return path.read_bytes(), exporter


def _torchscript_bytes(model: torch.nn.Module, example: torch.Tensor) -> tuple[bytes, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export, but still what users load
        traced = torch.jit.trace(model, example, check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    return buf.getvalue(), "torch.jit.trace"


def _run_exported(fmt: str, path: Path, x: torch.Tensor) -> torch.Tensor:
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = torch.jit.load(str(path), map_location="cpu")
            with torch.no_grad():
                return loaded(x).float()
    try:
        import onnxruntime as ort
    except ImportError:
        raise CnnlabError("the ONNX parity check needs onnxruntime: pip install 'cnnlab[onnx]'") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]).float()


def export_run(
    loaded: LoadedRun, fmt: str, images: torch.Tensor, out: str | os.PathLike[str] | None = None
) -> ExportResult:
    """Export `loaded` as `fmt` and check it on `images` (uint8 (N, C, H, W), a real batch) at two batch sizes."""
    if fmt not in FORMATS:
        raise OptionError("format", f"{fmt!r}: choose {' or '.join(FORMATS)}")
    path = Path(out) if out else loaded.path / f"model{FORMATS[fmt]}"
    if path.is_dir():
        raise UsageError(f"-o {path}: is a directory; name the file to write")
    make_dir(path.parent, "-o")  # a folder that does not exist yet is made, as `evaluate --out` does
    model = loaded.model.cpu().float().eval()
    x = loaded.prepare(images.cpu()).cpu()  # (N, C, H, W) normalised, as the exported model expects
    example = x[: min(2, len(x))]
    with torch.no_grad():
        data, exporter = _onnx_bytes(model, example) if fmt == "onnx" else _torchscript_bytes(model, example)
    # Parity on the whole batch and on a single image (proves the batch axis is dynamic), checked on a temporary
    # copy: a file that fails the check never lands under the requested name.
    diffs, sizes = [], (len(x), 1)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        trial = Path(tmp) / path.name
        trial.write_bytes(data)
        for n in sizes:
            expected = model(x[:n]).float()
            got = _run_exported(fmt, trial, x[:n])
            if got.shape != expected.shape:
                raise CnnlabError(f"{path}: exported model gives shape {tuple(got.shape)} for batch {n}, "
                                  f"expected {tuple(expected.shape)}")  # fmt: skip
            diffs.append(float((got - expected).abs().max()))
    worst = max(diffs)
    if worst > PARITY_TOLERANCE:
        raise CnnlabError(f"{path}: parity check failed, max |difference| {worst:.2e} > {PARITY_TOLERANCE:g}; "
                          "nothing written")  # fmt: skip
    atomic_write_bytes(path, data)
    meta = {
        "model": loaded.record.model.name, "format": fmt, "exporter": exporter, "input": "input",
        "output": ("logits (apply a sigmoid per label; a label is predicted at probability >= its threshold)"
                   if loaded.multi_label else "logits (apply softmax for probabilities)"),
        "layout": "NCHW float32",
        "image_size": loaded.image_size, "channels": loaded.channels, "mean": list(loaded.norm.mean),
        "std": list(loaded.norm.std), "pixel_scale": "divide 8-bit values by 255, then (x - mean) / std",
        "resize": EVAL_RESIZE.get(loaded.resize, EVAL_RESIZE[None]), "classes": list(loaded.classes),
        "parity_max_abs_diff": worst, "run": str(loaded.path),
    }  # fmt: skip
    if loaded.multi_label:
        meta["thresholds"] = dict(zip(loaded.classes, loaded.thresholds.tolist(), strict=True))
    meta_path = atomic_write_json(path.with_name(path.name + ".json"), meta)
    return ExportResult(path, meta_path, fmt, worst, sizes, exporter)


EVAL_RESIZE = {  # how evaluation cuts an image to the model's square, per the run's resize policy (data.resize)
    None: "shorter side to image_size, centre crop",
    "crop": "the centre square of 87.5% of the shorter side, resized to image_size (antialiased)",
    "squash": "the whole image resized to image_size x image_size, aspect ignored (antialiased)",
    "pad": "the whole image, longer side to image_size, centred on black (antialiased)",
}


def _line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
