"""What the explore page asks for, computed with the library: predictions with every activation map, the weighted
sum behind one pixel, kernels on an image, and the run's own tables and pictures. Images travel as PNG data URLs.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image
from torch import nn

from cnnlab.data.images import decode_image, sample_image_path
from cnnlab.data.sources import ImageSet
from cnnlab.engine.inference import LoadedRun, eval_data, evaluate_run, logits_of
from cnnlab.engine.metrics import confusion_matrix
from cnnlab.errors import UsageError
from cnnlab.inspect.features import (
    explain_conv_pixel,
    explain_pool_pixel,
    hooked_forward,
    layer_inputs_and_outputs,
    layer_maps,
    lecture_names,
    pipeline,
    stage_layers,
    stages,
)
from cnnlab.kernels import short

MAX_UPLOAD_BYTES = 8 * 1024 * 1024  # a decoded upload larger than this is refused (413)
MAX_UPLOAD_PIXELS = 4096 * 4096  # an upload decoding to more pixels is refused (a 12 MP phone photo fits)
PLAYGROUND_WORK = 2 * 10**9  # multiply-adds per kernel in the playground: under a second on 2 CPU cores
MAX_MAPS = 32  # activation maps sent per layer (the first ones); wide layers are summarised by these
MAX_PLAYGROUND_SIDE = 1024  # the kernel playground works on images shrunk to at most this side


class TooLarge(UsageError):
    """An upload over the size limit (HTTP 413)."""


def decode_data_url(text: str) -> Image.Image:
    """'data:image/png;base64,....' (or bare base64) -> a Pillow image, strictly checked."""
    payload = text.partition(",")[2] if text.startswith("data:") else text
    if len(payload) > MAX_UPLOAD_BYTES * 4 // 3 + 4:
        raise TooLarge(f"image larger than {MAX_UPLOAD_BYTES // 2**20} MiB")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError("image: not valid base64") from None
    if not data:
        raise UsageError("image: empty")
    return decode_image(io.BytesIO(data), "image", max_pixels=MAX_UPLOAD_PIXELS)


def png_data_url(pixels: np.ndarray) -> str:
    """uint8 (H, W) or (H, W, 3) -> 'data:image/png;base64,...'."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


COLORMAP = "RdBu_r"  # one diverging map for every value shown: blue negative, white zero, red positive
SCALES = ("map", "layer", "global")  # what one colour bar spans: each map, each layer, or every shown layer
MAX_PIPELINE_MAPS = 16  # maps drawn per row of the whole-pipeline view
MAX_PIPELINE_VALUES = 512  # values drawn per vector row (flatten, linear)
ROWS_UNFOLDED = 24  # a network with more rows than this has its long stages folded
FOLDED_MAPS = 4  # maps sent for a row folded away until asked for
STAGE_ROWS_SHOWN = 4  # a stage (one spatial size) with more rows is folded to its last row until expanded
TOP_IMAGES = 9  # test images shown per channel, the most exciting first
TOP_IMAGES_SCANNED = 2000  # test images searched for them (a pass over more would keep a large model busy)
VIS_STEPS = 128  # gradient steps of a feature visualisation (32 for inputs larger than 64 px)
MISTAKES_SHOWN = 24  # test images listed per confusion cell, and most confident mistakes
MAX_INPUT_MAPS = 8  # input channels drawn under an explained window (the first ones of the kernel's group)


def map_to_png(a: torch.Tensor, bound: float | None = None) -> str:
    """One map (H, W) as a PNG on the diverging colour map: -bound blue, 0 white, +bound red (default: max |a|)."""
    bound = float(a.abs().max()) if bound is None else bound
    x = (0.5 + a / (2 * bound)).clamp(0, 1) if bound > 0 else torch.full_like(a, 0.5)
    return png_data_url(_lut()[(x * 255).round().long().numpy()])  # (H, W, 3) uint8


