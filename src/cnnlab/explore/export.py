"""`cnnlab explore RUN --export DIR`: the explore page as a static site that runs the trained network in the browser.

The site holds the run's network as ONNX with extra outputs (every shown layer's input and maps, the maps after its
activation, every pipeline stage), ONNX Runtime Web (vendored from npm, so the page works offline), the page's own
files, and what does not depend on the input (the run's tables, pictures, confusion cells, what each channel
detects), precomputed here with the same code as the live server. The page computes in the browser what depends on
the input: the prediction, the maps' colours, the weighted sums and pooling windows, the pipeline.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnlab.engine.export import EVAL_RESIZE, PARITY_TOLERANCE
from cnnlab.engine.inference import LoadedRun
from cnnlab.errors import CnnlabError, UsageError
from cnnlab.explore.service import (
    FOLDED_MAPS,
    MAX_MAPS,
    MAX_PIPELINE_MAPS,
    MAX_PIPELINE_VALUES,
    ROWS_UNFOLDED,
    STAGE_ROWS_SHOWN,
    VIS_STEPS,
    Explorer,
    _lut,
    decode_data_url,
    png_data_url,
)
from cnnlab.inspect.features import activations_after, hooked_forward, lecture_names, pipeline, stages

STATIC = Path(__file__).parent / "static"
ORT = Path(__file__).parent / "vendor" / "onnxruntime-web"
ORT_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm", "LICENSE")
MARKER = "cnnlab-export.json"  # names a folder as a site this command wrote (and may therefore replace)
TEST_IMAGES = 1000  # test images shipped for "show test image N" (plus every one the run tab's thumbnails show)
THUMB_SIDE = 96  # thumbnails larger than this are shrunk: a 224 px photo per confusion cell would weigh megabytes
VISUALISE_BUDGET = 10**12  # multiply-adds for all feature visualisations (about a minute on 2 cores); beyond: none
TAP_TOLERANCE = 1e-3  # max abs difference allowed between an exported map and the PyTorch model's


Tap = tuple[str, int, str, int]  # (module name, call index, "in" / "out" / "absmax", values kept: channels or floats)


class Tapped(nn.Module):
    """The model with extra outputs: for each tap, a module's input or output at one of its calls (first sample),
    its first `keep` channels (maps) or values (vectors), or its largest magnitude. Returns (logits, *taps)."""

    def __init__(self, model: nn.Module, taps: list[Tap]) -> None:
        super().__init__()
        self.model = model
        self.taps = taps
        self.wanted: dict[str, list[int]] = {}  # module name -> the taps on it
        for i, (name, _, _, _) in enumerate(taps):
            self.wanted.setdefault(name, []).append(i)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(1, C, S, S) -> (logits (1, K), tap 0, tap 1, ...)."""
        modules = dict(self.model.named_modules())
        wanted = self.wanted
        calls: dict[str, int] = {}
        found: dict[int, torch.Tensor] = {}

        def hook(name: str) -> Any:
            def run(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
                call = calls.get(name, 0)
                calls[name] = call + 1
                for i in wanted[name]:
                    _, at, what, keep = self.taps[i]
                    if at != call:
                        continue
                    t = (inputs[0] if what == "in" else output)[0].float()
                    if what == "absmax":
                        found[i] = t.abs().amax().reshape(1)
                    elif t.dim() == 3:
                        found[i] = t[:keep].clone()  # clone: a later in-place op must not change what was kept
                    else:
                        found[i] = t.flatten()[:keep].clone()

            return run

        handles = [modules[n].register_forward_hook(hook(n)) for n in wanted]
        try:
            logits = self.model(x)
        finally:
            for h in handles:
                h.remove()
        return (logits.float(), *(found[i] for i in range(len(self.taps))))


def _no_inplace(model: nn.Module) -> nn.Module:
    """A copy of `model` whose activations do not work in place: a kept conv output must stay the conv's own."""
    import copy

    model = copy.deepcopy(model).cpu().float().eval()
    for m in model.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
    return model


def _calls(model: nn.Module, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Every leaf module's outputs in one forward pass, per call (first sample, CPU copies)."""
    names = {m: n for n, m in model.named_modules()}
    seen: dict[str, list[torch.Tensor]] = {}

    def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            seen.setdefault(names[module], []).append(output.detach()[0].float().cpu().clone())

    hooked_forward(model, x, [(m, hook) for m in model.modules() if not list(m.children())])
    return seen


def plan(run: LoadedRun, explorer: Explorer, model: nn.Module) -> tuple[list[Tap], dict[str, Any]]:
    """The taps the page needs and the site's description of the network: the shown layers (maps, inputs, the maps
    after their activation, conv weights' shapes, pooling windows) and the pipeline's rows."""
    blank = torch.zeros(1, run.channels, run.image_size, run.image_size, dtype=torch.uint8)
    x = run.prepare(blank).cpu()
    taps: list[Tap] = []

    def tap(name: str, call: int, what: str, keep: int) -> int:
        key = (name, call, what, keep)
        if key not in taps:
            taps.append(key)
        return taps.index(key) + 1  # output 0 is the logits

    post = activations_after(model, x, explorer.layers())
    calls = _calls(model, x)
    lecture = explorer.lecture()
    layers = []
    for name in explorer.layers():
        module = model.get_submodule(name)
        shape = list(calls[name][0].shape)
        item: dict[str, Any] = {"name": name, "kind": type(module).__name__, "shape": shape,
                                "lecture": lecture.get(name), "maps": tap(name, 0, "out", MAX_MAPS),
                                "input": tap(name, 0, "in", 1 << 30), "post": None}  # fmt: skip
        if name in post:
            act, kept = post[name]
            call = next(i for i, t in enumerate(calls[act]) if t.shape == kept.shape and torch.equal(t, kept))
            item["post"] = {"name": act, "kind": type(model.get_submodule(act)).__name__,
                            "maps": tap(act, call, "out", MAX_MAPS)}  # fmt: skip
        pair = nn.modules.utils._pair
        if isinstance(module, nn.Conv2d):
            plain = module.dilation == (1, 1) and module.padding_mode == "zeros" and not isinstance(module.padding, str)
            item["conv"] = {"kernel": list(module.kernel_size), "stride": list(module.stride),
                            "padding": list(module.padding) if plain else [0, 0], "groups": module.groups,
                            "in_channels": module.in_channels, "out_channels": module.out_channels,
                            "explained": plain}  # fmt: skip
        elif isinstance(module, nn.MaxPool2d | nn.AvgPool2d):
            is_max = isinstance(module, nn.MaxPool2d)
            plain = not module.ceil_mode and (not is_max or pair(module.dilation) == (1, 1))
            item["pool"] = {"kind": "max" if is_max else "mean", "kernel": list(pair(module.kernel_size)),
                            "stride": list(pair(module.stride or module.kernel_size)),
                            "padding": list(pair(module.padding)),
                            "count_include_pad": bool(getattr(module, "count_include_pad", True)),
                            "divisor_override": getattr(module, "divisor_override", None),
                            "explained": plain}  # fmt: skip
        layers.append(item)

    # The pipeline: the rows `Explorer.pipeline_view` draws, with the same folding.
    rows, _ = pipeline(model, x)
    names = [None, *lecture_names(rows, run.record.model.name)]
    shapes = [tuple(x[0].shape)] + [tuple(r["output"].shape) for r in rows]
    stage = stages(list(shapes))
    sizes: dict[int, int] = {}
    for s in stage:
        sizes[s] = sizes.get(s, 0) + 1
    deep = len(shapes) > ROWS_UNFOLDED
    pipe = [{"name": "input", "kind": "input (normalised)", "params": 0, "lecture": None, "stage": stage[0],
             "shape": list(shapes[0]), "collapsible": False, "values": None, "absmax": None}]  # fmt: skip
    for i, row in enumerate(rows, start=1):
        out = row.pop("output")
        last = i + 1 == len(shapes) or stage[i + 1] != stage[i]
        folded = deep and sizes[stage[i]] > STAGE_ROWS_SHOWN and not last
        keep = (FOLDED_MAPS if folded else MAX_PIPELINE_MAPS) if out.dim() == 3 else MAX_PIPELINE_VALUES
        pipe.append({**row, "lecture": names[i], "stage": stage[i], "shape": list(out.shape), "collapsible": folded,
                     "values": tap(row["name"], 0, "out", keep),
                     "absmax": tap(row["name"], 0, "absmax", 1)})  # fmt: skip
    return taps, {"layers": layers, "pipeline": pipe}


def onnx_bytes(tapped: Tapped, x: torch.Tensor, n_out: int) -> tuple[bytes, str]:
    """The tapped model as ONNX for one image (1, C, S, S): the TorchScript-based exporter, torch.export's if not.

    TorchScript's first: torch 2.14's torch.export-based exporter fails on the hooks' many outputs (after 8 s)."""
    try:
        import onnx  # noqa: F401  (both exporters need it)
    except ImportError:
        raise CnnlabError("--export needs the onnx package: pip install 'cnnlab[onnx]'") from None
    names = ["logits", *(f"t{i}" for i in range(1, n_out))]
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        for dynamo in (False, True):
            try:
                with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    kwargs: dict[str, Any] = {"external_data": False} if dynamo else {}
                    torch.onnx.export(tapped, (x,), str(path), input_names=["input"], output_names=names,
                                      dynamo=dynamo, **kwargs)  # fmt: skip
                return path.read_bytes(), "torch.export (dynamo)" if dynamo else "TorchScript-based"
            except Exception as e:  # some graphs only export through the older TorchScript-based path
                errors.append(str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__)
    raise CnnlabError(f"ONNX export of the explore site failed: {'; fallback: '.join(errors)}")


def check_parity(data: bytes, tapped: Tapped, x: torch.Tensor) -> float:
    """Run the ONNX file in onnxruntime on a real input and compare every output with PyTorch's; the logits' gap."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise CnnlabError("the export's parity check needs onnxruntime: pip install 'cnnlab[onnx]'") from None
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        expected = tapped(x)
    logits_gap = 0.0
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        e = e.detach().numpy()
        if g.shape != e.shape:
            raise CnnlabError(f"explore export: output {i} has shape {g.shape}, the model's {e.shape}")
        gap = float(np.abs(g - e).max()) if e.size else 0.0
        scale = max(1.0, float(np.abs(e).max())) if e.size else 1.0
        limit = PARITY_TOLERANCE if i == 0 else TAP_TOLERANCE
        if gap / scale > limit:
            raise CnnlabError(f"explore export: output {i} differs from the model by {gap:.2e}; nothing written")
        if i == 0:
            logits_gap = gap
    return logits_gap


def _thumb(url: str) -> str:
    """A thumbnail's data URL shrunk to THUMB_SIDE (small images stay as they are)."""
    img = decode_data_url(url)
    if max(img.size) <= THUMB_SIDE:
        return url
    img.thumbnail((THUMB_SIDE, THUMB_SIDE))
    return png_data_url(np.asarray(img))


def _shrink(items: list[dict[str, Any]], used: set[int]) -> list[dict[str, Any]]:
    for item in items:
        item["image"] = _thumb(item["image"])
        used.add(int(item["index"]))
    return items


def run_tables(run: LoadedRun, explorer: Explorer, used: set[int]) -> dict[str, Any]:
    """The run tab as the server answers it: the layer table, the confusion matrix, every non-empty cell's images."""
    out: dict[str, Any] = {"summary": explorer.summary(), "confusion": None, "cells": {}}
    if not run.multi_label:
        c = explorer.confusion()
        _shrink(c["mistakes"], used)
        out["confusion"] = c
        for t, row in enumerate(c["confusion"]):
            for p, n in enumerate(row):
                if n:
                    cell = explorer.cell(t, p)
                    _shrink(cell["images"], used)
                    out["cells"][f"{t},{p}"] = cell
    return out


def channel_views(run: LoadedRun, explorer: Explorer, used: set[int], say: Any, visualise: bool | None = None
                  ) -> dict[str, Any]:  # fmt: skip
    """What each shown map's channel detects: its top test images, and a feature visualisation (by default while
    all of them fit in VISUALISE_BUDGET multiply-adds: a ResNet-18's 128 would take ten minutes on 2 CPU cores)."""
    count = sum(min(MAX_MAPS, int(explorer.peaks(name).shape[1])) for name in explorer.layers())
    if visualise is None:
        steps = VIS_STEPS if run.image_size <= 64 else VIS_STEPS // 4  # as feature_visualisation takes them
        work = count * steps * 3 * explorer.summary()["macs"]  # a step: one forward and one backward (~2 forwards)
        visualise = work <= VISUALISE_BUDGET
        if not visualise:
            say(f"  no feature visualisations: {count} would take {work:.1e} multiply-adds (the live server makes "
                "each on request)")  # fmt: skip
    views: dict[str, Any] = {}
    for name in explorer.layers():
        channels = min(MAX_MAPS, int(explorer.peaks(name).shape[1]))
        say(f"  what the {channels} channels of {name} detect")
        for c in range(channels):
            v = explorer.channel_view(name, c, visualise=visualise)
            _shrink(v["top"], used)
            views[f"{name}/{c}"] = v
    return views


def test_images(explorer: Explorer, used: set[int]) -> tuple[bytes, dict[str, Any]]:
    """The first TEST_IMAGES test images and every one a thumbnail names: uint8 (N, C, S, S) bytes and their index."""
    test = explorer.test_split()
    index = sorted(set(range(min(len(test), TEST_IMAGES))) | used)
    pixels = test.final(torch.tensor(index)) if index else torch.empty(0, dtype=torch.uint8)
    truth = [explorer.truth(i) for i in index]
    return pixels.contiguous().numpy().astype(np.uint8).tobytes(), {"index": index, "truth": truth, "count": len(test)}


def conv_weights(model: nn.Module, layers: list[dict[str, Any]]) -> bytes:
    """Every shown conv's weights and bias as float32, one after the other; each layer's offset goes into its entry."""
    chunks, offset = [], 0
    for item in layers:
        if "conv" not in item:
            continue
        m = model.get_submodule(item["name"])
        w = m.weight.detach().float().cpu().numpy().ravel()
        b = m.bias.detach().float().cpu().numpy() if m.bias is not None else np.zeros(m.out_channels, np.float32)
        item["conv"].update(weights=offset, bias=offset + w.size)
        chunks += [w.astype("<f4").tobytes(), b.astype("<f4").tobytes()]
        offset += w.size + b.size
    return b"".join(chunks)


def page_html() -> str:
    """The page's HTML, pointing at the site's files (relative: the site may live in any folder of a host)."""
    html = (STATIC / "index.html").read_text()
    scripts = ('<script>window.CNNLAB_STATIC = true;</script>\n<script src="ort/ort.wasm.min.js"></script>\n'
               '<script src="static.js"></script>\n<script src="app.js"></script>')  # fmt: skip
    html = html.replace('<script src="/static/app.js"></script>', scripts)
    html = html.replace('href="/static/style.css"', 'href="style.css"').replace(
        'href="/favicon.ico"', 'href="favicon.svg"'
    )
    return html


def _prepare_folder(out: Path) -> Path:
    """Check `out` before any work and make the empty build folder beside it (new files readable by a web server)."""
    if not str(out).strip():
        raise UsageError("--export: empty folder name")
    resolved = out.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents or not resolved.name:
        raise UsageError(f"--export {out}: the current folder or one above it; name a folder for the site")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--export {out}: is a file; name a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UsageError(f"--export {out}: the folder holds files that are not a cnnlab explore site; "
                         "name a new or empty folder")  # fmt: skip
    try:
        resolved.parent.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix=f".{resolved.name}-build-", dir=resolved.parent))
    except OSError as e:
        raise UsageError(f"--export {out}: cannot write there ({e.strerror or e})") from None
    umask = os.umask(0)
    os.umask(umask)
    build.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide the site from a web server running as another user
    return build