@functools.cache
def _lut() -> np.ndarray:
    """The colour map as 256 RGB rows, uint8 (256, 3): a lookup per pixel (matplotlib rebuilds its table per call)."""
    return (colormaps[COLORMAP](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


def feature_visualisation(run: LoadedRun, layer: str, channel: int, seed: int = 0) -> tuple[torch.Tensor, float, float]:
    """An input that excites one channel of `layer`: gradient ascent on its mean activation from faint noise, with
    the regularisers of the feature-visualisation literature (Olah et al. 2017): random jitter each step, an L2
    penalty on the pixels, a slight blur every few steps, pixels kept in the valid range.

    Returns the image as uint8 (C, S, S), the channel's mean activation reached, and the noise's at the start.
    """
    model, size = run.model, run.image_size
    steps = VIS_STEPS if size <= 64 else VIS_STEPS // 4
    mean = torch.tensor(run.norm.mean).view(1, -1, 1, 1)
    std = torch.tensor(run.norm.std).view(1, -1, 1, 1)
    lo, hi = (0 - mean) / std, (1 - mean) / std  # the normalised range of real pixels
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    x = ((0.5 - mean) / std + 0.1 * torch.randn(1, run.channels, size, size, generator=g)).to(device)
    x.requires_grad_(True)
    lo, hi = lo.to(device), hi.to(device)
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: seen.append(o[:, channel].mean()))
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)  # gradients for the input only
    blur = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], device=device) / 16
    blur = blur.expand(run.channels, 1, 3, 3)
    opt = torch.optim.Adam([x], lr=0.05)
    try:
        with torch.no_grad():
            model(x)
        start = float(seen[-1])
        for step in range(steps):
            shift = torch.randint(-2, 3, (2,), generator=g).tolist()
            seen.clear()
            model(torch.roll(x, shifts=shift, dims=(2, 3)))
            loss = -seen[-1] + 1e-3 * x.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                if step % 4 == 3:
                    x.copy_(torch.nn.functional.conv2d(x, blur, padding=1, groups=run.channels))
                x.copy_(torch.maximum(torch.minimum(x, hi), lo))
        seen.clear()
        with torch.no_grad():
            model(x)
        reached = float(seen[-1])
    finally:
        handle.remove()
        for p in frozen:
            p.requires_grad_(True)
    pixels = ((x.detach().cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)[0]
    return pixels, reached, start


def colormap_stops(n: int = 11) -> list[str]:
    """The diverging colour map as n CSS colours from -bound to +bound, for the page's colour bars."""
    cmap = colormaps[COLORMAP]
    return ["#" + "".join(f"{round(255 * v):02x}" for v in cmap(i / (n - 1))[:3]) for i in range(n)]


def bounds(maps: torch.Tensor, scale: str, shared: float) -> list[float]:
    """The colour bound of each of `maps` (C, H, W): its own max |value|, the layer's, or `shared` (every layer's)."""
    if scale == "map":
        return [float(m.abs().max()) for m in maps]
    return [float(maps.abs().max()) if scale == "layer" else shared] * len(maps)


def center_digit(pixels: np.ndarray, size: int) -> np.ndarray:
    """MNIST's own preprocessing for a drawn digit: its bounding box scaled to fit 20/28 of the side, then placed
    so that its centre of mass is the image centre. uint8 (H, W) -> uint8 (size, size)."""
    ys, xs = np.nonzero(pixels > 20)
    if len(ys) == 0:
        return np.zeros((size, size), dtype=np.uint8)
    crop = Image.fromarray(pixels[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])
    box = max(1, round(size * 20 / 28))
    scale = box / max(crop.size)
    crop = crop.resize(
        (max(1, round(crop.width * scale)), max(1, round(crop.height * scale))), Image.Resampling.LANCZOS
    )
    glyph = np.asarray(crop, dtype=np.float64)
    mass = glyph.sum() or 1.0
    cy = (glyph.sum(1) * np.arange(glyph.shape[0])).sum() / mass
    cx = (glyph.sum(0) * np.arange(glyph.shape[1])).sum() / mass
    out = np.zeros((size, size), dtype=np.float64)
    top, left = round(size / 2 - cy), round(size / 2 - cx)
    top = min(max(top, 0), size - glyph.shape[0])
    left = min(max(left, 0), size - glyph.shape[1])
    out[top : top + glyph.shape[0], left : left + glyph.shape[1]] = glyph
    return out.clip(0, 255).round().astype(np.uint8)


class Explorer:
    """The state behind one `cnnlab explore` page: the run (or none) and cached pictures."""

    def __init__(self, loaded: LoadedRun | None) -> None:
        self.loaded = loaded
        self._pictures: dict[str, bytes] = {}
        self._layers: list[str] | None = None
        self._test: ImageSet | None = None
        # The last explained input: its key, every shown layer's input and output, and the input maps already drawn
        # per layer. A pointer moving over one map asks for many pixels of the same input: one forward pass serves all.
        self._last: tuple[tuple, dict, dict, dict] | None = None
        self._verdicts: tuple[torch.Tensor, torch.Tensor] | None = None  # test split: (probabilities, predictions)
        self._peaks: dict[str, torch.Tensor] = {}  # per shown layer: each test image's peak per channel (N, C)

    def warm_up(self) -> None:
        """Compute once before the server answers, so that lazy imports and library start-up never run in a request.

        The first drawing or kernel request then does not pay for that start-up (not measured in benchmarks/).
        """
        self.playground(None, "sharpen", "max", 2, "clip", False)
        if self.loaded is not None:
            run = self.loaded
            blank = torch.zeros((1, run.channels, run.image_size, run.image_size), dtype=torch.uint8)
            with torch.no_grad():
                layer_inputs_and_outputs(run.model, run.prepare(blank), self.layers())

    def test_split(self) -> ImageSet:
        """The run's test images, loaded once (a dataset load per drawn stroke would dominate the round trip)."""
        if self._test is None:
            self._test, _ = eval_data(self.need_run(), None, None, "test")
        return self._test

    # --- the run ------------------------------------------------------------------------------------------------

    def need_run(self) -> LoadedRun:
        """The run, or a 404-style error for pages started without one."""
        if self.loaded is None:
            raise LookupError("no run: start the page with `cnnlab explore RUN` to see a network")
        return self.loaded

    def layers(self) -> list[str]:
        """The conv/pool layers shown, found once with a blank input."""
        run = self.need_run()
        if self._layers is None:
            blank = torch.zeros(1, run.channels, run.image_size, run.image_size, dtype=torch.uint8)
            self._layers = stage_layers(run.model, run.prepare(blank))
        return self._layers

    def info(self) -> dict[str, Any]:
        """What the page needs to set itself up."""
        from cnnlab.kernels import list_kernels, resolve_kernel

        named = [resolve_kernel(n) for n in list_kernels()]
        kernels = [{"name": k.name, "description": k.description, "matrix": k.matrix.tolist(),
                    "matrices": len(k.matrices)} for k in named]  # fmt: skip
        out: dict[str, Any] = {"run": None, "kernels": kernels, "colormap": colormap_stops(), "scales": list(SCALES)}
        if self.loaded is not None:
            run = self.loaded
            record = run.record
            out["run"] = {
                "path": str(run.path), "name": run.path.name, "model": record.model.name,
                "data": record.data.name, "classes": list(run.classes), "channels": run.channels,
                "image_size": run.image_size, "digits": run.channels == 1 and run.image_size <= 32,
                "test_size": record.data.test_size, "layers": self.layers(), "multi_label": run.multi_label,
                "lecture": self.lecture(),
            }  # fmt: skip
        return out

    def input_image(self, image: str | None, test_index: int | None, center: bool) -> torch.Tensor:
        """uint8 (C, S, S) as the run's model sees it, from an uploaded image or the run's test split."""
        run = self.need_run()
        if test_index is not None:
            data = self.test_split()
            if not 0 <= test_index < len(data):
                raise UsageError(f"test_index: the test split has {len(data)} images (0..{len(data) - 1})")
            return data.final(torch.tensor([test_index]))[0]
        if image is None:
            raise UsageError("give an image or a test_index")
        img = decode_data_url(image)
        if center and run.channels == 1:
            pixels = center_digit(np.asarray(img.convert("L")), run.image_size)
            return torch.from_numpy(pixels)[None]
        return run.model_input(img)

    def truth(self, index: int) -> str:
        """Test image `index`'s true label, or a multi-label image's labels joined by ';'."""
        run, label = self.need_run(), self.test_split().labels[index]
        if label.dim():
            return ";".join(run.classes[k] for k in label.nonzero().flatten().tolist())
        return run.classes[int(label)]

    def predict(self, image: str | None, test_index: int | None, center: bool, top_k: int = 5,
                scale: str = "layer") -> dict[str, Any]:  # fmt: skip
        """Top-k classes and the maps of every shown layer for one image, on one diverging colour scale per map, per
        layer or for all layers (`scale`); a conv followed by an activation also gives the maps after it."""
        if scale not in SCALES:
            raise UsageError(f"scale {short(scale)}: expected one of {', '.join(SCALES)}")
        run = self.need_run()
        pixels = self.input_image(image, test_index, center)
        x = run.prepare(pixels[None])
        outs, post, logits = layer_maps(run.model, x, self.layers())  # one forward pass per stroke
        shared = max((float(a[:MAX_MAPS].abs().max()) for a in outs.values()), default=0.0)
        probs = run.probabilities(logits)[0]  # softmax; a multi-label run: a sigmoid per label
        values, idx = probs.topk(min(top_k, len(run.classes)))
        layers = []
        for name, a in outs.items():
            module = run.model.get_submodule(name)
            a = a[:MAX_MAPS]
            bound = bounds(a, scale, shared)  # the maps after the activation share it: ReLU's effect stays visible
            row = {"name": name, "kind": type(module).__name__, "shape": list(outs[name].shape), "bounds": bound,
                   "maps": [map_to_png(m, b) for m, b in zip(a, bound, strict=True)], "post": None}  # fmt: skip
            if name in post:
                act, p = post[name]
                maps = [map_to_png(m, b) for m, b in zip(p[:MAX_MAPS], bound, strict=True)]
                row["post"] = {"name": act, "kind": type(run.model.get_submodule(act)).__name__, "maps": maps}
            layers.append(row)
        shown = pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()
        top = [{"label": run.classes[i], "prob": float(v)} for v, i in zip(values.tolist(), idx.tolist(), strict=True)]
        if run.multi_label:  # each label is a yes/no of its own: say which reach their thresholds
            th = run.thresholds
            for t, i in zip(top, idx.tolist(), strict=True):
                t.update(threshold=float(th[i]), predicted=bool(t["prob"] >= th[i]))
        out = {"top": top, "input": png_data_url(shown), "layers": layers, "multi_label": run.multi_label}
        if test_index is not None:  # the page shows the test image's true label next to the prediction
            out["truth"] = self.truth(test_index)
        return out

    def explain(self, image: str | None, test_index: int | None, center: bool, layer: str, channel: int, x: int,
                y: int) -> dict[str, Any]:  # fmt: skip
        """The weighted sum behind one pixel of one conv layer's map (or a pooling layer's window and its max or mean),
        with the layer's actual output there and the input maps the window slides over."""
        run = self.need_run()
        if layer not in self.layers():
            raise UsageError(f"layer {short(layer)} is not one of the shown layers")
        module = run.model.get_submodule(layer)
        if not isinstance(module, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
            raise UsageError(f"{layer} is a {type(module).__name__}: neither a convolution nor a pooling window")
        key = (image, test_index, center)
        if self._last is None or self._last[0] != key:
            x_in = run.prepare(self.input_image(image, test_index, center)[None])
            self._last = (key, *layer_inputs_and_outputs(run.model, x_in, self.layers())[:2], {})
        _, ins, outs, drawn = self._last
        if not 0 <= channel < outs[layer].shape[0]:
            raise UsageError(f"channel {channel} outside 0..{outs[layer].shape[0] - 1}")
        if isinstance(module, nn.Conv2d):
            result = explain_conv_pixel(module, ins[layer], channel, y, x)
            channels = [t["input_channel"] for t in result["terms"]]
        else:
            result = explain_pool_pixel(module, ins[layer], channel, y, x)
            channels = [channel]  # pooling looks at its own channel only
        result["output"] = float(outs[layer][channel, y, x])
        result["layer"] = layer
        inp = ins[layer]
        bound = float(inp.abs().max())
        maps = drawn.setdefault(layer, {})
        for c in channels[:MAX_INPUT_MAPS]:
            if c not in maps:
                maps[c] = map_to_png(inp[c], bound)
        result["input_shape"] = list(inp.shape)
        result["inputs"] = [{"channel": c, "map": maps[c]} for c in channels[:MAX_INPUT_MAPS]]
        result["input_bound"] = bound
        return result

    def kernel_weights(self, layer: str, channel: int) -> dict[str, Any]:
        """The kernel(s) that make one map of a conv layer: (C_in / groups, kh, kw) plus the bias."""
        run = self.need_run()
        module = run.model.get_submodule(layer) if layer in self.layers() else None
        if not isinstance(module, nn.Conv2d):
            raise UsageError(f"layer {short(layer)} is not a shown convolution")
        if not 0 <= channel < module.out_channels:
            raise UsageError(f"channel {channel} outside 0..{module.out_channels - 1}")
        w = module.weight.detach().float().cpu()[channel]
        bias = float(module.bias.detach()[channel]) if module.bias is not None else 0.0
        return {"layer": layer, "channel": channel, "weights": w[:MAX_MAPS].tolist(), "in_channels": w.shape[0],
                "bias": bias}  # fmt: skip

    # --- the kernel playground -----------------------------------------------------------------------------------

    @staticmethod
    def _playground_image(image: str | None, gray: bool) -> tuple[np.ndarray, torch.Tensor]:
        """The playground's picture: an upload or the sample photo, shrunk to the side limit; (H, W[, C]) and float
        (C, H, W) in 0..255."""
        img = decode_data_url(image) if image else decode_image(sample_image_path(), "sample")
        if max(img.size) > MAX_PLAYGROUND_SIDE:
            img.thumbnail((MAX_PLAYGROUND_SIDE, MAX_PLAYGROUND_SIDE))
        img = img.convert("L" if gray else "RGB")
        arr = np.asarray(img, dtype=np.float32)
        return arr, torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy())

    def playground_explain(self, image: str | None, kernel: str, mode: str, gray: bool, x: int, y: int
                           ) -> dict[str, Any]:  # fmt: skip
        """The weighted sum behind output pixel (x, y) of the playground, per channel, as `cnnlab filter --explain`
        computes it (zero padding, the same code); a composite kernel's parts and their magnitude; the shown value."""
        from cnnlab.kernels import apply_kernel, explain_pixel, resolve_kernel, to_display_range

        _, img = self._playground_image(image, gray)
        if not kernel.strip():
            raise UsageError("no kernel: choose or type one to explain a pixel")
        k = resolve_kernel(kernel, allow_files=False)  # never a path from a request
        shown = to_display_range(apply_kernel(img, k, max_work=PLAYGROUND_WORK), 255, mode)
        per_matrix = [explain_pixel(img, m, x, y, "zero") for m in k.matrices]
        names = ["gray"] if img.shape[0] == 1 else ["red", "green", "blue"]
        channels = []
        for c, name in enumerate(names):
            parts = [{"window": e[c].window.tolist(), "kernel": e[c].kernel.tolist(),
                      "products": e[c].products.tolist(), "total": e[c].total + 0.0} for e in per_matrix]  # fmt: skip
            value = parts[0]["total"] if len(parts) == 1 else float(np.sqrt(sum(p["total"] ** 2 for p in parts)))
            channels.append(
                {"name": name, "parts": parts, "value": value, "shown": float(shown[c, y, x].round().clamp(0, 255))}
            )  # the displayed 8-bit value
        return {"kernel": k.name, "x": x, "y": y, "mode": mode, "channels": channels, "composite": len(parts) > 1}

    def playground(
        self, image: str | None, kernel: str, pool: str | None, size: int, mode: str, gray: bool
    ) -> dict[str, Any]:
        """Apply a named or typed kernel (and optional pooling) to an uploaded image or the sample photo."""
        from cnnlab.kernels import apply_kernel, resolve_kernel, to_display_range
        from cnnlab.kernels import pool as pool_image

        arr, x = self._playground_image(image, gray)
        k = resolve_kernel(kernel, allow_files=False) if kernel.strip() else None  # never a path from a request
        out = apply_kernel(x, k, max_work=PLAYGROUND_WORK) if k is not None else x
        out = to_display_range(out, 255, mode)
        if pool:
            out = pool_image(out, pool, size)
        pixels = out.round().clamp(0, 255).to(torch.uint8)
        shown = pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()
        original = arr.clip(0, 255).astype(np.uint8)
        return {
            "input": png_data_url(original), "output": png_data_url(shown),
            "kernel": k.matrix.tolist() if k is not None else None, "shape": list(pixels.shape),
        }  # fmt: skip

    # --- the run's tables and pictures ---------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """The per-layer table of `cnnlab summary` for the run's model and input size."""
        from cnnlab.inspect.summary import summarize

        run = self.need_run()
        rows = summarize(run.model, (run.channels, run.image_size, run.image_size))
        table = [{"name": r.name, "kind": r.kind, "shape": list(r.out_shape), "params": r.params, "macs": r.macs}
                 for r in rows]  # fmt: skip
        return {"rows": table, "params": sum(p.numel() for p in run.model.parameters()),
                "macs": sum(r.macs for r in rows)}  # fmt: skip

    def verdicts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's probabilities (N, K) and predicted classes (N,) on the whole test split, computed once."""
        if self._verdicts is None:
            run, test = self.need_run(), self.test_split()
            probs = run.probabilities(logits_of(run, test))
            self._verdicts = probs, probs.argmax(1)
        return self._verdicts

    def confusion(self) -> dict[str, Any]:
        """The test split's confusion counts (K, K; rows true) and its most confident mistakes with their pictures,
        for a page that loads any of them into the network view."""
        run, test = self.need_run(), self.test_split()
        if run.multi_label:
            raise LookupError("a multi-label run has no confusion matrix (`cnnlab evaluate` reports each label)")
        probs, pred = self.verdicts()
        k = len(run.classes)
        cm = confusion_matrix(pred, test.labels.cpu(), k)
        conf = probs.max(1).values
        wrong = (pred != test.labels.cpu()).nonzero().flatten()
        worst = wrong[torch.argsort(conf[wrong], descending=True, stable=True)][:MISTAKES_SHOWN]
        return {"classes": list(run.classes), "confusion": cm.tolist(), "n": len(test),
                "mistakes": self._thumbnails(worst, probs, pred)}  # fmt: skip

    def cell(self, true: int, predicted: int) -> dict[str, Any]:
        """The test images of one confusion-matrix cell (true class, predicted class), most confident first."""
        run, test = self.need_run(), self.test_split()
        k = len(run.classes)
        if not (0 <= true < k and 0 <= predicted < k):
            raise UsageError(f"true and predicted must be class indices 0..{k - 1}")
        if run.multi_label:
            raise LookupError("a multi-label run has no confusion matrix")
        probs, pred = self.verdicts()
        hits = ((test.labels.cpu() == true) & (pred == predicted)).nonzero().flatten()
        order = hits[torch.argsort(probs[hits, predicted], descending=True, stable=True)][:MISTAKES_SHOWN]
        return {"true": run.classes[true], "predicted": run.classes[predicted], "count": len(hits),
                "images": self._thumbnails(order, probs, pred)}  # fmt: skip

    def pipeline_view(self, image: str | None, test_index: int | None, center: bool, scale: str = "layer"
                      ) -> dict[str, Any]:  # fmt: skip
        """The whole forward pass for one image, stage by stage: the input, every conv, activation, pooling, flatten
        and linear layer (maps or vectors on the diverging colours, one bound per row, per map or for all), the
        probabilities of every class; LeNet-5's stage names; stages of one spatial size grouped for collapsing."""
        if scale not in SCALES:
            raise UsageError(f"scale {short(scale)}: expected one of {', '.join(SCALES)}")
        run = self.need_run()
        x = run.prepare(self.input_image(image, test_index, center)[None])
        rows = [{"name": "input", "kind": "input (normalised)", "output": x[0].float().cpu(), "params": 0}]
        stages_run, logits = pipeline(run.model, x)
        rows += stages_run
        names = [None, *lecture_names(rows[1:], run.record.model.name)]
        stage = stages([tuple(r["output"].shape) for r in rows])
        shared = max(float(r["output"].abs().max()) for r in rows)
        sizes: dict[int, int] = {}
        for s in stage:
            sizes[s] = sizes.get(s, 0) + 1
        deep = len(rows) > ROWS_UNFOLDED  # LeNet-5's 14 rows all stay: they are the lecture
        out = []
        for i, (row, lecture) in enumerate(zip(rows, names, strict=True)):
            a = row.pop("output")
            last = i + 1 == len(rows) or stage[i + 1] != stage[i]
            folded = deep and sizes[stage[i]] > STAGE_ROWS_SHOWN and not last  # shown on request only
            item = {**row, "lecture": lecture, "stage": stage[i], "shape": list(a.shape), "collapsible": folded}
            if a.dim() == 3:
                shown = a[: FOLDED_MAPS if folded else MAX_PIPELINE_MAPS]  # a deep network's answer stays small
                bound = bounds(shown, scale, shared)
                item["maps"] = [map_to_png(m, b) for m, b in zip(shown, bound, strict=True)]
                item["bound"] = max(bound)
            else:
                values = a.flatten()[:MAX_PIPELINE_VALUES]
                item["values"] = [round(v, 5) for v in values.tolist()]
                item["bound"] = float(values.abs().max()) if scale != "global" else shared
            out.append(item)
        probs = run.probabilities(logits[None])[0].tolist()
        bars = [{"label": c, "prob": float(p)} for c, p in zip(run.classes, probs, strict=True)]
        return {"rows": out, "multi_label": run.multi_label, "probabilities": bars}

    def lecture(self) -> dict[str, str]:
        """LeNet-5's stage names (C1, S2, ...) of the shown layers, for the network view's headings."""
        run = self.need_run()
        blank = torch.zeros(1, run.channels, run.image_size, run.image_size, dtype=torch.uint8)
        rows = pipeline(run.model, run.prepare(blank))[0]
        return {r["name"]: n for r, n in zip(rows, lecture_names(rows, run.record.model.name), strict=True) if n}

    def peaks(self, layer: str) -> torch.Tensor:
        """Each of the first TOP_IMAGES_SCANNED test images' peak activation per channel of `layer`: (N, C), once."""
        if layer not in self._peaks:
            run, test = self.need_run(), self.test_split()
            n = min(len(test), TOP_IMAGES_SCANNED)
            module = run.model.get_submodule(layer)
            found: list[torch.Tensor] = []
            hook = (module, lambda m, i, o: found.append(o.detach().float().amax((2, 3)).cpu()))
            for start in range(0, n, 256):
                hooked_forward(run.model, run.prepare(test.final(torch.arange(start, min(n, start + 256)))), [hook])
            self._peaks[layer] = torch.cat(found)[:n]
        return self._peaks[layer]

    def channel_view(self, layer: str, channel: int, visualise: bool = True) -> dict[str, Any]:
        """What one channel of a shown layer detects: the test images that excite it most (their peak, the map), and
        a feature visualisation (an input optimised to excite it; None when not `visualise`)."""
        run = self.need_run()
        if layer not in self.layers():
            raise UsageError(f"layer {short(layer)} is not one of the shown layers")
        peaks = self.peaks(layer)
        if not 0 <= channel < peaks.shape[1]:
            raise UsageError(f"channel {channel} outside 0..{peaks.shape[1] - 1}")
        order = torch.argsort(peaks[:, channel], descending=True, stable=True)[:TOP_IMAGES]
        probs, pred = self.verdicts()
        top = self._thumbnails(order, probs, pred)
        for item, i in zip(top, order.tolist(), strict=True):
            item["peak"] = float(peaks[i, channel])
        picture, reached, start = None, None, None
        if visualise:
            pixels, reached, start = feature_visualisation(run, layer, channel)
            shown = pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()
            picture = png_data_url(shown)
        return {"layer": layer, "channel": channel, "scanned": len(peaks), "top": top,
                "visualisation": picture, "reached": reached, "start": start,
                "best_test_peak": float(peaks[order[0], channel]) if len(order) else None}  # fmt: skip

    def _thumbnails(self, index: torch.Tensor, probs: torch.Tensor, pred: torch.Tensor) -> list[dict[str, Any]]:
        run, test = self.need_run(), self.test_split()
        pixels = test.final(index) if len(index) else torch.empty(0)
        out = []
        for i, img in zip(index.tolist(), pixels, strict=True):
            shown = img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()
            true = self.truth(i)
            if run.multi_label:  # a label set: those at or above their thresholds
                predicted = ";".join(run.classes[k] for k in (probs[i] >= run.thresholds).nonzero().flatten().tolist())
            else:
                predicted = run.classes[int(pred[i])]
            out.append({"index": i, "true": true or "(none)", "predicted": predicted or "(none)",
                        "confidence": float(probs[i, pred[i]]), "image": png_data_url(shown)})  # fmt: skip
        return out

    def picture(self, what: str) -> bytes:
        """curves / confusion / misclassified as PNG bytes, made once (in memory, never written into the run)."""
        run = self.need_run()
        if what not in ("curves", "confusion", "misclassified"):
            raise LookupError(f"no picture {short(what)}")
        if what == "confusion" and run.multi_label:  # no single predicted class per image
            raise LookupError("a multi-label run has no confusion matrix (`cnnlab evaluate` reports each label)")
        if what not in self._pictures:
            self._pictures.update(self._make_pictures(run, what))
        return self._pictures[what]

    def _make_pictures(self, run: LoadedRun, what: str) -> dict[str, bytes]:
        from cnnlab.engine import rundir
        from cnnlab.inspect.visualize import plot_confusion, plot_curves, plot_image_grid

        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            if what == "curves":
                rows = rundir.read_metrics(run.path)
                if not rows:
                    raise LookupError("the run has no metrics.csv rows")
                title = run.record.title
                plot_curves(rows, d / "x.png", title=title, best_epoch=rundir.best_epoch(rows))
                return {"curves": (d / "x.png").read_bytes()}
            ev = evaluate_run(run)
            if ev.multi_label:  # no single predicted class per image: no confusion matrix
                plot_image_grid(ev.images, ev.mistake_captions(), d / "m.png", title="images with a wrong label")
                return {"misclassified": (d / "m.png").read_bytes()}
            plot_confusion(ev.confusion, ev.classes, d / "c.png", title=f"confusion matrix ({ev.n:,} test images)")
            plot_image_grid(ev.images, ev.mistake_captions(), d / "m.png", title="most confident mistakes")
            return {"confusion": (d / "c.png").read_bytes(), "misclassified": (d / "m.png").read_bytes()}