def _own_files(site: Path) -> set[str]:
    """The files a previous export wrote into `site` (its marker lists them)."""
    try:
        return set(json.loads((site / MARKER).read_text()).get("files", []))
    except (OSError, ValueError, AttributeError):
        return set()


def export_site(run: LoadedRun, out: Path, say: Any = print, visualise: bool | None = None) -> dict[str, Any]:
    """Write the static site for `run` into `out` (a new or empty folder, or a site written here before); `visualise`:
    precompute each channel's feature visualisation (None: while they fit in VISUALISE_BUDGET multiply-adds)."""
    out = Path(out)
    build = _prepare_folder(out)  # refusals and an unwritable place are found before a minute of work
    try:
        return _export(run, out, build, say, visualise)
    finally:
        shutil.rmtree(build, ignore_errors=True)  # gone when the site moved into place; removed on any failure


def _export(run: LoadedRun, out: Path, build: Path, say: Any, visualise: bool | None) -> dict[str, Any]:
    explorer = Explorer(run)
    model = _no_inplace(run.model)
    say(f"cnnlab explore --export: {run.path} -> {out}")
    taps, network = plan(run, explorer, model)
    test = explorer.test_split()
    x = run.prepare(test.final(torch.tensor([0]))).cpu() if len(test) else run.prepare(
        torch.zeros(1, run.channels, run.image_size, run.image_size, dtype=torch.uint8)).cpu()  # fmt: skip
    tapped = Tapped(model, taps).eval()
    say(f"  the network as ONNX with {len(taps)} extra outputs")
    with torch.no_grad():
        data, exporter = onnx_bytes(tapped, x, len(taps) + 1)
    worst = check_parity(data, tapped, x)
    used: set[int] = set()
    say("  the run's tables, confusion cells and pictures")
    tables = run_tables(run, explorer, used)
    pictures = {}
    for what in ("curves", "confusion", "misclassified"):
        with contextlib.suppress(LookupError):
            pictures[what] = explorer.picture(what)
    views = channel_views(run, explorer, used, say, visualise)
    pixels, test_meta = test_images(explorer, used)
    weights = conv_weights(model, network["layers"])
    info = explorer.info()
    info["run"]["path"] = info["run"]["name"]  # a published site does not give away the author's folders
    info["run"]["test_size"] = test_meta["count"]
    info["static"] = True
    site = {
        "info": info, "network": network, "outputs": len(taps) + 1,
        "norm": {"mean": list(run.norm.mean), "std": list(run.norm.std)},
        "resize": run.resize or "shorter", "resize_text": EVAL_RESIZE.get(run.resize, EVAL_RESIZE[None]),
        "thresholds": run.thresholds.tolist() if run.multi_label else None,
        "lut": _lut().tolist(), "test": test_meta, "pictures": sorted(pictures), "exporter": exporter,
        "parity_max_abs_diff": worst,
    }  # fmt: skip

    # Built in the fresh folder beside `out`, then moved into place: an interrupted export leaves the old site whole.
    (build / "ort").mkdir()
    (build / "pictures").mkdir()
    for f in ORT_FILES:
        shutil.copyfile(ORT / f, build / "ort" / f)
    for f in ("app.js", "static.js", "style.css", "favicon.svg"):
        shutil.copyfile(STATIC / f, build / f)
    (build / "index.html").write_text(page_html())
    (build / "model.onnx").write_bytes(data)
    (build / "weights.bin").write_bytes(weights)
    (build / "test.bin").write_bytes(pixels)
    for what, png in pictures.items():
        (build / "pictures" / f"{what}.png").write_bytes(png)
    (build / "site.json").write_text(json.dumps(site))
    (build / "run.json").write_text(json.dumps(tables))
    (build / "channels.json").write_text(json.dumps(views))
    written = sorted(str(f.relative_to(build)) for f in build.rglob("*") if f.is_file())
    kept = []
    if out.is_dir():  # files the user added to the old site (a CNAME for GitHub Pages, a README) move over
        own = _own_files(out) | {MARKER}
        for f in sorted(out.rglob("*")):
            rel = str(f.relative_to(out))
            if f.is_file() and rel not in own and not (build / rel).exists():
                (build / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, build / rel)
                kept.append(rel)
    marker = {"run": run.path.name, "model": run.record.model.name, "onnxruntime-web": "1.31.1", "files": written}
    (build / MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # the folder is not in place yet
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
        old.rmdir()  # a fresh name nobody uses: the old site moves there, then goes
        out.rename(old)
    build.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if kept:
        say(f"  kept {len(kept)} file(s) you added to the old site: {', '.join(kept[:5])}")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"path": str(out), "bytes": size, "exporter": exporter, "outputs": len(taps) + 1,
            "test_images": len(test_meta["index"]), "channels": len(views), "parity_max_abs_diff": worst,
            "kept": kept}  # fmt: skip
